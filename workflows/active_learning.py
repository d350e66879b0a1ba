"""`polmodel.active_learning`: label -> train an ensemble -> explore -> select -> label -> merge, until converged.

Every number the loop decides on is a node made by a calcfunction (perturbed initial structures, merged datasets,
exploration conditions, adapted trust window, label plan, the per-iteration summary), so `verdi node graph
generate` on the final model walks back to the pw.x runs.

- Initial data (DP-GEN's way, `polmodel.active_learning.initial_structures`): each given structure and
  `initial_data.count` strained and displaced copies of it, labelled with the cheapest tier (`energy_forces`, one
  zero-field SCF each).
- Training starts from the previous iteration's model (`initial_model`, warm start) with a new seed.
- Exploration follows a schedule of stages (`polmodel.active_learning.exploration`): temperatures, field amplitude and
  run length of the current stage; the loop moves to the next stage once the accurate fraction of an iteration reaches
  `stage_threshold`. Fields stay within the range the labels cover plus `field_margin`. Every iteration draws fresh MD
  seeds.
- Selection (`polmodel.active_learning.selection`): the lower trust level follows the model's validation force error,
  candidates are drawn at random (seeded by the iteration) within the window, near-duplicates removed; a frame above the
  upper level is never labelled.
- Labels: every selected frame gets the cheap tier at the field it was sampled at, the frames with the largest
  P / Z* spread the full response, within a budget of `label_budget` pw.x runs per iteration.
- Continuing (`get_builder_continuing`): a new loop starts from a finished one's frames, model, stage and
  unlabelled candidates, on this machine or after `verdi archive import` on another.
Convergence (DP-GEN's accurate ratio): in the last stage, the share of explored frames the ensemble does not trust
(candidates and failed) falls below `candidate_fraction_threshold`; otherwise the loop stops after
`max_iterations` trainings.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiida import orm
from aiida.engine import ToContext, WorkChain, calcfunction, if_, while_
from aiida.plugins import WorkflowFactory
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin

from polmodel.active_learning.exploration import next_stage
from polmodel.active_learning.selection import FULL, pw_runs_per_label
from polmodel.plugins.data import FramesData, ModelData, merge_frames
from polmodel.workflows.explore import ExploreWorkChain
from polmodel.workflows.train_ensemble import TrainEnsembleWorkChain

if TYPE_CHECKING:
    import pathlib

    from aiida.engine import ExitCode, ProcessBuilder
    from aiida.engine.processes.workchains.workchain import WorkChainSpec

    from polmodel.workflows.structures import StructureLike

FIELD_RESPONSE_ENTRY_POINT = "polmodel.dft.field_response"


#: pw.x runs of one full field-response label under the `fast` protocol, which has no string extrapolation (the
#: `balanced` loop protocol sets `full_label_cost` to pw_runs_per_label(FULL, string_extrapolation=True), 16).
FULL_LABEL_COST = pw_runs_per_label(FULL)


# A calcfunction's parameters are annotated orm.Data: AiiDA makes the annotations the valid types of its ports, and
# Data is what they were before they had any.
@calcfunction
def initial_structures(parameters: orm.Data, **structures: orm.StructureData) -> dict[str, orm.StructureData]:
    """Each given structure (key `<key>_000`) and its strained and displaced copies (`<key>_001`, ...)."""
    from polmodel.active_learning.initial_structures import perturbed_structures

    values = parameters.get_dict()
    result = {}
    for position, key in enumerate(sorted(structures)):
        atoms = structures[key].get_ase()
        copies = perturbed_structures(atoms, values["count"], values["max_strain"], values["max_displacement"],
                                      seed=values["seed"] + position)
        for index, perturbed in enumerate([atoms, *copies]):
            result[f"{key}_{index:03d}"] = orm.StructureData(ase=perturbed)
    return result


def is_given_structure(key: str) -> bool:
    """Whether a key of `initial_structures` names a given structure (`<key>_000`) rather than a copy of one."""
    return key.rsplit("_", 1)[-1] == "000"


@calcfunction
def plan_candidate_labels(candidates: orm.Data, budget: orm.Data, full_cost: orm.Data, max_full: orm.Data,
                          min_full_spread: orm.Data | None = None) -> dict[str, orm.Data]:
    """The label plan of the candidates within `budget` pw.x runs
    (`polmodel.active_learning.selection.assign_label_tiers`; a full response only above `min_full_spread` of the
    Born-charge spread, when given, else, where the exploration measured each candidate's response spread against
    its Z* and α thresholds (`response_spread_ratio`), only where that ratio is above 1): one StructureData per
    labelled candidate, keyed `structure_000`, ..., and `plan` (a Dict with per key the tier, the field vectors,
    the pw.x runs and, where the candidate records it, the MD temperature it was sampled at: a StructureData has no
    place for it, and the loop gives it to the label's frames when it merges them)."""
    from polmodel.active_learning.selection import assign_label_tiers
    from polmodel.data.domain import SAMPLED_TEMPERATURE_KEY
    from polmodel.data.frames import frame_efield

    frames = candidates.get_atoms()
    efields = [frame_efield(frame) for frame in frames]
    if min_full_spread is None and frames and all("response_spread_ratio" in frame.info for frame in frames):
        spread, least = [float(frame.info["response_spread_ratio"]) for frame in frames], 1.0
    else:
        spread = [float(frame.info.get("response_spread", 0.0)) for frame in frames]
        least = min_full_spread.value if min_full_spread is not None else 0.0
    plans = assign_label_tiers(efields, spread, budget.value, full_cost.value, max_full.value, least)
    result, plan = {}, {}
    for entry in plans:
        key = f"structure_{entry.index:03d}"
        result[key] = orm.StructureData(ase=frames[entry.index])
        plan[key] = {"tier": entry.tier, "field_vectors": [list(vector) for vector in entry.fields],
                     "cost": entry.cost}
        if frames[entry.index].info.get(SAMPLED_TEMPERATURE_KEY) is not None:
            plan[key][SAMPLED_TEMPERATURE_KEY] = float(frames[entry.index].info[SAMPLED_TEMPERATURE_KEY])
    result["plan"] = orm.Dict({"labels": plan, "num_candidates": len(frames),
                               "pw_runs": sum(entry.cost for entry in plans), "budget": budget.value})
    return result


@calcfunction
def exploration_conditions(dataset: orm.Data, metrics: orm.Data, explore_fields: orm.Data, schedule: orm.Data,
                           stage: orm.Data, margin: orm.Data, parameters: orm.Data, selection: orm.Data,
                           iteration: orm.Data, previous_selection: orm.Dict | None = None) -> dict[str, orm.Data]:
    """The MD conditions and the trust window of one exploration.

    fields: the shapes of `explore_fields` at peak min(stage amplitude, largest labelled field + margin);
    temperatures and steps: the stage's; parameters: the MD parameters with the stage's steps and a seed of its
    own per iteration (base seed + 1000 × iteration); selection: the criteria with the lower trust level from the
    validation force RMSE and, with `response_threshold_factor`, the Z* and α thresholds from their validation RMSE,
    each scaled by the training's measured spread / error (`adapt_trust_window`; not above `previous_selection`'s,
    the stage's last exploration's criteria), a random-draw seed of the iteration and, with
    `min_distance_fraction`, the shortest distance of each species pair in the dataset (the closest approach a
    candidate may reach is that fraction of it).
    """
    from polmodel.active_learning.exploration import ExplorationStage, covered_field, field_peak, stage_field_protocols
    from polmodel.active_learning.selection import SelectionCriteria, adapt_trust_window, shortest_pair_distances
    from polmodel.plugins.parsers import validation_errors

    current = ExplorationStage.from_dict(schedule.get_list()[stage.value])
    labelled = dataset.get_atoms()
    covered = covered_field(labelled)
    fields = stage_field_protocols(explore_fields.get_list(), current.field_amplitude, covered, margin.value)
    md = parameters.get_dict()
    md["steps"] = current.steps
    md["seed"] = md.get("seed", 0) + 1000 * iteration.value
    criteria = selection.get_dict()
    criteria["seed"] = criteria.get("seed", 0) + iteration.value
    if criteria.get("min_distance_fraction") is not None:
        criteria["labelled_pair_distances"] = shortest_pair_distances(labelled)
    errors = validation_errors(metrics.get_dict())
    previous = SelectionCriteria.from_dict(previous_selection.get_dict()) if previous_selection is not None else None
    adapted = adapt_trust_window(SelectionCriteria.from_dict(criteria), errors.get("forces", {}).get("rmse"),
                                 born_charge_rmse=errors.get("born_effective_charges", {}).get("rmse"),
                                 polarizability_rmse=errors.get("polarizability", {}).get("rmse"), previous=previous,
                                 calibration=metrics.get_dict().get("calibration"))
    return {
        "fields": orm.List(fields),
        "temperatures": orm.List(list(current.temperatures)),
        "parameters": orm.Dict(md),
        "selection": orm.Dict(adapted.as_dict()),
        "summary": orm.Dict({"covered_field": covered, "field_amplitude": max(field_peak(f) for f in fields),
                             "temperatures": list(current.temperatures), "steps": current.steps,
                             "force_lower": adapted.force_lower, "force_upper": adapted.force_upper}),
    }


@calcfunction
def summarize_iteration(iteration: orm.Data, dataset: orm.Data, metrics: orm.Data, statistics: orm.Data,
                        threshold: orm.Data, conditions: orm.Data, stage: orm.Data, last_stage: orm.Data) -> orm.Dict:
    """The record of one iteration: dataset size, validation errors, candidate fraction, converged or not."""
    from polmodel.active_learning.selection import is_converged
    from polmodel.plugins.parsers import validation_errors

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
            "stage": stage.value,
            "exploration": conditions.get_dict(),
            "converged": bool(last_stage.value) and is_converged(stats, threshold.value),
        }
    )


