"""Provenance questions a user asks about models and frames, answered from the AiiDA graph.

- `pw_runs_for_model(model)`: the pw.x calculations whose outputs flowed into a model (its data ancestry:
  ModelData <- TrainCalculation <- FramesData <- merge_frames <- ... <- PwCalculation).
- `models_trained_by(frames)` / `models_trained_by_source(uuid)`: the models whose training set contained a frame
  set, following only the dataset merges (a frame set that merely seeded an MD run does not count).
- `learning_curve(workchain)`: the iteration records of an active-learning loop (also while it still runs).

Every walk is breadth-first over the link table, one query per frontier (all of the frontier's nodes at once),
so its cost grows with the number of nodes reached. QueryBuilder's `with_ancestors` / `with_descendants` join a
recursive query that enumerates *paths*; the loop's merged datasets, each made from the previous one and from
labels of structures the previous model chose, give a number of paths that grows geometrically with the
iterations (a 3-iteration demo did not answer within 5 minutes).
"""
from aiida import orm
from aiida.common.links import LinkType
from aiida.manage import get_manager

from polmodel.plugins.data import FramesData, ModelData

PW_PROCESS_TYPE = "aiida.calculations:quantumespresso.pw"
TRAIN_PROCESS_TYPE = "aiida.calculations:polmodel.train"
MERGE_FUNCTION_LABEL = "merge_frames"
#: the links along which data flows (what `with_ancestors` follows): a calculation's inputs and its outputs
DATA_PROVENANCE_LINKS = (LinkType.INPUT_CALC, LinkType.CREATE)
#: the links from a workflow to the processes it called
CALL_LINKS = (LinkType.CALL_CALC, LinkType.CALL_WORK)
# Keeps each `IN (...)` list well inside SQLite's bound-parameter limit; PostgreSQL does not mind.
_QUERY_CHUNK = 900


def _chunks(pks):
    pks = sorted(pks)
    for start in range(0, len(pks), _QUERY_CHUNK):
        yield pks[start:start + _QUERY_CHUNK]


def _one_transaction():
    """One storage transaction around a series of queries: each query outside one opens and commits its own, and
    every commit expires every ORM object the session holds (in a process that holds a thousand nodes, most of a
    walk's time went there)."""
    return get_manager().get_profile_storage().transaction()


def linked_pks(pks, link_types, upstream):
    """`{(pk, neighbour_pk, link_label)}` for every link of `link_types` into (`upstream`) or out of the nodes
    `pks`: one query per chunk of pks, however many links."""
    pairs = set()
    neighbour_relation = "with_outgoing" if upstream else "with_incoming"
    for chunk in _chunks(pks):
        builder = orm.QueryBuilder()
        builder.append(orm.Node, filters={"id": {"in": chunk}}, project="id", tag="node")
        builder.append(orm.Node, project="id", edge_project="label",
                       edge_filters={"type": {"in": [link_type.value for link_type in link_types]}},
                       **{neighbour_relation: "node"})
        pairs.update((pk, neighbour, label) for pk, neighbour, label in builder.iterall())
    return pairs


def walk(start_pks, link_types, upstream):
    """The pks reached from `start_pks` (excluded unless reached again) along `link_types`, against the links'
    direction when `upstream`; breadth-first, each frontier in one query per chunk."""
    reached = set()
    frontier = set(start_pks)
    with _one_transaction():
        while frontier:
            neighbours = {neighbour for _, neighbour, _ in linked_pks(frontier, link_types, upstream)}
            frontier = neighbours - reached
            reached |= frontier
    return reached


def data_ancestors(node):
    """The pks of every node whose data flowed into `node` (what `with_descendants=node` would select)."""
    return walk({node.pk}, DATA_PROVENANCE_LINKS, upstream=True)


def called_descendants(pks):
    """The pks of every process called, directly or not, by the workflows `pks`."""
    return walk(set(pks), CALL_LINKS, upstream=False)


def nodes_by_pk(pks, node_class=orm.Node, filters=None, order_by_ctime=True):
    """The stored nodes of class `node_class` among `pks` (with extra `filters`), oldest first."""
    nodes = []
    for chunk in _chunks(pks):
        builder = orm.QueryBuilder()
        builder.append(node_class, filters={"id": {"in": chunk}, **(filters or {})}, project="*")
        nodes.extend(builder.all(flat=True))
    if order_by_ctime:
        nodes.sort(key=lambda node: (node.ctime, node.pk))
    return nodes


