"""Provenance questions a user asks about models and frames, answered from the AiiDA graph.

- `pw_runs_for_model(model)`: the pw.x calculations whose outputs flowed into a model (its data ancestry:
  ModelData <- TrainCalculation <- FramesData <- merge_frames <- ... <- PwCalculation).
- `models_trained_by(frames)` / `models_trained_by_source(uuid)`: the models whose training set contained a frame
  set, following only the dataset merges (a frame set that merely seeded an MD run does not count).
- `learning_curve(workchain)`: the iteration records of an active-learning loop (also while it still runs).
- `external_sources(model)`: the published files (repository, commit, path, sha256, licence) whose labels flowed
  into a model through `import_external_frames` (polmodel.plugins.external).

Every walk is breadth-first over the link table, one query per frontier (all of the frontier's nodes at once),
so its cost grows with the number of nodes reached. QueryBuilder's `with_ancestors` / `with_descendants` join a
recursive query that enumerates *paths*; the loop's merged datasets, each made from the previous one and from
labels of structures the previous model chose, give a number of paths that grows geometrically with the
iterations (a 3-iteration demo did not answer within 5 minutes).
"""
import re

from aiida import orm
from aiida.common.exceptions import NotExistent
from aiida.common.links import LinkType
from aiida.manage import get_manager

from polmodel.plugins.data import FramesData, ModelData

PW_PROCESS_TYPE = "aiida.calculations:quantumespresso.pw"
TRAIN_PROCESS_TYPE = "aiida.calculations:polmodel.train"
MERGE_FUNCTION_LABEL = "merge_frames"
IMPORT_FUNCTION_LABEL = "import_external_frames"
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


def nodes_by_pk(pks, node_class=orm.Node, filters=None):
    """The stored nodes of class `node_class` among `pks` (with extra `filters`), oldest first."""
    nodes = []
    for chunk in _chunks(pks):
        builder = orm.QueryBuilder()
        builder.append(node_class, filters={"id": {"in": chunk}, **(filters or {})}, project="*")
        nodes.extend(builder.all(flat=True))
    return sorted(nodes, key=lambda node: (node.ctime, node.pk))


def load_model(identifier):
    """A ModelData from a pk, UUID (prefix) or node; TypeError if the node is something else."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if not isinstance(node, ModelData):
        raise TypeError(f"node {node.pk} is a {type(node).__name__}, not a ModelData (polmodel.nn.model)")
    return node


def load_frames(identifier):
    """A FramesData from a pk, UUID (prefix) or node; TypeError if the node is something else."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if not isinstance(node, FramesData):
        raise TypeError(f"node {node.pk} is a {type(node).__name__}, not a FramesData (polmodel.data.frames)")
    return node


def labelled_frames(identifier):
    """(frames as ase.Atoms with their labels, description) of a FramesData, of a loop's `dataset` output, of the
    frames a ModelData was trained on, or of every FramesData in a group (pk, UUID or group label). Each frame's
    info['source'] keeps the uuid of the node that produced its label; info['frames_node'] names the FramesData
    it was read from."""
    node = None
    try:
        node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    except NotExistent:
        group = orm.load_group(identifier)
        sets = [member for member in group.nodes if isinstance(member, FramesData)]
        description = f"group {group.label}: {len(sets)} frame set(s)"
    else:
        if isinstance(node, FramesData):
            sets, description = [node], f"FramesData<{node.pk}>"
        elif _is_loop(node):
            if "dataset" not in node.outputs:
                raise TypeError(f"loop {node.pk} has no dataset output yet (it has not finished)")
            sets, description = [node.outputs.dataset], f"the dataset of loop {node.pk}"
        elif isinstance(node, ModelData):
            training = training_calculation(node)
            if training is None or "frames" not in training.inputs:
                raise TypeError(f"ModelData {node.pk} was not made by a TrainCalculation: no frames to write")
            sets, description = [training.inputs.frames], f"the training frames of ModelData {node.pk}"
        else:
            raise TypeError(f"node {node.pk} is a {type(node).__name__}: give a FramesData, a loop, a ModelData or "
                            "a group")
    frames = []
    for frame_set in sets:
        for atoms in frame_set.get_atoms():
            atoms.info["frames_node"] = frame_set.uuid
            frames.append(atoms)
    return frames, description


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


