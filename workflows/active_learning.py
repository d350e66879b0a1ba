"""`polmodel.active_learning`: label -> train an ensemble -> explore -> select -> label -> merge, until converged.

Every number the loop decides on is a node made by a calcfunction (merged datasets, candidate structures, the
per-iteration summary), so `verdi node graph generate` on the final model walks back to the pw.x runs.
Convergence (DP-GEN's accurate ratio): the share of explored frames the ensemble does not trust (candidates and
failed) falls below `candidate_fraction_threshold`; otherwise the loop stops after `max_iterations` trainings.
"""
from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_
from aiida.plugins import WorkflowFactory
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin

from polmodel.plugins.data import FramesData, ModelData, merge_frames
from polmodel.workflows.explore import ExploreWorkChain
from polmodel.workflows.train_ensemble import TrainEnsembleWorkChain

FIELD_RESPONSE_ENTRY_POINT = "polmodel.dft.field_response"


@calcfunction
def candidate_structures(candidates):
    """One StructureData per candidate frame, keyed `structure_000`, ... (links them to the candidate set)."""
    return {
        f"structure_{index:03d}": orm.StructureData(ase=atoms) for index, atoms in enumerate(candidates.get_atoms())
    }


@calcfunction
def summarize_iteration(iteration, dataset, metrics, statistics, threshold):
    """The record of one iteration: dataset size, validation errors, candidate fraction, converged or not."""
    from polmodel.plugins.parsers import validation_errors
    from polmodel.selection import is_converged

    stats = statistics.get_dict()
    return orm.Dict(
        {
            "iteration": iteration.value,
            "dataset_size": dataset.count,
            "validation": validation_errors(metrics.get_dict()),
            "num_explored_frames": stats["num_frames"],
            "candidate_fraction": stats["candidate_fraction"],
            "failed_fraction": stats["failed_fraction"],
            "accurate_fraction": stats["accurate_fraction"],
            "num_selected": stats["num_selected"],
            "threshold": threshold.value,
            "converged": is_converged(stats, threshold.value),
        }
    )


@calcfunction
def collect_learning_curve(**iterations):
    """The iteration records in order, as one Dict `{"iterations": [...]}`."""
    return orm.Dict({"iterations": [iterations[key].get_dict() for key in sorted(iterations)]})


def format_errors(validation):
    """Short text of validation MAEs for reports, e.g. 'energy 1.2e-03, forces 4.5e-02'."""
    return ", ".join(f"{quantity} {entry['mae']:.3g}" for quantity, entry in sorted(validation.items())) or "n/a"