def load_model(identifier):
    """A ModelData from a pk, UUID (prefix) or node; TypeError if the node is something else."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if not isinstance(node, ModelData):
        raise TypeError(f"node {node.pk} is a {type(node).__name__}, not a ModelData (polmodel.model)")
    return node


def load_frames(identifier):
    """A FramesData from a pk, UUID (prefix) or node; TypeError if the node is something else."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if not isinstance(node, FramesData):
        raise TypeError(f"node {node.pk} is a {type(node).__name__}, not a FramesData (polmodel.frames)")
    return node


def pw_runs_for_model(model):
    """The PwCalculation nodes among the data-provenance ancestors of `model`, oldest first."""
    model = load_model(model)
    return nodes_by_pk(data_ancestors(model), orm.CalcJobNode, filters={"process_type": PW_PROCESS_TYPE})


def training_calculation(model):
    """The TrainCalculation that created `model`, or None (e.g. a model imported from a file)."""
    model = load_model(model)
    creator = model.creator
    if creator is not None and creator.process_type == TRAIN_PROCESS_TYPE:
        return creator
    return None


def datasets_containing(frame_sets):
    """The pks of the FramesData `frame_sets` (a node or several) and of every FramesData made from them by
    merges, transitively: breadth-first, one query per frontier (frame set -> merge_frames -> frame set)."""
    frame_sets = [frame_sets] if isinstance(frame_sets, orm.Node) else list(frame_sets)
    reached = {node.pk for node in frame_sets}
    frontier = set(reached)
    with _one_transaction():
        while frontier:
            merged = set()
            for chunk in _chunks(frontier):
                builder = orm.QueryBuilder()
                builder.append(FramesData, filters={"id": {"in": chunk}}, tag="frames")
                builder.append(orm.CalcFunctionNode, with_incoming="frames", tag="merge",
                               filters={"attributes.process_label": MERGE_FUNCTION_LABEL},
                               edge_filters={"type": LinkType.INPUT_CALC.value})
                builder.append(FramesData, with_incoming="merge", project="id",
                               edge_filters={"type": LinkType.CREATE.value})
                merged.update(builder.all(flat=True))
            frontier = merged - reached
            reached |= frontier
    return reached


def _models_trained_on(dataset_pks):
    """The ModelData created by a TrainCalculation that took one of `dataset_pks` as input, oldest first."""
    models = {}
    for chunk in _chunks(dataset_pks):
        builder = orm.QueryBuilder()
        builder.append(FramesData, filters={"id": {"in": chunk}}, tag="frames")
        builder.append(orm.CalcJobNode, with_incoming="frames", filters={"process_type": TRAIN_PROCESS_TYPE},
                       tag="train")
        builder.append(ModelData, with_incoming="train", project="*")
        models.update((model.pk, model) for model in builder.all(flat=True))
    return sorted(models.values(), key=lambda model: (model.ctime, model.pk))


def models_trained_by(frames):
    """The ModelData nodes whose TrainCalculation was given `frames` or a merge containing it, oldest first."""
    return _models_trained_on(datasets_containing(load_frames(frames)))


def frame_sets_with_source(source_uuid):
    """The FramesData nodes listing `source_uuid` (the node that produced a label) among their sources."""
    builder = orm.QueryBuilder()
    builder.append(FramesData, project=["id", "attributes.sources"])
    pks = [pk for pk, sources in builder.iterall() if source_uuid in (sources or [])]
    return nodes_by_pk(pks, FramesData)


def models_trained_by_source(source_uuid):
    """The models trained on any frame whose label came from the node `source_uuid` (e.g. a pw.x run)."""
    frame_sets = frame_sets_with_source(source_uuid)
    return _models_trained_on(datasets_containing(frame_sets)) if frame_sets else []


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
    """A text table of calculation nodes: pk, uuid, exit status, formula, call link label (two queries in all)."""
    pks = [node.pk for node in nodes]
    formulas = {}
    for chunk in _chunks(pks):
        builder = orm.QueryBuilder()
        builder.append(orm.CalcJobNode, filters={"id": {"in": chunk}}, project="id", tag="calculation")
        builder.append(orm.StructureData, with_outgoing="calculation", project="*",
                       edge_filters={"label": "structure", "type": LinkType.INPUT_CALC.value})
        formulas.update((pk, structure.get_formula()) for pk, structure in builder.iterall())
    call_labels = {pk: label for pk, _, label in linked_pks(pks, (LinkType.CALL_CALC,), upstream=True)}
    lines = [f"{'pk':>6}  {'uuid':36}  {'exit':>4}  {'formula':10}  call label"]
    for node in nodes:
        formula = formulas.get(node.pk, "-")
        label = call_labels.get(node.pk, "-")
        lines.append(f"{node.pk:>6}  {node.uuid}  {str(node.exit_status):>4}  {formula:10}  {label}")
    return "\n".join(lines)