def external_sources(model):
    """One record per published file (by sha256) among a model's data ancestors: the origin its import recorded
    (repository, commit, path, sha256, licence, ...) and `imports`, the (stored file, FramesData) pairs of every
    `import_external_frames` of it (a resumed training may carry two imports of one file)."""
    model = load_model(model)
    imports = nodes_by_pk(data_ancestors(model), orm.CalcFunctionNode,
                          filters={"attributes.process_label": IMPORT_FUNCTION_LABEL})
    records = {}
    for node in imports:
        origin = node.inputs.origin.get_dict()
        origin.pop("licence_text", None)
        record = records.setdefault(origin["sha256"], {**origin, "imports": []})
        record["imports"].append((node.inputs.source, node.outputs.result))
    return list(records.values())


def format_external_sources(records):
    """The published files of `external_sources`, one block each."""
    lines = []
    for record in records:
        lines += [f"{record['repository']} @ {record['commit']}",
                  f"    path     {record['path']}",
                  f"    sha256   {record['sha256']}",
                  f"    licence  {record['licence']}"]
        if record.get("note"):
            lines.append(f"    note     {record['note']}")
        for source, frames in record["imports"]:
            lines.append(f"    stored   SinglefileData<{source.pk}> {source.uuid} -> FramesData<{frames.pk}> "
                         f"({frames.count} frames)")
    return "\n".join(lines)


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


# the validation-metric names of polmodel.training.losses (dipole: the folded cell dipole per atom, the trained P label)
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


# --- a drawing a person can read ------------------------------------------------------------------------------

ACTIVE_LEARNING_LABEL = "ActiveLearningWorkChain"
# the loop's call-link labels of its steps (ActiveLearningWorkChain.submit_labels / run_train / run_explore)
_STEP_PATTERNS = (
    ("labelling", re.compile(r"^label_initial_"), 0),
    # a continued loop's first labelling: the candidates the previous loop selected but did not label
    ("labelling", re.compile(r"^label_pending_"), 0),
    ("labelling", re.compile(r"^label_iter(\d+)_"), None),
    ("training", re.compile(r"^train_iteration_(\d+)$"), None),
    ("exploration", re.compile(r"^explore_iteration_(\d+)$"), None),
)


def _is_loop(node):
    return isinstance(node, orm.WorkChainNode) and node.process_label == ACTIVE_LEARNING_LABEL


def find_loop(identifier):
    """The ActiveLearningWorkChain `identifier` names, or the one whose training made the model it names."""
    node = identifier if isinstance(identifier, orm.Node) else orm.load_node(identifier)
    if _is_loop(node):
        return node
    if isinstance(node, ModelData):
        caller = node.creator
        while caller is not None:
            if _is_loop(caller):
                return caller
            caller = caller.caller
        raise TypeError(f"ModelData {node.pk} was not trained by an active-learning loop")
    raise TypeError(f"node {node.pk} is a {type(node).__name__}, neither an ActiveLearningWorkChain nor a ModelData")


def _step_of(call_label):
    """(kind, iteration) of a loop step from its call-link label, or None for the loop's own calcfunctions."""
    for kind, pattern, iteration in _STEP_PATTERNS:
        match = pattern.match(call_label)
        if match:
            return kind, iteration if iteration is not None else int(match.group(1))
    return None


def _node_facts(pks, *fields):
    """`{pk: {field: value}}` for the projected `fields` of the nodes `pks` (one query per chunk)."""
    facts = {}
    for chunk in _chunks(pks):
        builder = orm.QueryBuilder().append(orm.Node, filters={"id": {"in": chunk}}, project=["id", *fields])
        facts.update((row[0], dict(zip(fields, row[1:]))) for row in builder.iterall())
    return facts