@calcfunction
def collect_learning_curve(**iterations: orm.Dict) -> orm.Dict:
    """The iteration records in order, as one Dict `{"iterations": [...]}`."""
    return orm.Dict({"iterations": [iterations[key].get_dict() for key in sorted(iterations)]})


def format_errors(validation: Mapping[str, Mapping[str, float]]) -> str:
    """Short text of validation MAEs for reports, e.g. 'energy 1.2e-03, forces 4.5e-02'."""
    return ", ".join(f"{quantity} {entry['mae']:.3g}" for quantity, entry in sorted(validation.items())) or "n/a"


def stage_after(loop: orm.WorkChainNode) -> int:
    """The exploration stage the finished `loop` would explore next: its last iteration's stage, advanced when
    that iteration's accurate fraction reached the stage threshold (as `inspect_explore` decides)."""
    records = loop.outputs.learning_curve.get_dict()["iterations"]
    stages = loop.inputs.schedule.get_list() if "schedule" in loop.inputs else [None]
    last = records[-1]
    return next_stage(last["stage"], last["accurate_fraction"], loop.inputs.stage_threshold.value, len(stages))


def last_candidates(loop: orm.WorkChainNode) -> FramesData | None:
    """The candidates of `loop`'s last exploration (FramesData), or None when it explored nothing."""
    explorations = loop.base.links.get_outgoing(link_label_filter="explore_iteration_%").all()
    if not explorations:
        return None
    last = max(explorations, key=lambda link: link.link_label).node
    return last.outputs.candidates if "candidates" in last.outputs else None


