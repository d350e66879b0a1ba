"""A provenance graph with the shape the active-learning loop leaves behind, written straight into the
storage as node and link rows (no process runs; storing ~1,300 nodes one by one took 200 s on sqlite_dos), for tests of the provenance questions at the size of a 10-iteration loop.

Per DFT label (FieldResponseWorkChain-like): 10 pw.x runs (zero field, 3 Berry phases, ±ε along x, y, z), each a
PwBaseWorkChain calling a PwCalculation that takes the structure and the shared pseudopotential; calcfunctions
derive the polarization (Berry runs), the response (polarization + field runs) and the frames (everything). Per
iteration: merge_frames(previous dataset, new labels) -> dataset -> TrainEnsembleWorkChain -> TrainCalculation ->
model -> ExploreWorkChain -> MdCalculations -> select_from_trajectories -> candidates -> candidate_structures ->
structures, which the next labels start from. The diamonds (a label's structure feeds all of its runs and the
calcfunctions; each dataset feeds the next through the merge *and* through the model that chose the candidates)
are what make the number of provenance paths grow geometrically with the iterations.
"""
import datetime
import uuid as uuid_module

import numpy as np
from aiida import orm
from aiida.common.links import LinkType
from aiida.manage import get_manager
from aiida.orm.entities import EntityTypes

PW = "aiida.calculations:quantumespresso.pw"
TRAIN = "aiida.calculations:polmodel.train"
MD = "aiida.calculations:polmodel.md"
PW_RUN_LABELS = ("zero_field", "berry_phase_1", "berry_phase_2", "berry_phase_3",
                 "field_px", "field_mx", "field_py", "field_my", "field_pz", "field_mz")


