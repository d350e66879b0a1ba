"""Start a workflow on your own structures (`polmodel launch active-learning|field-response|dfpt FILE...`), go on
with a finished active-learning loop (`polmodel launch continue LOOP`), or train an ensemble on labelled data
another code published (`polmodel launch train SOURCE_CARD.yaml`, polmodel.workflows.external_training).

Reads every structure in the files (CIF, POSCAR and Materials Project JSON through pymatgen; extended XYZ, QE
input/output and anything else ASE reads through ASE), builds the workflow from its protocol and runs it here, or
with --daemon submits it to the AiiDA daemon and prints the `verdi process` commands to follow it.

Examples:
    polmodel launch active-learning BaTiO3.cif --protocol fast --daemon
    polmodel launch field-response frames.extxyz --overrides '{"scf": {"kpoints_distance": 0.3}}'
    polmodel launch dfpt POSCAR --ph-code ph@cluster --pw-code pw@cluster --daemon
    polmodel launch continue 1234 --max-iterations 2 --daemon
    polmodel launch continue 1234 strained.cif --overrides data/quartz/loop4.yaml --daemon
    polmodel launch train data/allegro_pol/SiO2.yaml --output SiO2.pt
    polmodel launch train data/allegro_pol/SiO2.yaml --resume 5678 --output SiO2.pt   # 5678: a stopped training
      (after `verdi archive import loop.aiida` on another machine, too: the new loop starts from the old one's
      frames, ensemble, exploration stage and unlabelled candidates)
"""
import argparse
import json
import pathlib

from polmodel.cli import InputError, load_aiida_profile

WORKFLOWS = ("active-learning", "field-response", "dfpt", "continue", "train")
PROTOCOLS = ("fast", "balanced", "stringent")


_PROTOCOL_FILES = {"active-learning": "active_learning.yaml", "field-response": "field_response.yaml",
                   "dfpt": "field_response.yaml"}
_POSITIONAL_MEANING = {
    "continue": "the first STRUCTURE_FILE is the finished loop's pk or uuid, further ones extra MD starting points; "
                "the new loop takes its settings, --max-iterations, and --overrides in the shape of the loop's input "
                "ports (`verdi process show LOOP` lists them), e.g. '{\"max_full_labels\": 2, \"explore\": "
                "{\"selection\": {\"response_threshold_factor\": 1.0}}}' (Dict inputs are merged, others replaced).",
    "train": "STRUCTURE_FILE is one source card (YAML: the published file, its origin, the label mapping and the "
             "training settings; data/allegro_pol/SiO2.yaml is one). --output writes the model, --resume goes on.",
}


def workflow_help(workflow):
    """The inputs a workflow takes: its protocols and every override key with its default (dotted paths)."""
    if workflow in _POSITIONAL_MEANING:
        return f"{workflow}: {_POSITIONAL_MEANING[workflow]}"
    import importlib.util

    import yaml

    folder = pathlib.Path(importlib.util.find_spec("polmodel.workflows").submodule_search_locations[0])
    protocol = yaml.safe_load((folder / "protocols" / _PROTOCOL_FILES[workflow]).read_text())
    lines = [f"{workflow}: protocols (--protocol; default {protocol['default_protocol']}):"]
    for name, settings in protocol["protocols"].items():
        description = " ".join(str(settings.get("description", "")).split())
        lines.append(f"  {name}: {description.split('. ')[0].rstrip('.')}.")
    lines.append("override keys (--overrides, JSON or YAML in this shape) and their defaults:")

    def walk(value, prefix):
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            lines.append(f"  {prefix} = {json.dumps(value)}")

    walk(protocol["default_inputs"], "")
    return "\n".join(lines)