class ActiveLearningWorkChain(ProtocolMixin, WorkChain):
    """Active learning of a field-aware model ensemble on DFT labels from `polmodel.dft.field_response`."""

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:
        super().define(spec)
        cls.define_starting_point(spec)
        cls.define_initial_data(spec)
        cls.define_labelling(spec)
        spec.expose_inputs(TrainEnsembleWorkChain, namespace="train", exclude=("frames", "initial_model"))
        spec.expose_inputs(ExploreWorkChain, namespace="explore", exclude=("model", "structures"))
        cls.define_exploration_stages(spec)
        spec.outline(
            cls.setup,
            if_(cls.should_label_initial)(cls.run_initial_labels, cls.inspect_labels),
            if_(cls.should_label_pending)(cls.run_pending_labels, cls.inspect_labels),
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
        cls.define_outputs(spec)
        cls.define_exit_codes(spec)

    @staticmethod
    def define_starting_point(spec: WorkChainSpec) -> None:
        """What the loop starts from: structures, and optionally frames, a model, a stage and pending candidates of a
        previous loop."""
        spec.input_namespace(
            "structures", valid_type=orm.StructureData, dynamic=True,
            help="Initial structures: labelled first, with perturbed copies (unless `initial_frames` is given), and "
                 "MD starting points.",
        )
        spec.input("initial_frames", valid_type=FramesData, required=False, help="Labelled frames to start from.")
        spec.input("initial_model", valid_type=ModelData, required=False,
                   help="Ensemble the first training starts from (warm start), e.g. the model of a previous loop.")
        spec.input("initial_stage", valid_type=orm.Int, default=lambda: orm.Int(0),
                   help="Exploration stage (index into `schedule`) of the first iteration.")
        spec.input("pending_candidates", valid_type=FramesData, required=False,
                   help="Frames selected but not labelled by a previous loop: labelled before the first training.")

    @staticmethod
    def define_initial_data(spec: WorkChainSpec) -> None:
        """The strained and displaced copies labelled before the first training, and their tiers."""
        spec.input_namespace("initial_data", help="Strained and displaced copies of each structure (DP-GEN init).")
        spec.input("initial_data.count", valid_type=orm.Int, default=lambda: orm.Int(6),
                   help="Copies per structure (0: the structures alone).")
        spec.input("initial_data.max_strain", valid_type=orm.Float, default=lambda: orm.Float(0.03),
                   help="Largest strain component (fraction).")
        spec.input("initial_data.max_displacement", valid_type=orm.Float, default=lambda: orm.Float(0.05),
                   help="Largest displacement component, Å.")
        spec.input("initial_data.seed", valid_type=orm.Int, default=lambda: orm.Int(0))
        spec.input("initial_data.tier", valid_type=orm.Str, default=lambda: orm.Str("energy_forces"),
                   help="Label tier of the initial structures: the cheapest by default (DP-GEN); `full` gives the "
                        "first model Born charges and polarizability from the start.")
        spec.input("initial_data.given_tier", valid_type=orm.Str, required=False,
                   help="Label tier of the given structures themselves (default: `tier`): `full` here gives the "
                        "first model Born charges and polarizability at one full label per structure, while their "
                        "copies stay at `tier`.")

    @staticmethod
    def define_labelling(spec: WorkChainSpec) -> None:
        """How labels are made (the FieldResponseWorkChain's code, protocol and options) and what they may cost."""
        spec.input_namespace("label", help="Inputs of the DFT labelling (FieldResponseWorkChain protocol builder).")
        spec.input("label.code", valid_type=orm.AbstractCode, help="pw.x code.")
        spec.input("label.protocol", valid_type=orm.Str, default=lambda: orm.Str("fast"))
        spec.input("label.overrides", valid_type=orm.Dict, required=False)
        spec.input("label.pseudo_family", valid_type=orm.Str, required=False)
        spec.input("label.options", valid_type=orm.Dict, required=False,
                   help="CalcJob options of the pw.x runs (resources, queue, wallclock) on the chosen computer.")
        spec.input("label_budget", valid_type=orm.Int, default=lambda: orm.Int(20),
                   help="pw.x runs the labels of one iteration may cost (energy_forces 1, field_frames 2, full "
                        "`full_label_cost`).")
        spec.input("full_label_cost", valid_type=orm.Int, default=lambda: orm.Int(FULL_LABEL_COST),
                   help="pw.x runs of one full field-response label under the chosen protocol.")
        spec.input("max_full_labels", valid_type=orm.Int, default=lambda: orm.Int(1),
                   help="Frames per iteration, those of largest P / Z* spread, that get the full response.")
        spec.input("full_label_born_spread", valid_type=orm.Float, required=False,
                   help="e; a candidate gets the full response only where its Born-charge spread exceeds this: "
                        "where the ensemble already agrees on Z*, a full label spends `full_label_cost` runs to "
                        "confirm it. Needs `born_spread` in `explore.parameters` (the MD records the spread).")

    @staticmethod
    def define_exploration_stages(spec: WorkChainSpec) -> None:
        """The stages of exploration, when the loop moves on to the next, when it has converged and when it stops."""
        spec.input("schedule", valid_type=orm.List, required=False,
                   help="Exploration stages [{temperatures, field_amplitude (V/Å), steps}], never getting easier; "
                        "default one stage of `explore.temperatures`, the peak of `explore.fields` and "
                        "`explore.parameters['steps']`.")
        spec.input("stage_threshold", valid_type=orm.Float, default=lambda: orm.Float(0.9),
                   help="Accurate fraction of an iteration at which the next iteration explores the next stage.")
        spec.input("field_margin", valid_type=orm.Float, default=lambda: orm.Float(0.02),
                   help="V/Å beyond the largest labelled field that the exploration may apply.")
        spec.input("candidate_fraction_threshold", valid_type=orm.Float, default=lambda: orm.Float(0.05),
                   help="The loop has converged when, in the last stage, the untrusted share of an exploration "
                        "(candidates and failed frames) is below this (DP-GEN's criterion).")
        spec.input("max_iterations", valid_type=orm.Int, default=lambda: orm.Int(5),
                   help="Iterations (train, explore, label) at most.")

    @staticmethod
    def define_outputs(spec: WorkChainSpec) -> None:
        spec.output("model", valid_type=ModelData, help="The last trained ensemble.")
        spec.output("dataset", valid_type=FramesData, help="All labelled frames gathered by the loop.")
        spec.output("learning_curve", valid_type=orm.Dict, help="The iteration records in order.")
        spec.output_namespace("iterations", valid_type=orm.Dict, dynamic=True, help="One record per iteration.")

    @staticmethod
    def define_exit_codes(spec: WorkChainSpec) -> None:
        # 400-449: inputs that cannot start a loop.
        spec.exit_code(401, "ERROR_NO_STRUCTURES", message="no initial structures were given")
        spec.exit_code(402, "ERROR_EMPTY_INITIAL_SET", message="the initial labelled set is empty: {reason}")
        spec.exit_code(403, "ERROR_UNKNOWN_SPECIES", message="structure {key} contains {unknown}, data species: {known}")
        spec.exit_code(404, "ERROR_INVALID_SCHEDULE", message="invalid exploration schedule or budget: {error}")
        # 450-499: a child failed in a way the loop cannot continue from.
        spec.exit_code(450, "ERROR_TRAINING_FAILED", message="training in iteration {iteration} failed: {child}")
        spec.exit_code(451, "ERROR_EXPLORATION_FAILED", message="exploration in iteration {iteration} failed: {child}")

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> ExitCode | None:
        """Context, and the checks of inputs that would only fail later: structures, schedule, budget."""
        from polmodel.active_learning.exploration import ExplorationStage, field_peak, validate_schedule

        self.ctx.iteration = 0
        self.ctx.stage = self.inputs.initial_stage.value
        self.ctx.converged = False
        self.ctx.summaries = {}
        self.ctx.dataset = self.inputs.get("initial_frames")
        self.ctx.label_keys = []
        self.ctx.candidates = None
        if "initial_model" in self.inputs:
            self.ctx.model = self.inputs.initial_model
        if not self.inputs.structures:
            return self.exit_codes.ERROR_NO_STRUCTURES
        try:
            if "schedule" in self.inputs:
                stages = validate_schedule(self.inputs.schedule.get_list())
            else:
                explore = self.inputs.explore
                stages = [ExplorationStage(
                    temperatures=explore.temperatures.get_list(),
                    field_amplitude=max(field_peak(f) for f in explore.fields.get_list()),
                    steps=explore.parameters.get_dict()["steps"],
                )]
            from polmodel.active_learning.selection import TIERS

            for name in ("tier", "given_tier"):
                if name in self.inputs.initial_data and self.inputs.initial_data[name].value not in TIERS:
                    raise ValueError(f"initial_data.{name} must be one of {TIERS}, "
                                     f"got {self.inputs.initial_data[name].value!r}")
            if min(self.inputs.label_budget.value, self.inputs.full_label_cost.value) < 1:
                raise ValueError("label_budget and full_label_cost must be >= 1 pw.x run")
            if self.inputs.max_full_labels.value < 0:
                raise ValueError("max_full_labels must be >= 0")
            if "full_label_born_spread" in self.inputs:
                if not self.inputs.full_label_born_spread.value > 0:
                    raise ValueError("full_label_born_spread must be > 0 e")
                if not self.inputs.explore.parameters.get_dict().get("born_spread"):
                    raise ValueError("full_label_born_spread needs born_spread: true in explore.parameters, or the "
                                     "MD records no Born-charge spread to compare with it")
            if self.inputs.field_margin.value < 0:
                raise ValueError("field_margin must be >= 0 V/Å")
            if not 0 <= self.inputs.initial_stage.value < len(stages):
                raise ValueError(f"initial_stage {self.inputs.initial_stage.value} is not a stage of the schedule "
                                 f"(0 to {len(stages) - 1})")
        except (KeyError, TypeError, ValueError) as error:
            return self.exit_codes.ERROR_INVALID_SCHEDULE.format(error=error)
        self.ctx.stages = [stage.as_dict() for stage in stages]
        return None

    def should_label_initial(self) -> bool:
        return "initial_frames" not in self.inputs

    def label_workchain(self) -> type[WorkChain]:
        """The labelling workchain class. Loop-logic tests override this with an analytic toy oracle of the same
        interface (tests/toy_oracle.py); production loops always label with DFT."""
        return WorkflowFactory(FIELD_RESPONSE_ENTRY_POINT)

    def label_builder(self, structure: orm.StructureData, tier: str,
                      field_vectors: Iterable[Sequence[float]] = ()) -> ProcessBuilder:
        """The builder of one label of `structure` at `tier` (FieldResponseWorkChain from its protocol); a
        `field_frames` label gets its field vectors (V/Å)."""
        label = self.inputs.label
        kwargs = {"protocol": label.protocol.value, "tier": tier}
        if field_vectors:
            kwargs["field_vectors"] = [list(vector) for vector in field_vectors]
        if "overrides" in label:
            kwargs["overrides"] = label.overrides.get_dict()
        if "pseudo_family" in label:
            kwargs["pseudo_family"] = label.pseudo_family.value
        if "options" in label:
            kwargs["options"] = label.options.get_dict()
        return self.label_workchain().get_builder_from_protocol(label.code, structure, **kwargs)

    def submit_labels(self, structures: Mapping[str, orm.StructureData], plan: Mapping[str, Mapping[str, Any]],
                      prefix: str) -> ToContext:
        """Submit one label per structure at the tier of `plan` ({key: {"tier", "field_vectors"}}); a structure
        the label workchain refuses (e.g. overlapping atoms from an MD run that went astray) is reported and
        skipped, like a failed label."""
        futures = {}
        for key, structure in sorted(structures.items()):
            entry = plan[key]
            try:
                builder = self.label_builder(structure, entry["tier"], entry.get("field_vectors", ()))
            except ValueError as error:
                self.report(f"label {prefix}_{key} refused before any pw.x run: {error}; skipped")
                continue
            builder.metadata.call_link_label = f"{prefix}_{key}"
            futures[f"{prefix}_{key}"] = self.submit(builder)
        self.ctx.label_keys = sorted(futures)
        # the MD temperatures of explored candidates, for their frames when they are merged (inspect_labels)
        from polmodel.data.domain import SAMPLED_TEMPERATURE_KEY
        self.ctx.label_temperatures = {f"{prefix}_{key}": plan[key][SAMPLED_TEMPERATURE_KEY] for key in structures
                                       if f"{prefix}_{key}" in futures and SAMPLED_TEMPERATURE_KEY in plan[key]}
        tiers = sorted({plan[key]["tier"] for key in structures})
        self.report(f"submitted {len(futures)} labels ({prefix}; tiers {', '.join(tiers)})")
        return ToContext(**futures)

    def run_initial_labels(self) -> ToContext:
        """Label each structure with `initial_data.given_tier` and its perturbed copies with `initial_data.tier` (by
        default both the cheapest: one zero-field SCF each)."""
        settings = self.inputs.initial_data
        perturbation = {key: node.value for key, node in settings.items() if key not in ("tier", "given_tier")}
        structures = initial_structures(orm.Dict(perturbation), **self.inputs.structures)
        copy_tier = settings.tier.value
        given_tier = settings.given_tier.value if "given_tier" in settings else copy_tier
        plan = {key: {"tier": given_tier if is_given_structure(key) else copy_tier} for key in structures}
        return self.submit_labels(structures, plan, "label_initial")

    def should_label_pending(self) -> bool:
        return "pending_candidates" in self.inputs and self.inputs.pending_candidates.count > 0

    def run_pending_labels(self) -> ToContext:
        """Label the candidates a previous loop selected but stopped before labelling, at their planned tiers."""
        return self.label_candidates(self.inputs.pending_candidates, "label_pending")

    def inspect_labels(self) -> None:
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
        sampled = {key: value for key, value in self.ctx.get("label_temperatures", {}).items() if key in new_sets}
        if sampled:
            to_merge["sampled_temperatures"] = orm.Dict(sampled)
        # "dataset" sorts before "label_*": previous frames first, new ones appended.
        self.ctx.dataset = merge_frames(**to_merge)
        self.report(f"dataset now holds {self.ctx.dataset.count} frames (FramesData<{self.ctx.dataset.pk}>)")

    def check_initial_set(self) -> ExitCode | None:
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
    def should_iterate(self) -> bool:
        return not self.ctx.converged and self.ctx.iteration < self.inputs.max_iterations.value

    def run_train(self) -> ToContext:
        self.ctx.iteration += 1
        inputs = self.exposed_inputs(TrainEnsembleWorkChain, "train")
        inputs["frames"] = self.ctx.dataset
        # A new seed per iteration: members differ between iterations even when no new frames arrived.
        train_inputs = dict(inputs.get("train", {}))
        parameters = train_inputs["parameters"].get_dict() if "parameters" in train_inputs else {}
        parameters["seed"] = parameters.get("seed", 0) + 100 * self.ctx.iteration
        train_inputs["parameters"] = orm.Dict(parameters)
        inputs["train"] = train_inputs
        if "model" in self.ctx:
            # Warm start: the previous ensemble's weights, so each iteration refines instead of starting over.
            inputs["initial_model"] = self.ctx.model
        inputs.setdefault("metadata", {})
        inputs["metadata"]["call_link_label"] = f"train_iteration_{self.ctx.iteration:02d}"
        self.report(f"iteration {self.ctx.iteration}: training on {self.ctx.dataset.count} frames")
        return ToContext(train=self.submit(TrainEnsembleWorkChain, **inputs))

    def inspect_train(self) -> ExitCode | None:
        node = self.ctx.train
        if not node.is_finished_ok or "model" not in node.outputs:
            child = f"{node.process_label}<{node.pk}> exit status {node.exit_status}"
            return self.exit_codes.ERROR_TRAINING_FAILED.format(iteration=self.ctx.iteration, child=child)
        self.ctx.model = node.outputs.model
        self.ctx.metrics = node.outputs.metrics
        for member, quantities in node.outputs.metrics.get_dict().get("outlier_members", {}).items():
            self.report(f"iteration {self.ctx.iteration}: member {member}'s error on its training frames of "
                        f"{', '.join(quantities)} is an outlier among the members' (train.train.parameters."
                        "retrain_outliers trains such a member again from scratch)")
        return None

    def run_explore(self) -> ToContext:
        """Explore the current stage: conditions and trust window from a calcfunction (fresh seeds each time)."""
        explore = self.inputs.explore
        same_stage = self.ctx.get("selection_stage") == self.ctx.stage
        conditions = exploration_conditions(
            dataset=self.ctx.dataset,
            metrics=self.ctx.metrics,
            explore_fields=explore.fields,
            schedule=orm.List(self.ctx.stages),
            stage=orm.Int(self.ctx.stage),
            margin=self.inputs.field_margin,
            parameters=explore.parameters,
            selection=explore.selection if "selection" in explore else orm.Dict({}),
            iteration=orm.Int(self.ctx.iteration),
            **({"previous_selection": self.ctx.selection} if same_stage else {}),
        )
        self.ctx.conditions = conditions["summary"]
        self.ctx.selection, self.ctx.selection_stage = conditions["selection"], self.ctx.stage
        inputs = self.exposed_inputs(ExploreWorkChain, "explore")
        for key in ("fields", "temperatures", "parameters", "selection"):
            inputs[key] = conditions[key]
        inputs["model"] = self.ctx.model
        inputs["structures"] = dict(self.inputs.structures)
        inputs.setdefault("metadata", {})
        inputs["metadata"]["call_link_label"] = f"explore_iteration_{self.ctx.iteration:02d}"
        return ToContext(explore=self.submit(ExploreWorkChain, **inputs))

    def inspect_explore(self) -> ExitCode | None:
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
            conditions=self.ctx.conditions,
            stage=orm.Int(self.ctx.stage),
            last_stage=orm.Bool(self.ctx.stage == len(self.ctx.stages) - 1),
        )
        key = f"iteration_{self.ctx.iteration:02d}"
        self.ctx.summaries[key] = summary
        self.out(f"iterations.{key}", summary)
        record = summary.get_dict()
        self.ctx.converged = record["converged"]
        stage = next_stage(self.ctx.stage, record["accurate_fraction"], self.inputs.stage_threshold.value,
                           len(self.ctx.stages))
        if stage != self.ctx.stage:
            self.report(f"accurate fraction {record['accurate_fraction']:.3f} reached the stage threshold: "
                        f"stage {stage} next")
            self.ctx.stage = stage
        self.report(
            f"iteration {record['iteration']} (stage {record['stage']}): dataset {record['dataset_size']} frames; "
            "validation MAE "
            f"{format_errors(record['validation'])}; candidate fraction {record['candidate_fraction']:.3f} "
            f"(failed {record['failed_fraction']:.3f}); {record['num_selected']} selected; "
            f"{'converged' if record['converged'] else 'not converged'}"
        )
        return None

    def should_label_candidates(self) -> bool:
        return (
            not self.ctx.converged
            and self.ctx.iteration < self.inputs.max_iterations.value
            and self.ctx.candidates is not None
            and self.ctx.candidates.count > 0
        )

    def run_candidate_labels(self) -> ToContext:
        """Label the candidates at their planned tiers within the iteration's budget of pw.x runs."""
        return self.label_candidates(self.ctx.candidates, f"label_iter{self.ctx.iteration:02d}")

    def label_candidates(self, candidates: FramesData, prefix: str) -> ToContext:
        limits = ({"min_full_spread": self.inputs.full_label_born_spread}
                  if "full_label_born_spread" in self.inputs else {})
        result = plan_candidate_labels(candidates, self.inputs.label_budget, self.inputs.full_label_cost,
                                       self.inputs.max_full_labels, **limits)
        plan = result.pop("plan").get_dict()
        self.report(f"label plan: {len(plan['labels'])} of {plan['num_candidates']} candidates, "
                    f"{plan['pw_runs']} of {plan['budget']} pw.x runs")
        return self.submit_labels(result, plan["labels"], prefix)

    # ------------------------------------------------------------------------------------------------ results
    def results(self) -> None:
        if not self.ctx.summaries:
            return
        self.out("model", self.ctx.model)
        self.out("dataset", self.ctx.dataset)
        self.out("learning_curve", collect_learning_curve(**self.ctx.summaries))
        if not self.ctx.converged:
            self.report(f"stopped after {self.ctx.iteration} iterations without reaching the candidate threshold")

    # ------------------------------------------------------------------------------------------------ continuing
    @classmethod
    def get_builder_continuing(cls, previous: orm.ProcessNode | int | str, max_iterations: int | None = None,
                               label_pending: bool = True, pw_code: orm.AbstractCode | str | None = None,
                               polmodel_code: orm.AbstractCode | str | None = None,
                               overrides: Mapping[str, Any] | None = None,
                               structures: StructureLike | list[StructureLike] | None = None) -> ProcessBuilder:
        """A builder that goes on where the finished loop `previous` (a node or its pk/uuid) stopped: its inputs,
        its labelled frames (`initial_frames`), its last ensemble as the warm start (`initial_model`), the
        exploration stage its last iteration earned (`initial_stage`), and the candidates its last exploration
        selected but did not label (`pending_candidates`, labelled first unless `label_pending` is False).

        The previous loop may come from another machine through `verdi archive import`: the new loop's inputs are
        the previous loop's output nodes, so the provenance of every later model reaches the original pw.x runs.
        `max_iterations` (trainings of the new loop) defaults to the previous loop's. `pw_code` and `polmodel_code`
        (codes or labels) replace the previous loop's codes: after an import they belong to the other machine.
        `overrides` change inputs of the new loop, in the shape of its input ports (`override_builder_inputs`: `Dict`
        inputs merged, others replaced), e.g. `{"schedule": [...], "initial_stage": 2, "explore": {"selection":
        {"response_threshold_factor": 1.0}}}`. `structures` (as in `get_builder_from_protocol`) join the previous
        loop's as MD starting points (they are not labelled first: the loop starts from its frames).
        ValueError when `previous` is not a finished active-learning loop with a model and a dataset, or for an
        override that names no input or does not fit it, or a structure key the previous loop already has.
        """
        from aiida.common.exceptions import NotExistent

        try:
            previous = previous if isinstance(previous, orm.ProcessNode) else orm.load_node(previous)
        except NotExistent as error:
            raise ValueError(f"no loop {previous} in this profile ({error})") from error
        try:
            is_loop = isinstance(previous, orm.WorkChainNode) and issubclass(previous.process_class,
                                                                              ActiveLearningWorkChain)
        except ValueError:  # a process class this installation cannot import
            is_loop = False
        if not is_loop:
            raise ValueError(f"{type(previous).__name__}<{previous.pk}> is not an active-learning loop")
        missing = [name for name in ("model", "dataset", "learning_curve") if name not in previous.outputs]
        if not previous.is_finished_ok or missing:
            raise ValueError(f"{previous.process_label}<{previous.pk}> did not finish with a model and a dataset "
                             f"(state {previous.process_state.value}, exit status {previous.exit_status}; "
                             f"missing outputs: {', '.join(missing) or 'none'})")
        builder = previous.get_builder_restart()
        builder.initial_frames = previous.outputs.dataset
        builder.initial_model = previous.outputs.model
        builder.initial_stage = orm.Int(stage_after(previous))
        if pw_code is not None:
            builder.label.code = orm.load_code(pw_code) if isinstance(pw_code, str) else pw_code
        if polmodel_code is not None:
            polmodel_code = orm.load_code(polmodel_code) if isinstance(polmodel_code, str) else polmodel_code
            builder.train.train.code = polmodel_code
            builder.explore.md.code = polmodel_code
        if max_iterations is not None:
            builder.max_iterations = orm.Int(max_iterations)
        if structures is not None:
            from .structures import as_structure_namespace, structure_key

            added = as_structure_namespace(structures)
            if not isinstance(structures, dict):   # numbered after the previous loop's
                added = {structure_key(node, len(builder.structures) + index): node
                         for index, node in enumerate(added.values())}
            clashes = sorted(set(added) & set(builder.structures))
            if clashes:
                raise ValueError(f"structure keys {', '.join(clashes)} are the previous loop's already")
            builder.structures = {**dict(builder.structures), **added}
        if overrides:
            from .protocol_utils import override_builder_inputs

            override_builder_inputs(builder, dict(overrides), where="continuation overrides")
        pending = last_candidates(previous)
        if label_pending and pending is not None and pending.count:
            builder.pending_candidates = pending
        elif "pending_candidates" in builder:
            del builder.pending_candidates
        return builder

    # ------------------------------------------------------------------------------------------------ protocols
    @classmethod
    def get_protocol_filepath(cls) -> pathlib.Path:
        import pathlib

        return pathlib.Path(__file__).parent / "protocols" / "active_learning.yaml"

    @classmethod
    def get_builder_from_protocol(cls, pw_code: orm.AbstractCode | str, polmodel_code: orm.AbstractCode | str,
                                  structures: StructureLike | list[StructureLike] | tuple[StructureLike, ...]
                                  | dict[str, StructureLike], protocol: str | None = None,
                                  overrides: Mapping[str, Any] | None = None, pseudo_family: str | None = None,
                                  options: Mapping[str, Any] | None = None) -> ProcessBuilder:
        """A builder of the loop on `structures` at `protocol` ('fast' | 'balanced' | 'stringent', see
        protocols/active_learning.yaml).

        `structures`: one or several (list, or dict keyed by link label) StructureData, ase.Atoms or pymatgen
        Structure objects. `overrides` has the protocol file's shape and is merged last: `label.overrides` reach
        every DFT label's field-response protocol, `train.parameters` the trainings, `explore.*` the explorations.
        `options` are the pw.x runs' CalcJob options. Bad inputs raise ValueError before anything is stored.
        """
        from polmodel.active_learning.selection import SelectionCriteria

        from .protocol_utils import merge_overrides
        from .structures import as_structure_namespace

        pw_code = orm.load_code(pw_code) if isinstance(pw_code, str) else pw_code
        polmodel_code = orm.load_code(polmodel_code) if isinstance(polmodel_code, str) else polmodel_code
        structures = as_structure_namespace(structures)
        if not structures:
            raise ValueError("no structures were given")
        inputs = merge_overrides(cls.get_protocol_inputs(protocol), overrides, spec=cls.spec().inputs)
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
        initial_data = inputs["initial_data"]
        builder.initial_data.count = orm.Int(initial_data["count"])
        builder.initial_data.max_strain = orm.Float(initial_data["max_strain"])
        builder.initial_data.max_displacement = orm.Float(initial_data["max_displacement"])
        builder.initial_data.seed = orm.Int(initial_data["seed"])
        builder.initial_data.tier = orm.Str(initial_data["tier"])
        if "given_tier" in initial_data:
            builder.initial_data.given_tier = orm.Str(initial_data["given_tier"])
        builder.label_budget = orm.Int(inputs["label_budget"])
        builder.full_label_cost = orm.Int(inputs["full_label_cost"])
        builder.max_full_labels = orm.Int(inputs["max_full_labels"])
        if "full_label_born_spread" in inputs:
            builder.full_label_born_spread = orm.Float(inputs["full_label_born_spread"])
        builder.schedule = orm.List(inputs["schedule"])
        builder.stage_threshold = orm.Float(inputs["stage_threshold"])
        builder.field_margin = orm.Float(inputs["field_margin"])
        builder.candidate_fraction_threshold = orm.Float(inputs["candidate_fraction_threshold"])
        builder.max_iterations = orm.Int(inputs["max_iterations"])
        return builder