class FakeLoopGraph:
    """Builds the graph; the attributes name the (loaded) nodes a test asks about."""

    def __init__(self, computer, iterations=10, structures_per_label_round=2, first_labels="label_initial"):
        """first_labels: the call-link prefix of the loop's first labelling: "label_initial" for a fresh loop,
        "label_pending" for a loop continued from another (it labels the candidates the previous loop left)."""
        from polmodel.plugins.data import FramesData, ModelData

        self.FramesData, self.ModelData = FramesData, ModelData
        self.computer = computer
        self.user = orm.User.collection.get_default()
        self._rows, self._links, self._attributes = [], [], {}
        self._clock = datetime.datetime.now(datetime.timezone.utc)
        structure = orm.StructureData(cell=np.eye(3) * 4.0)
        structure.append_atom(position=(0, 0, 0), symbols="Ba")
        self._structure_attributes = dict(structure.base.attributes.all)
        self.pw_runs = []  # every PwCalculation, in creation order
        self.label_frames = []  # [round][structure] FramesData returned by each label
        self.datasets, self.models, self.candidates = [], [], []
        self._build(iterations, structures_per_label_round, first_labels)
        self._store()

    # --- rows ---------------------------------------------------------------------------------------------------
    def _node(self, node_class, attributes=None, process_type=None, on_computer=False):
        uuid = str(uuid_module.uuid4())
        self._clock += datetime.timedelta(microseconds=10)  # strictly increasing ctime: creation order
        self._rows.append({
            "uuid": uuid, "node_type": node_class.class_node_type, "process_type": process_type, "label": "",
            "description": "", "ctime": self._clock, "mtime": self._clock, "user_id": self.user.pk,
            "dbcomputer_id": self.computer.pk if on_computer else None, "attributes": dict(attributes or {}),
            "extras": {}, "repository_metadata": {},
        })
        self._attributes[uuid] = self._rows[-1]["attributes"]
        return uuid

    def _link(self, source, target, link_type, label):
        self._links.append((source, target, link_type.value, label))

    def _store(self):
        storage = get_manager().get_profile_storage()
        with storage.transaction():
            storage.bulk_insert(EntityTypes.NODE, self._rows)
            pks = dict(orm.QueryBuilder().append(
                orm.Node, filters={"uuid": {"in": list(self._attributes)}}, project=["uuid", "id"]).all())
            storage.bulk_insert(EntityTypes.LINK, [
                {"input_id": pks[source], "output_id": pks[target], "type": link_type, "label": label}
                for source, target, link_type, label in self._links])
        nodes = {node.uuid: node for node in orm.QueryBuilder().append(
            orm.Node, filters={"id": {"in": list(pks.values())}}).all(flat=True)}
        load = lambda value: [load(item) for item in value] if isinstance(value, list) else nodes[value]  # noqa: E731
        for name in ("pw_runs", "label_frames", "datasets", "models", "candidates", "structures"):
            setattr(self, name, load(getattr(self, name)))
        self.loop = nodes[self.loop]
        self.node_count = len(nodes)

    # --- node makers --------------------------------------------------------------------------------------------
    def _process(self, node_class, label, inputs, caller, call_label, process_type=None, on_computer=False):
        attributes = {"process_label": label, "process_state": "finished", "exit_status": 0, "sealed": True}
        node = self._node(node_class, attributes, process_type or f"aiida.workflows:fake.{label}", on_computer)
        link = LinkType.INPUT_WORK if issubclass(node_class, orm.WorkflowNode) else LinkType.INPUT_CALC
        for input_label, data in inputs.items():
            self._link(data, node, link, input_label)
        if caller is not None:
            call = LinkType.CALL_WORK if issubclass(node_class, orm.WorkflowNode) else LinkType.CALL_CALC
            self._link(caller, node, call, call_label)
        return node

    def _calcjob(self, process_type, inputs, caller, call_label):
        return self._process(orm.CalcJobNode, process_type.rsplit(".", 1)[-1], inputs, caller, call_label,
                             process_type=process_type, on_computer=True)

    def _calcfunction(self, label, inputs, caller):
        return self._process(orm.CalcFunctionNode, label, inputs, caller, label,
                             process_type=f"aiida.calculations:fake.{label}")

    def _workchain(self, label, inputs, caller=None, call_label=None):
        return self._process(orm.WorkChainNode, label, inputs, caller, call_label)

    def _create(self, process, outputs):
        for label, data in outputs.items():
            self._link(process, data, LinkType.CREATE, label)
        return outputs

    def _return(self, workflow, outputs):
        for label, data in outputs.items():
            self._link(workflow, data, LinkType.RETURN, label)

    def _dict(self, content):
        return self._node(orm.Dict, content)

    def _frames(self, count, sources):
        return self._node(self.FramesData, {"count": count, "species": ["Ba", "O", "Ti"], "sources": sorted(sources)})

    def _model(self, iteration):
        return self._node(self.ModelData, {"kind": "ensemble", "ensemble_size": 4, "species": ["Ba", "O", "Ti"],
                                           "cutoff": 4.0, "hyperparameters": {}, "metrics": {},
                                           "sha256": f"{iteration:064x}"})

    def _structure(self):
        return self._node(orm.StructureData, self._structure_attributes)

    # --- the loop --------------------------------------------------------------------------------------------
    def _label(self, structure, caller, call_label):
        """One FieldResponseWorkChain-like label of `structure`; returns its frames."""
        workchain = self._workchain("FieldResponseWorkChain", {"structure": structure}, caller, call_label)
        parameters = {}
        for run_label in PW_RUN_LABELS:
            base = self._workchain("PwBaseWorkChain", {"pw__structure": structure}, workchain, run_label)
            run = self._calcjob(PW, {"structure": structure, "pseudos__X": self.pseudo}, base, "iteration_01")
            output = self._create(run, {"output_parameters": self._dict({"label": run_label})})["output_parameters"]
            self._return(base, {"output_parameters": output})
            parameters[run_label] = output
            self.pw_runs.append(run)
        berry = {f"gdir_{g}": parameters[f"berry_phase_{g}"] for g in (1, 2, 3)}
        function = self._calcfunction("compute_polarization", {"structure": structure, **berry}, workchain)
        polarization = self._create(function, {"result": self._dict({"p": 0})})["result"]
        fields = {f"parameters_{key[6:]}": value for key, value in parameters.items() if key.startswith("field_")}
        function = self._calcfunction("compute_field_response",
                                      {"structure": structure, "polarization": polarization, **fields}, workchain)
        response = self._create(function, {"born_effective_charges": self._dict({"z": 0}),
                                           "polarizability": self._dict({"a": 0})})
        function = self._calcfunction("build_frames", {"structure": structure, "polarization": polarization,
                                                       **response, "parameters_zero_field": parameters["zero_field"],
                                                       **fields}, workchain)
        sources = self.pw_runs[-len(PW_RUN_LABELS):]
        frames = self._create(function, {"result": self._frames(7, sources)})["result"]
        self._return(workchain, {"frames": frames, "polarization": polarization, **response})
        return frames

    def _label_round(self, structures, prefix):
        frame_sets = [self._label(structure, self.loop, f"{prefix}_structure_{index:03d}")
                      for index, structure in enumerate(structures)]
        self.label_frames.append(frame_sets)
        inputs = {f"label_{index:03d}": frames for index, frames in enumerate(frame_sets)}
        if self.datasets:
            inputs["dataset"] = self.datasets[-1]
        merge = self._calcfunction("merge_frames", inputs, self.loop)
        count = sum(self._attributes[frames]["count"] for frames in inputs.values())
        sources = {source for frames in inputs.values() for source in self._attributes[frames]["sources"]}
        self.datasets.append(self._create(merge, {"result": self._frames(count, sources)})["result"])

    def _build(self, iterations, per_round, first_labels):
        self.pseudo = self._node(orm.Data)
        self.structures = [self._structure() for _ in range(per_round)]
        self.loop = self._workchain("ActiveLearningWorkChain",
                                    {f"structures__s{i}": s for i, s in enumerate(self.structures)})
        self._label_round(self.structures, first_labels)
        criteria = self._dict({"lower": 0.05})
        records = {}
        for iteration in range(1, iterations + 1):
            dataset = self.datasets[-1]
            train = self._workchain("TrainEnsembleWorkChain", {"frames": dataset}, self.loop,
                                    f"train_iteration_{iteration:02d}")
            calc = self._calcjob(TRAIN, {"frames": dataset}, train, "iteration_01")
            model = self._create(calc, {"model": self._model(iteration)})["model"]
            self._return(train, {"model": model})
            self.models.append(model)
            explore = self._workchain("ExploreWorkChain", {"model": model}, self.loop,
                                      f"explore_iteration_{iteration:02d}")
            trajectories = {}
            for index, structure in enumerate(self.structures):
                md = self._calcjob(MD, {"model": model, "structure": structure}, explore, f"md_{index}")
                trajectories[f"trajectory_{index}"] = self._create(md, {"trajectory": self._dict({"md": index})})["trajectory"]
            select = self._calcfunction("select_from_trajectories", {"criteria": criteria, **trajectories}, explore)
            selected = self._create(select, {"candidates": self._frames(per_round, []),
                                             "statistics": self._dict({"n": per_round})})
            self._return(explore, selected)
            self.candidates.append(selected["candidates"])
            summary = self._calcfunction("summarize_iteration", {"dataset": dataset, "statistics": selected["statistics"]},
                                         self.loop)
            record = {"iteration": iteration, "dataset_size": self._attributes[dataset]["count"], "validation": {"energy": {"mae": 0.1 / iteration}},
                      "candidate_fraction": 0.5 / iteration, "failed_fraction": 0.0, "converged": iteration == iterations}
            records[f"iteration_{iteration:02d}"] = self._create(summary, {"result": self._dict(record)})["result"]
            self._return(self.loop, {f"iterations__iteration_{iteration:02d}": records[f"iteration_{iteration:02d}"]})
            if iteration == iterations:
                break
            split = self._calcfunction("candidate_structures", {"candidates": selected["candidates"]}, self.loop)
            new_structures = []
            for index in range(per_round):
                structure = self._structure()
                new_structures.append(self._create(split, {f"structure_{index:03d}": structure})[f"structure_{index:03d}"])
            self._label_round(new_structures, f"label_iter{iteration:02d}")
        self._return(self.loop, {"model": self.models[-1], "dataset": self.datasets[-1]})