def loop_summary(loop):
    """The loop's steps and the data between them, summarised: `(steps, data, edges)`.

    steps: `{(kind, iteration): {"members": [pk], "pw_runs": n, "failed_pw_runs": n, "calculations": n}}`, one per
    labelling / training / exploration of each iteration; data: `{pk: facts}` for the datasets, models and
    candidate sets passed between steps and the loop's structure inputs; edges: `{(source, target): n}` where a
    source or target is a step key or a data pk, n the number of links it stands for. The loop's own
    calcfunctions (merges, candidate structures, summaries) are not drawn: their inputs link to their outputs.
    """
    loop = find_loop(loop)
    with _one_transaction():
        children = linked_pks({loop.pk}, CALL_LINKS, upstream=False)
        step_of_child = {child: _step_of(label) for _, child, label in children}
        glue = {child for child, step in step_of_child.items() if step is None}
        steps = {}
        for child, step in step_of_child.items():
            if step is not None:
                steps.setdefault(step, {"members": [], "pw_runs": 0, "failed_pw_runs": 0, "calculations": 0})
                steps[step]["members"].append(child)
        # every process under each step, by breadth-first walk over call links, remembering the step
        owner = {child: step for child, step in step_of_child.items() if step is not None}
        frontier = set(owner)
        while frontier:
            called = linked_pks(frontier, CALL_LINKS, upstream=False)
            frontier = set()
            for parent, child, _ in called:
                if child not in owner:
                    owner[child] = owner[parent]
                    frontier.add(child)
        for pk, facts in _node_facts(set(owner), "node_type", "process_type", "attributes.exit_status").items():
            step = steps[owner[pk]]
            if facts["node_type"].startswith("process.calculation.calcjob."):
                step["calculations"] += 1
            if facts["process_type"] == PW_PROCESS_TYPE:
                step["pw_runs"] += 1
                step["failed_pw_runs"] += facts["attributes.exit_status"] not in (0, None)

        tops = {pk: step for pk, step in owner.items() if pk in step_of_child}
        step_inputs = linked_pks(set(tops), (LinkType.INPUT_WORK, LinkType.INPUT_CALC), upstream=True)
        step_outputs = linked_pks(set(tops), (LinkType.RETURN, LinkType.CREATE), upstream=False)
        glue_inputs = linked_pks(glue, (LinkType.INPUT_CALC,), upstream=True)
        glue_outputs = linked_pks(glue, (LinkType.CREATE,), upstream=False)
        loop_inputs = linked_pks({loop.pk}, (LinkType.INPUT_WORK,), upstream=True)
        involved = ({data for _, data, _ in step_inputs | step_outputs | glue_inputs | glue_outputs | loop_inputs})
        facts = _node_facts(involved, "node_type", "attributes.count", "attributes.ensemble_size")

    # a labelling's frame sets are summed up in its step; the merged datasets after it are drawn
    labelled = {output for top, output, _ in step_outputs if tops[top][0] == "labelling"}
    loop_input_pks = {source for _, source, _ in loop_inputs}

    def drawn(pk):
        kind = facts[pk]["node_type"]
        return (kind.endswith(("FramesData.", "ModelData.")) and pk not in labelled) or (
            kind.endswith("StructureData.") and pk in loop_input_pks)

    data = {pk: facts[pk] for pk in involved if drawn(pk)}
    produced_by = {}  # undrawn data -> the steps that returned it
    for top, output, _ in step_outputs:
        produced_by.setdefault(output, set()).add(tops[top])
    consumed_by = {}  # undrawn data -> the steps that took it
    for top, source, _ in step_inputs:
        consumed_by.setdefault(source, set()).add(tops[top])
    edges = {}

    def add(source, target):
        edges[(source, target)] = edges.get((source, target), 0) + 1

    for top, source, _ in step_inputs:
        if source in data:
            add(source, tops[top])
    for top, output, _ in step_outputs:
        if output in data:
            add(tops[top], output)
    glue_in, glue_out = {}, {}
    for function, source, _ in glue_inputs:
        glue_in.setdefault(function, set()).add(source)
    for function, output, _ in glue_outputs:
        glue_out.setdefault(function, set()).add(output)
    for function in glue:
        sources = [(s,) if s in data else tuple(produced_by.get(s, ())) for s in glue_in.get(function, ())]
        targets = [(t,) if t in data else tuple(consumed_by.get(t, ())) for t in glue_out.get(function, ())]
        for source in (s for group in sources for s in group):
            for target in {t for group in targets for t in group}:
                add(source, target)
    # collapse the loop's structure inputs into one node
    structures = sorted(pk for pk in data if data[pk]["node_type"].endswith("StructureData."))
    if structures:
        key = ("structures", len(structures))
        for (source, target), count in list(edges.items()):
            if source in structures:
                del edges[(source, target)]
                edges[(key, target)] = edges.get((key, target), 0) + count
        for pk in structures:
            del data[pk]
        data[key] = {"node_type": "structures", "count": len(structures)}
    return steps, data, edges