class _HelpWithWorkflowInputs(argparse.Action):
    """-h/--help: the usual help, then the inputs of the workflow named before it (`launch dfpt --help`)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        workflow = getattr(namespace, "workflow", None)
        if workflow in WORKFLOWS:
            print()
            print(workflow_help(workflow))
        parser.exit()


OWN_HELP = True
#: s: how often a workflow run here (no daemon) checks whether its children have ended
LOCAL_POLL_INTERVAL_S = 1.0


def add_arguments(parser):
    parser.add_argument("-h", "--help", action=_HelpWithWorkflowInputs,
                        help="show this help; after a workflow name, also that workflow's inputs and override keys")
    parser.add_argument("workflow", choices=WORKFLOWS,
                        help="the workflow to start; `continue`: a new active-learning loop from a finished one")
    parser.add_argument("structure_files", nargs="+", metavar="STRUCTURE_FILE",
                        help="structure files (every structure in each file is used); for `continue` the finished "
                             "loop's pk or uuid, then extra MD starting points; for `train` one source card (YAML)")
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="continue: trainings of the new loop (default: the previous loop's)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None, help="protocol (default: the workflow's)")
    parser.add_argument("--daemon", action="store_true", help="submit to the daemon instead of running here")
    parser.add_argument("--profile", default=None, help="AiiDA profile (default: the default profile)")
    parser.add_argument("--overrides", default=None,
                        help="JSON text or a .json/.yaml file, in the shape of the workflow's protocol file "
                             "(continue: of the loop's input ports)")
    parser.add_argument("--pw-code", default="pw@localhost", help="pw.x code (default: pw@localhost)")
    parser.add_argument("--ph-code", default="ph@localhost", help="ph.x code for dfpt (default: ph@localhost)")
    parser.add_argument("--polmodel-code", default="polmodel@localhost",
                        help="polmodel code for training and MD (default: polmodel@localhost)")
    parser.add_argument("--pseudo-family", default=None, help="pseudopotential family (default: the project's)")
    parser.add_argument("--output", default=None, help="train: write the trained model file here when it finishes")
    parser.add_argument("--resume", default=None, metavar="NODE",
                        help="train: go on from a stopped training (pk or uuid of its TrainCalculation, or of the "
                             "workchain around it)")


def read_overrides(text):
    """The overrides dict from JSON text or from a .json / .yaml file; InputError when it is neither."""
    if text is None:
        return None
    path = pathlib.Path(text)
    try:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            import yaml

            overrides = yaml.safe_load(path.read_text())
        else:
            overrides = json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError, OSError
        raise InputError(f"--overrides: neither JSON text nor a readable JSON/YAML file ({error})") from error
    if not isinstance(overrides, dict):
        raise InputError(f"--overrides: expected a mapping, got {type(overrides).__name__}")
    return overrides


def read_structure_files(paths):
    """`[(file, StructureData)]` of every structure in every file; InputError on a missing or unreadable file."""
    from polmodel.workflows.structures import read_structures

    structures = []
    for path in paths:
        try:
            structures.extend((path, structure) for structure in read_structures(path))
        except (ValueError, TypeError) as error:
            raise InputError(str(error)) from error
    return structures


def load_code(label, option):
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    try:
        return orm.load_code(label)
    except (NotExistent, MultipleObjectsError, ValueError) as error:
        raise InputError(f"{option} {label}: {error} (`verdi code list` shows the codes; `make setup` creates "
                         "pw@localhost, ph@localhost and polmodel@localhost)") from error


def build(args):
    """The builders to launch, `[(description, builder)]`: one loop on all structures, or one field-response /
    DFPT workchain per structure. InputError for any bad input, before anything is stored."""
    if args.workflow == "continue":
        return [build_continuation(args)]
    if args.workflow == "train":
        return [build_training(args)]
    if args.output or args.resume:
        raise InputError("--output and --resume go with `train`")
    if args.max_iterations is not None:
        raise InputError("--max-iterations goes with `continue`; a new loop takes max_iterations from --overrides")
    overrides = read_overrides(args.overrides)
    structures = read_structure_files(args.structure_files)
    pw_code = load_code(args.pw_code, "--pw-code")
    try:
        if args.workflow == "active-learning":
            from polmodel.workflows.active_learning import ActiveLearningWorkChain
            from polmodel.workflows.structures import as_structure_namespace

            builder = ActiveLearningWorkChain.get_builder_from_protocol(
                pw_code, load_code(args.polmodel_code, "--polmodel-code"),
                as_structure_namespace([structure for _, structure in structures]),
                protocol=args.protocol, overrides=overrides, pseudo_family=args.pseudo_family)
            return [(f"active learning on {len(structures)} structure(s)", builder)]
        from polmodel.workflows.field_response import FieldResponseWorkChain

        ph_code = load_code(args.ph_code, "--ph-code") if args.workflow == "dfpt" else None
        builders = []
        for path, structure in structures:
            builder = FieldResponseWorkChain.get_builder_from_protocol(
                pw_code, structure, protocol=args.protocol, overrides=overrides, pseudo_family=args.pseudo_family)
            if ph_code is not None:
                from polmodel.workflows.dfpt import DfptWorkChain

                # DfptWorkChain has no protocol of its own: it takes the field-response protocol's scf settings
                builder = DfptWorkChain.get_builder_from_field_response(builder, ph_code)
            builders.append((f"{args.workflow} of {structure.get_formula()} from {path}", builder))
        return builders
    except ValueError as error:
        raise InputError(str(error)) from error


def build_continuation(args):
    """The builder of a loop that goes on from a finished one (ActiveLearningWorkChain.get_builder_continuing): the
    first positional is the loop, further structure files are extra MD starting points, --overrides changes the
    new loop's inputs in the shape of its input ports."""
    if args.protocol or args.pseudo_family:
        raise InputError("continue LOOP takes the finished loop's protocol and pseudopotentials: no --protocol or "
                         "--pseudo-family (its inputs change through --overrides, in the shape of the loop's ports)")
    loop, extra_files = args.structure_files[0], args.structure_files[1:]
    if args.max_iterations is not None and args.max_iterations < 1:
        raise InputError(f"--max-iterations must be >= 1, got {args.max_iterations}")
    overrides = read_overrides(args.overrides)
    structures = [structure for _, structure in read_structure_files(extra_files)] if extra_files else None
    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    pw_code = load_code(args.pw_code, "--pw-code")
    polmodel_code = load_code(args.polmodel_code, "--polmodel-code")
    try:
        builder = ActiveLearningWorkChain.get_builder_continuing(loop, args.max_iterations, pw_code=pw_code,
                                                                 polmodel_code=polmodel_code, overrides=overrides,
                                                                 structures=structures)
    except ValueError as error:
        raise InputError(f"continue {loop}: {error}") from error
    return (f"active learning continuing loop {loop}", builder)