class ActiveLearningWorkChain(ProtocolMixin, WorkChain):
    """Active learning of a field-aware model ensemble on DFT labels from `polmodel.dft.field_response`."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace(
            "structures", valid_type=orm.StructureData, dynamic=True,
            help="Initial structures: labelled first (unless `initial_frames` is given) and MD starting points.",
        )
        spec.input("initial_frames", valid_type=FramesData, required=False, help="Labelled frames to start from.")
        spec.input_namespace("label", help="Inputs of the DFT labelling (FieldResponseWorkChain protocol builder).")
        spec.input("label.code", valid_type=orm.AbstractCode, help="pw.x code.")
        spec.input("label.protocol", valid_type=orm.Str, default=lambda: orm.Str("fast"))
        spec.input("label.overrides", valid_type=orm.Dict, required=False)
        spec.input("label.pseudo_family", valid_type=orm.Str, required=False)
        spec.input("label.options", valid_type=orm.Dict, required=False,
                   help="CalcJob options of the pw.x runs (resources, queue, wallclock) on the chosen computer.")
        spec.expose_inputs(TrainEnsembleWorkChain, namespace="train", exclude=("frames",))
        spec.expose_inputs(ExploreWorkChain, namespace="explore", exclude=("model", "structures"))
        spec.input("candidate_fraction_threshold", valid_type=orm.Float, default=lambda: orm.Float(0.05))
        spec.input("max_iterations", valid_type=orm.Int, default=lambda: orm.Int(5))
        spec.outline(
            cls.setup,
            if_(cls.should_label_initial)(cls.run_initial_labels, cls.inspect_labels),
            cls.check_initial_set,
            while_(cls.should_iterate)(
                cls.run_train,
                cls.inspect_train,
                cls.run_explore,
                cls.inspect_explore,
                if_(cls.should_label_candidates)(cls.run_candidate_labels, cls.inspect_labels),
            ),
            cls.results,
        )
        spec.output("model", valid_type=ModelData, help="The last trained ensemble.")
        spec.output("dataset", valid_type=FramesData, help="All labelled frames gathered by the loop.")
        spec.output("learning_curve", valid_type=orm.Dict, help="The iteration records in order.")
        spec.output_namespace("iterations", valid_type=orm.Dict, dynamic=True, help="One record per iteration.")
        # 400-449: inputs that cannot start a loop.
        spec.exit_code(401, "ERROR_NO_STRUCTURES", message="no initial structures were given")
        spec.exit_code(402, "ERROR_EMPTY_INITIAL_SET", message="the initial labelled set is empty: {reason}")
        spec.exit_code(403, "ERROR_UNKNOWN_SPECIES", message="structure {key} contains {unknown}, data species: {known}")
        # 450-499: a child failed in a way the loop cannot continue from.
        spec.exit_code(450, "ERROR_TRAINING_FAILED", message="training in iteration {iteration} failed: {child}")
        spec.exit_code(451, "ERROR_EXPLORATION_FAILED", message="exploration in iteration {iteration} failed: {child}")

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self):
        self.ctx.iteration = 0
        self.ctx.converged = False
        self.ctx.summaries = {}
        self.ctx.dataset = self.inputs.get("initial_frames")
        self.ctx.label_keys = []
        self.ctx.candidates = None
        if not self.inputs.structures:
            return self.exit_codes.ERROR_NO_STRUCTURES
        return None

    def should_label_initial(self):
        return "initial_frames" not in self.inputs

    def label_builder(self, structure):
        """The builder of one DFT label (FieldResponseWorkChain from its protocol)."""
        FieldResponseWorkChain = WorkflowFactory(FIELD_RESPONSE_ENTRY_POINT)
        label = self.inputs.label
        kwargs = {"protocol": label.protocol.value}
        if "overrides" in label:
            kwargs["overrides"] = label.overrides.get_dict()
        if "pseudo_family" in label:
            kwargs["pseudo_family"] = label.pseudo_family.value
        if "options" in label:
            kwargs["options"] = label.options.get_dict()
        return FieldResponseWorkChain.get_builder_from_protocol(label.code, structure, **kwargs)

    def submit_labels(self, structures, prefix):
        """Submit one DFT label per structure; a structure the label workchain refuses (e.g. overlapping atoms
        from an MD run that went astray) is reported and skipped, like a failed label."""
        futures = {}
        for key, structure in sorted(structures.items()):
            try:
                builder = self.label_builder(structure)
            except ValueError as error:
                self.report(f"DFT label {prefix}_{key} refused before any pw.x run: {error}; skipped")
                continue
            builder.metadata.call_link_label = f"{prefix}_{key}"
            futures[f"{prefix}_{key}"] = self.submit(builder)
        self.ctx.label_keys = sorted(futures)
        self.report(f"submitted {len(futures)} DFT labels ({prefix})")
        return ToContext(**futures)

    def run_initial_labels(self):
        return self.submit_labels(dict(self.inputs.structures), "label_initial")

    def inspect_labels(self):
        """Merge the frames of every finished label into the dataset; a failed label is reported and skipped."""
        new_sets = {}
        for key in self.ctx.label_keys:
            node = self.ctx[key]
            if node.is_finished_ok and "frames" in node.outputs and node.outputs.frames.count:
                new_sets[key] = node.outputs.frames
            else:
                self.report(
                    f"DFT label {key} ({node.process_label}<{node.pk}>) failed with exit status {node.exit_status}; "
                    "skipped"
                )
        if not new_sets:
            self.report("no new labelled frames in this round")
            return
        to_merge = dict(new_sets)
        if self.ctx.dataset is not None:
            to_merge["dataset"] = self.ctx.dataset
        # "dataset" sorts before "label_*": previous frames first, new ones appended.
        self.ctx.dataset = merge_frames(**to_merge)
        self.report(f"dataset now holds {self.ctx.dataset.count} frames (FramesData<{self.ctx.dataset.pk}>)")

    def check_initial_set(self):
        """An empty start cannot train a model: refuse with a clear exit code."""
        if self.ctx.dataset is None:
            return self.exit_codes.ERROR_EMPTY_INITIAL_SET.format(reason="every initial DFT label failed")
        if not self.ctx.dataset.count:
            return self.exit_codes.ERROR_EMPTY_INITIAL_SET.format(reason=f"FramesData<{self.ctx.dataset.pk}> has no frames")
        known = set(self.ctx.dataset.species)
        for key, structure in sorted(self.inputs.structures.items()):
            unknown = sorted(set(structure.get_symbols_set()) - known)
            if unknown:
                return self.exit_codes.ERROR_UNKNOWN_SPECIES.format(key=key, unknown=unknown, known=sorted(known))
        return None

    # ------------------------------------------------------------------------------------------------ loop
    def should_iterate(self):
        return not self.ctx.converged and self.ctx.iteration < self.inputs.max_iterations.value

    def run_train(self):
        self.ctx.iteration += 1
        inputs = self.exposed_inputs(TrainEnsembleWorkChain, "train")
        inputs["frames"] = self.ctx.dataset
        # A new seed per iteration: members differ between iterations even when no new frames arrived.
        train_inputs = dict(inputs.get("train", {}))
        parameters = train_inputs["parameters"].get_dict() if "parameters" in train_inputs else {}
        parameters["seed"] = parameters.get("seed", 0) + 100 * self.ctx.iteration
        train_inputs["parameters"] = orm.Dict(parameters)
        inputs["train"] = train_inputs
        inputs.setdefault("metadata", {})
        inputs["metadata"]["call_link_label"] = f"train_iteration_{self.ctx.iteration:02d}"
        self.report(f"iteration {self.ctx.iteration}: training on {self.ctx.dataset.count} frames")
        return ToContext(train=self.submit(TrainEnsembleWorkChain, **inputs))

    def inspect_train(self):
        node = self.ctx.train
        if not node.is_finished_ok or "model" not in node.outputs:
            child = f"{node.process_label}<{node.pk}> exit status {node.exit_status}"
            return self.exit_codes.ERROR_TRAINING_FAILED.format(iteration=self.ctx.iteration, child=child)
        self.ctx.model = node.outputs.model
        self.ctx.metrics = node.outputs.metrics
        return None

    def run_explore(self):
        inputs = self.exposed_inputs(ExploreWorkChain, "explore")
        inputs["model"] = self.ctx.model
        inputs["structures"] = dict(self.inputs.structures)
        inputs.setdefault("metadata", {})
        inputs["metadata"]["call_link_label"] = f"explore_iteration_{self.ctx.iteration:02d}"
        return ToContext(explore=self.submit(ExploreWorkChain, **inputs))

    def inspect_explore(self):
        """Record the iteration (dataset size, validation errors, candidate fraction) and decide convergence."""
        node = self.ctx.explore
        if not node.is_finished_ok:
            child = f"{node.process_label}<{node.pk}> exit status {node.exit_status}"
            return self.exit_codes.ERROR_EXPLORATION_FAILED.format(iteration=self.ctx.iteration, child=child)
        self.ctx.candidates = node.outputs.candidates
        summary = summarize_iteration(
            iteration=orm.Int(self.ctx.iteration),
            dataset=self.ctx.dataset,
            metrics=self.ctx.metrics,
            statistics=node.outputs.statistics,
            threshold=self.inputs.candidate_fraction_threshold,
        )
        key = f"iteration_{self.ctx.iteration:02d}"
        self.ctx.summaries[key] = summary
        self.out(f"iterations.{key}", summary)
        record = summary.get_dict()
        self.ctx.converged = record["converged"]
        self.report(
            f"iteration {record['iteration']}: dataset {record['dataset_size']} frames; validation MAE "
            f"{format_errors(record['validation'])}; candidate fraction {record['candidate_fraction']:.3f} "
            f"(failed {record['failed_fraction']:.3f}); {record['num_selected']} selected; "
            f"{'converged' if record['converged'] else 'not converged'}"
        )
        return None

    def should_label_candidates(self):
        return (
            not self.ctx.converged
            and self.ctx.iteration < self.inputs.max_iterations.value
            and self.ctx.candidates is not None
            and self.ctx.candidates.count > 0
        )

    def run_candidate_labels(self):
        structures = candidate_structures(self.ctx.candidates)
        return self.submit_labels(structures, f"label_iter{self.ctx.iteration:02d}")

    # ------------------------------------------------------------------------------------------------ results
    def results(self):
        if not self.ctx.summaries:
            return
        self.out("model", self.ctx.model)
        self.out("dataset", self.ctx.dataset)
        self.out("learning_curve", collect_learning_curve(**self.ctx.summaries))
        if not self.ctx.converged:
            self.report(f"stopped after {self.ctx.iteration} iterations without reaching the candidate threshold")

    # ------------------------------------------------------------------------------------------------ protocols
    @classmethod
    def get_protocol_filepath(cls):
        import pathlib

        return pathlib.Path(__file__).parent / "protocols" / "active_learning.yaml"

    @classmethod
    def get_builder_from_protocol(cls, pw_code, polmodel_code, structures, protocol=None, overrides=None,
                                  pseudo_family=None, options=None):
        """A builder of the loop on `structures` at `protocol` ('fast' | 'balanced' | 'stringent', see
        protocols/active_learning.yaml).

        `structures`: one or several (list, or dict keyed by link label) StructureData, ase.Atoms or pymatgen
        Structure objects. `overrides` has the protocol file's shape and is merged last: `label.overrides` reach
        every DFT label's field-response protocol, `train.parameters` the trainings, `explore.*` the explorations.
        `options` are the pw.x runs' CalcJob options. Bad inputs raise ValueError before anything is stored.
        """
        from polmodel.selection import SelectionCriteria

        from .structures import as_structure_namespace

        pw_code = orm.load_code(pw_code) if isinstance(pw_code, str) else pw_code
        polmodel_code = orm.load_code(polmodel_code) if isinstance(polmodel_code, str) else polmodel_code
        structures = as_structure_namespace(structures)
        if not structures:
            raise ValueError("no structures were given")
        inputs = cls.get_protocol_inputs(protocol, overrides)
        SelectionCriteria.from_dict(inputs["explore"]["selection"])  # refuses bad trust levels now, not mid-loop
        # Each initial label's builder, built and dropped: a structure, code, pseudopotential family or label
        # override the labels would refuse is refused now, before the loop starts.
        FieldResponseWorkChain = WorkflowFactory(FIELD_RESPONSE_ENTRY_POINT)
        for key, structure in structures.items():
            try:
                FieldResponseWorkChain.get_builder_from_protocol(
                    pw_code, structure, protocol=inputs["label"]["protocol"],
                    overrides=inputs["label"].get("overrides"), pseudo_family=pseudo_family, options=options)
            except ValueError as error:
                raise ValueError(f"structure {key}: {error}") from error

        builder = cls.get_builder()
        builder.structures = structures
        builder.label.code = pw_code
        builder.label.protocol = orm.Str(inputs["label"]["protocol"])
        if inputs["label"].get("overrides"):
            builder.label.overrides = orm.Dict(inputs["label"]["overrides"])
        if pseudo_family is not None:
            builder.label.pseudo_family = orm.Str(pseudo_family)
        if options:
            builder.label.options = orm.Dict(options)
        builder.train.train.code = polmodel_code
        builder.train.train.parameters = orm.Dict(inputs["train"]["parameters"])
        builder.train.ensemble_size = orm.Int(inputs["ensemble_size"])
        explore = inputs["explore"]
        builder.explore.md.code = polmodel_code
        builder.explore.parameters = orm.Dict(explore["parameters"])
        builder.explore.fields = orm.List(explore["fields"])
        builder.explore.temperatures = orm.List([float(temperature) for temperature in explore["temperatures"]])
        builder.explore.selection = orm.Dict(explore["selection"])
        builder.candidate_fraction_threshold = orm.Float(inputs["candidate_fraction_threshold"])
        builder.max_iterations = orm.Int(inputs["max_iterations"])
        return builder