def _step_label(step, facts):
    kind, iteration = step
    lines = [f"{kind} {iteration}"]
    if kind == "labelling":
        lines.append(f"{len(facts['members'])} structure(s)")
        failed = f" ({facts['failed_pw_runs']} failed)" if facts["failed_pw_runs"] else ""
        lines.append(f"{facts['pw_runs']} pw.x runs{failed}")
    elif kind == "exploration":
        lines.append(f"{facts['calculations']} MD run(s)")
    else:
        lines.append(f"{facts['calculations']} training job(s)")
    lines.append(" ".join(f"<{pk}>" for pk in sorted(facts["members"])[:3]) + (" ..." if len(facts["members"]) > 3 else ""))
    return "\n".join(lines)


def _data_label(pk, facts):
    kind = facts["node_type"]
    if kind == "structures":
        return f"{facts['count']} initial structure(s)"
    if kind.endswith("ModelData."):
        return f"ModelData<{pk}>\nensemble of {facts['attributes.ensemble_size']}"
    return f"FramesData<{pk}>\n{facts['attributes.count']} frame(s)"


def loop_graph(loop, highlight=None):
    """A graphviz Digraph of `loop_summary(loop)`: steps as boxes, data as ellipses, `highlight` (a pk) in bold."""
    import graphviz

    steps, data, edges = loop_summary(loop)
    loop = find_loop(loop)
    pw_runs = sum(facts["pw_runs"] for facts in steps.values())
    graph = graphviz.Digraph(name=f"loop_{loop.pk}", graph_attr={
        "rankdir": "TB", "label": f"ActiveLearningWorkChain<{loop.pk}>: {sum(kind == 'training' for kind, _ in steps)} iteration(s), "
        f"{pw_runs} pw.x runs", "labelloc": "t", "fontname": "Helvetica"},
        node_attr={"fontname": "Helvetica", "fontsize": "10"}, edge_attr={"fontname": "Helvetica", "fontsize": "9"})
    colours = {"labelling": "#fde0c5", "training": "#c6dbef", "exploration": "#c7e9c0"}
    name = lambda key: "_".join(map(str, key)) if isinstance(key, tuple) else f"N{key}"  # noqa: E731
    for step, facts in sorted(steps.items(), key=lambda item: (item[0][1], item[0][0])):
        graph.node(name(step), _step_label(step, facts), shape="box", style="rounded,filled", fillcolor=colours[step[0]])
    for pk, facts in data.items():
        bold = {"penwidth": "3", "color": "#b2182b"} if pk == highlight else {}
        graph.node(name(pk), _data_label(pk, facts), shape="ellipse", **bold)
    for (source, target), count in sorted(edges.items(), key=str):
        graph.edge(name(source), name(target), label=f"×{count}" if count > 1 else "")
    return graph


def draw_loop(loop_or_model, output):
    """Render the drawing of the loop `loop_or_model` names into `output` (.png, .svg, .pdf or .dot)."""
    import pathlib

    node = loop_or_model if isinstance(loop_or_model, orm.Node) else orm.load_node(loop_or_model)
    graph = loop_graph(node, highlight=node.pk if isinstance(node, ModelData) else None)
    output = pathlib.Path(output)
    if output.suffix == ".dot":
        output.write_text(graph.source)
    else:
        graph.render(outfile=str(output), cleanup=True)
    return graph
