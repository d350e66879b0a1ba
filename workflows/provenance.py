"""Provenance questions a user asks about models and frames, answered from the AiiDA graph.

- `pw_runs_for_model(model)`: the pw.x calculations whose outputs flowed into a model (its data ancestry:
  ModelData <- TrainCalculation <- FramesData <- merge_frames <- ... <- PwCalculation).
- `models_trained_by(frames)` / `models_trained_by_source(uuid)`: the models whose training set contained a frame
  set, following only the dataset merges (a frame set that merely seeded an MD run does not count).
- `learning_curve(workchain)`: the iteration records of an active-learning loop (also while it still runs).
"""
from aiida import orm
from aiida.common.links import LinkType

from polmodel.plugins.data import FramesData, ModelData

PW_PROCESS_TYPE = "aiida.calculations:quantumespresso.pw"
TRAIN_PROCESS_TYPE = "aiida.calculations:polmodel.train"
MERGE_FUNCTION_LABEL = "merge_frames"


def load_model(identifier):
    """A ModelData from a pk, UUID (prefix) or node; TypeError if the node is something else."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if not isinstance(node, ModelData):
        raise TypeError(f"node {node.pk} is a {type(node).__name__}, not a ModelData (polmodel.model)")
    return node


def pw_runs_for_model(model):
    """The PwCalculation nodes among the data-provenance ancestors of `model`, oldest first."""
    model = load_model(model)
    builder = orm.QueryBuilder()
    builder.append(ModelData, filters={"id": model.pk}, tag="model")
    builder.append(orm.CalcJobNode, with_descendants="model", filters={"process_type": PW_PROCESS_TYPE},
                   project="*", tag="pw")
    builder.order_by({"pw": {"ctime": "asc"}})
    return builder.all(flat=True)


def training_calculation(model):
    """The TrainCalculation that created `model`, or None (e.g. a model imported from a file)."""
    model = load_model(model)
    creator = model.creator
    if creator is not None and creator.process_type == TRAIN_PROCESS_TYPE:
        return creator
    return None


def datasets_containing(frames):
    """`frames` and every FramesData made from it by merges (transitively)."""
    seen = {frames.pk: frames}
    frontier = [frames]
    while frontier:
        node = frontier.pop()
        for link in node.base.links.get_outgoing(link_type=LinkType.INPUT_CALC).all():
            function = link.node
            if function.process_label != MERGE_FUNCTION_LABEL:
                continue
            for created in function.base.links.get_outgoing(link_type=LinkType.CREATE).all():
                if isinstance(created.node, FramesData) and created.node.pk not in seen:
                    seen[created.node.pk] = created.node
                    frontier.append(created.node)
    return list(seen.values())


def models_trained_by(frames):
    """The ModelData nodes whose TrainCalculation was given `frames` or a merge containing it, oldest first."""
    frames = frames if isinstance(frames, orm.Node) else orm.load_node(frames)
    if not isinstance(frames, FramesData):
        raise TypeError(f"node {frames.pk} is a {type(frames).__name__}, not a FramesData (polmodel.frames)")
    dataset_pks = [node.pk for node in datasets_containing(frames)]
    builder = orm.QueryBuilder()
    builder.append(FramesData, filters={"id": {"in": dataset_pks}}, tag="frames")
    builder.append(orm.CalcJobNode, with_incoming="frames", filters={"process_type": TRAIN_PROCESS_TYPE}, tag="train")
    builder.append(ModelData, with_incoming="train", project="*", tag="model")
    builder.order_by({"model": {"ctime": "asc"}})
    return builder.distinct().all(flat=True)


def frame_sets_with_source(source_uuid):
    """The FramesData nodes listing `source_uuid` (the node that produced a label) among their sources."""
    builder = orm.QueryBuilder()
    builder.append(FramesData, project="*")
    return [node for node in builder.all(flat=True) if source_uuid in (node.sources or [])]


def models_trained_by_source(source_uuid):
    """The models trained on any frame whose label came from the node `source_uuid` (e.g. a pw.x run)."""
    models = {}
    for frames in frame_sets_with_source(source_uuid):
        for model in models_trained_by(frames):
            models[model.pk] = model
    return [models[pk] for pk in sorted(models)]


def learning_curve(workchain):
    """The iteration records (dicts) of an ActiveLearningWorkChain, finished or still running, in order."""
    node = workchain if isinstance(workchain, orm.Node) else orm.load_node(workchain)
    if not isinstance(node, orm.WorkChainNode) or "ActiveLearning" not in (node.process_label or ""):
        raise TypeError(f"node {node.pk} is not an ActiveLearningWorkChain")
    if "learning_curve" in node.outputs:
        return node.outputs.learning_curve.get_dict()["iterations"]
    records = []
    for link in node.base.links.get_outgoing(link_type=LinkType.RETURN).all():
        if link.link_label.startswith("iterations__"):
            records.append(link.node.get_dict())
    return sorted(records, key=lambda record: record["iteration"])


# the validation-metric names of polmodel.losses (dipole: the folded cell dipole per atom, the trained P label)
LEARNING_CURVE_QUANTITIES = ("energy", "forces", "dipole", "born_effective_charges")


def format_learning_curve(records):
    """A text table: iteration, dataset size, validation MAE of E, F, P, Z*, candidate / failed fractions."""
    header = ["iter", "frames"] + [f"MAE {q[:12]}" for q in LEARNING_CURVE_QUANTITIES] + ["cand.", "failed", "conv."]
    rows = [header]
    for record in records:
        validation = record.get("validation", {})
        maes = [f"{validation[q]['mae']:.4g}" if q in validation else "-" for q in LEARNING_CURVE_QUANTITIES]
        rows.append([str(record["iteration"]), str(record["dataset_size"]), *maes,
                     f"{record['candidate_fraction']:.3f}", f"{record['failed_fraction']:.3f}",
                     "yes" if record["converged"] else "no"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def format_calculations(nodes):
    """A text table of calculation nodes: pk, uuid, exit status, call link label, formula."""
    lines = [f"{'pk':>6}  {'uuid':36}  {'exit':>4}  {'formula':10}  call label"]
    for node in nodes:
        structure = node.inputs.structure if "structure" in node.inputs else None
        formula = structure.get_formula() if structure is not None else "-"
        caller_link = node.base.links.get_incoming(link_type=LinkType.CALL_CALC).all()
        label = caller_link[0].link_label if caller_link else "-"
        lines.append(f"{node.pk:>6}  {node.uuid}  {str(node.exit_status):>4}  {formula:10}  {label}")
    return "\n".join(lines)
