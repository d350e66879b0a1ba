"""Ask the AiiDA provenance graph about models and frames (`polmodel provenance pw-runs|models|learning-curve|graph`).

Examples:
    polmodel provenance pw-runs 1234              # which pw.x runs fed model 1234
    polmodel provenance models --frames 567       # which models were trained on FramesData 567
    polmodel provenance models --source UUID      # ... on the frames labelled by node UUID (frame info 'source')
    polmodel provenance sources 1234              # the published files (repository, commit, sha256) behind model 1234
    polmodel provenance learning-curve 890        # the iterations of active-learning loop 890
    polmodel provenance graph 890 --output loop.svg   # loop 890 drawn: one box per labelling/training/exploration
    polmodel provenance check-archive campaign.aiida  # exit 1 if a cached run's original is not in the archive
    polmodel provenance reproduce-cached campaign.aiida  # after importing it: rerun those with caching off
"""
import re

from polmodel.cli import InputError, check_input_file, check_output_file, load_aiida_profile

# a node's pk (positive integer) or its UUID (or a unique prefix of one, as verdi accepts)
_IDENTIFIER = re.compile(r"^([1-9][0-9]*|[0-9a-fA-F]{4,8}(-[0-9a-fA-F]{0,4}){0,3}(-[0-9a-fA-F]{0,12})?)$")


def add_arguments(parser):
    parser.add_argument("--profile", default=None, help="AiiDA profile (default: the default profile)")
    sub = parser.add_subparsers(dest="question", required=True)
    pw_runs = sub.add_parser("pw-runs", help="the pw.x calculations whose outputs fed a model")
    pw_runs.add_argument("model", help="pk or UUID of a ModelData")
    sources = sub.add_parser("sources", help="the published data files (repository, commit, path, sha256, licence) "
                                             "whose labels trained a model")
    sources.add_argument("model", help="pk or UUID of a ModelData")
    models = sub.add_parser("models", help="the models trained on a frame set or on one source's frames")
    which = models.add_mutually_exclusive_group(required=True)
    which.add_argument("--frames", help="pk or UUID of a FramesData")
    which.add_argument("--source", help="UUID in a frame's info['source'] (the node that produced the label)")
    curve = sub.add_parser("learning-curve", help="dataset size, validation errors, candidate fraction per iteration")
    curve.add_argument("workchain", help="pk or UUID of an ActiveLearningWorkChain")
    frames = sub.add_parser("frames", help="write labelled frames out of the graph to extended XYZ (for polmodel "
                                           "train and evaluate), each with the uuid of the node that labelled it")
    frames.add_argument("node", help="pk or UUID of a FramesData, a loop (its dataset), a ModelData (its training "
                                     "frames), or a group's label")
    frames.add_argument("--output", required=True, help="extended-XYZ file to write")
    graph = sub.add_parser("graph", help="draw a loop: each iteration's labelling, training, exploration as one node")
    graph.add_argument("node", help="pk or UUID of an ActiveLearningWorkChain, or of a ModelData one of its trainings made")
    graph.add_argument("--output", default=None, help="FILE.svg, .png, .pdf or .dot (default: loop_<pk>.svg)")
    check = sub.add_parser("check-archive", help="an archive file's cached calculations: is each one's original run "
                                                 "(or a rerun that reproduces it) in the archive? exit 1 if not")
    check.add_argument("archive", help="a file written by `verdi archive create` (read, not imported)")
    reproduce = sub.add_parser("reproduce-cached", help="rerun with caching off, in the profile the archive was "
                                                        "imported into, every cached calculation of it whose "
                                                        "original is missing (then export again)")
    reproduce.add_argument("archive", help="the archive file that was imported")


GRAPH_FORMATS = (".svg", ".png", ".pdf", ".dot")


def _check_inputs(args):
    """A node identifier that is neither a pk nor a UUID, or a profile that does not exist: InputError."""
    for name in ("model", "frames", "source", "workchain"):
        value = getattr(args, name, None)
        if value is not None and not _IDENTIFIER.match(value.strip()):
            raise InputError(f"{value!r} is neither a node pk (a positive integer) nor a UUID")
    if args.question == "frames":
        check_output_file(args.output, "--output")
    load_aiida_profile(args.profile)


def _check_archive(args):
    """check-archive reads the file itself and needs no profile: 0 when every cached run's original is there."""
    check_input_file(args.archive, "archive")
    from aiida.common.exceptions import CorruptStorage, IncompatibleStorageSchema

    from polmodel.workflows.cached_runs import cached_runs_in_archive
    try:
        report = cached_runs_in_archive(args.archive)
    except CorruptStorage as error:
        raise InputError(f"archive {args.archive} is not an AiiDA archive ({error})") from error
    except IncompatibleStorageSchema as error:
        raise InputError(f"archive {args.archive} has an older format: `verdi archive migrate` it first "
                         f"({str(error).splitlines()[0]})") from error
    print(report.summary())
    return 0 if report.whole else 1


def run(args):
    from polmodel.cli import InputError

    if args.question == "check-archive":
        return _check_archive(args)
    if args.question == "graph" and args.output:
        if not args.output.endswith(GRAPH_FORMATS):
            raise InputError(f"--output {args.output}: the drawing is written as {', '.join(GRAPH_FORMATS)}")
        check_output_file(args.output, "--output")
    # AiiDA is imported here only: `import polmodel` and the other sub-commands never need it.
    _check_inputs(args)
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    from polmodel.workflows import provenance

    try:
        if args.question == "pw-runs":
            nodes = provenance.pw_runs_for_model(args.model)
            print(f"{len(nodes)} pw.x calculation(s) fed ModelData {args.model}:")
            print(provenance.format_calculations(nodes))
        elif args.question == "sources":
            records = provenance.external_sources(args.model)
            print(f"{len(records)} published data file(s) fed ModelData {args.model}" + (":" if records else ""))
            if records:
                print(provenance.format_external_sources(records))
        elif args.question == "models":
            models = (provenance.models_trained_by(args.frames) if args.frames
                      else provenance.models_trained_by_source(args.source))
            print(f"{len(models)} model(s) trained on it:")
            for model in models:
                print(f"{model.pk:>6}  {model.uuid}  {model.kind} x{model.ensemble_size}  {model.ctime:%Y-%m-%d %H:%M}")
        elif args.question == "frames":
            from polmodel.data.frames import write_frames
            frames, description = provenance.labelled_frames(args.node)
            write_frames(args.output, frames)
            print(f"wrote {len(frames)} labelled frame(s) of {description} to {args.output}")
        elif args.question == "reproduce-cached":
            from polmodel.workflows.cached_runs import reproduce_missing_originals
            check_input_file(args.archive, "archive")
            reruns = reproduce_missing_originals(args.archive)
            print(f"{len(reruns)} cached calculation(s) rerun with caching off")
        elif args.question == "learning-curve":
            print(provenance.format_learning_curve(provenance.learning_curve(args.workchain)))
        else:
            loop = provenance.find_loop(args.node)
            output = args.output or f"loop_{loop.pk}.svg"
            provenance.draw_loop(args.node, output)
            print(f"wrote {output} (ActiveLearningWorkChain<{loop.pk}>)")
    except (NotExistent, MultipleObjectsError, TypeError) as error:
        raise InputError(str(error).splitlines()[0]) from error
    return 0