def stopped_training_checkpoint(identifier):
    """The `checkpoint` output of a stopped TrainCalculation (or of the last one under a workchain)."""
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    try:
        node = orm.load_node(identifier)
    except (NotExistent, MultipleObjectsError, ValueError) as error:
        raise InputError(f"--resume {identifier}: {error}") from error
    calculations = [node] if isinstance(node, orm.CalcJobNode) else [
        child for child in node.called_descendants if isinstance(child, orm.CalcJobNode)]
    for calculation in sorted(calculations, key=lambda calculation: calculation.ctime, reverse=True):
        if "checkpoint" in calculation.outputs:
            return calculation.outputs.checkpoint
    raise InputError(f"--resume {identifier}: no training under it left a checkpoint (it finished, or it never "
                     "ran with `checkpoint: true`)")


def build_training(args):
    """The builder of an ensemble training on a source card's published frames (external_training)."""
    from polmodel.cli import check_output_file

    if len(args.structure_files) != 1 or args.overrides or args.protocol or args.pseudo_family \
            or args.max_iterations is not None:
        raise InputError("train takes one source card (YAML) and no --protocol, --overrides, --pseudo-family or "
                         "--max-iterations: the card holds the training settings")
    if args.output:
        if args.daemon:
            raise InputError("--output writes the model when the training ends here: leave out --daemon (or take "
                             "the model from the workchain's `model` output later)")
        check_output_file(args.output, "--output")
    from polmodel.workflows.external_training import get_builder_from_card, read_source_card

    try:
        card = read_source_card(args.structure_files[0])
    except ValueError as error:
        raise InputError(str(error)) from error
    checkpoint = stopped_training_checkpoint(args.resume) if args.resume else None
    polmodel_code = load_code(args.polmodel_code, "--polmodel-code")
    try:
        builder = get_builder_from_card(card, polmodel_code, checkpoint=checkpoint)
    except ValueError as error:   # the file's content is not the recorded one, or its labels are refused
        raise InputError(f"{args.structure_files[0]}: {error}") from error
    return (f"training on {card['origin']['repository']} {card['origin']['path']}", builder)


def write_trained_model(node, path):
    """Write the model a finished training workchain made to `path`."""
    if path and "model" in node.outputs:
        node.outputs.model.write(path)
        print(f"wrote {path} (ModelData<{node.outputs.model.pk}>)")


def follow_commands(pk):
    return [f"verdi process status {pk}", f"verdi process report {pk}", f"verdi process show {pk}"]


def start_daemon_if_needed():
    """Start the profile's AiiDA daemon (one worker) when it is not running; InputError when it cannot be."""
    from aiida.engine.daemon.client import get_daemon_client

    client = get_daemon_client()
    if client.is_daemon_running:
        return
    print("the AiiDA daemon is not running: starting it with one worker (`verdi daemon stop` stops it)", flush=True)
    try:
        client.start_daemon(number_workers=1)
    except Exception as error:  # circus and the process launcher raise many kinds
        raise InputError(f"the AiiDA daemon is not running and could not be started ({error}): start it with "
                         f"`verdi -p {client.profile.name} daemon start`") from None
    if not client.is_daemon_running:
        raise InputError(f"the AiiDA daemon did not start: start it with `verdi -p {client.profile.name} daemon "
                         "start` and look at `verdi daemon logshow`")


def run(args):
    # AiiDA is imported here only, so that `polmodel --help` and the other sub-commands stay fast.
    from aiida import engine

    load_aiida_profile(args.profile)
    builders = build(args)
    if args.daemon:
        start_daemon_if_needed()
        for description, builder in builders:
            node = engine.submit(builder)
            print(f"submitted {node.process_label}<{node.pk}> ({description}); follow it with:")
            for command in follow_commands(node.pk):
                print(f"    {command}")
        return 0
    status = 0
    from aiida.manage import get_manager

    # A run here needs no broker: with the embedded profile's ZeroMQ broker living inside the daemon, a runner that
    # asks for one fails when the daemon is stopped (the state `make setup` leaves). Without a broker the workchain
    # learns that its child ended by polling, by default every 60 s (`runner.poll.interval`): a field-response
    # workchain ended a minute after its pw.x run did. This runner polls every LOCAL_POLL_INTERVAL_S.
    runner = get_manager().create_runner(poll_interval=LOCAL_POLL_INTERVAL_S, communicator=None)
    try:
        for description, builder in builders:
            print(f"running {description} here (Ctrl-C stops it; --daemon submits instead)", flush=True)
            _, node = runner.run_get_node(builder)
            print(f"{node.process_label}<{node.pk}> finished with exit status {node.exit_status}; inspect it with:")
            write_trained_model(node, args.output)
            for command in follow_commands(node.pk):
                print(f"    {command}")
            status = status or (1 if node.exit_status else 0)
    finally:
        runner.close()
    return status
