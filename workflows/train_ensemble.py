"""`polmodel.train_ensemble`: train a model ensemble on a labelled-frame set.

Design choice: ONE `TrainCalculation` with `--ensemble K` (different seeds per member, optionally bootstrapped),
not K calculations in parallel. The ensemble file is then written by the code that owns the file format (no
combining of K files inside the daemon), the members' metrics come from one consistent validation split, and it is
one scheduler job: on a cluster the queue wait dominates the training time of small models, and on a 2-core
laptop K parallel trainings would only compete for the same cores. The restart loop (BaseRestartWorkChain) makes a
crashed training retry with a new seed, resumes an interrupted one from its checkpoint and resubmits one that the
scheduler ended without a checkpoint unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiida import orm
from aiida.engine import BaseRestartWorkChain, ProcessHandlerReport, process_handler, while_
from aiida.plugins import CalculationFactory

from polmodel.plugins.data import FramesData, ModelData

from .scheduler_restarts import resubmit_jobs_ended_by_the_scheduler

if TYPE_CHECKING:
    from aiida.engine import ExitCode
    from aiida.engine.processes.workchains.workchain import WorkChainSpec

TrainCalculation = CalculationFactory("polmodel.train")


class TrainEnsembleWorkChain(BaseRestartWorkChain):
    """Train an ensemble of `ensemble_size` models on `frames`; output one ModelData of kind 'ensemble'."""

    _process_class = TrainCalculation

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:
        super().define(spec)
        spec.expose_inputs(TrainCalculation, namespace="train", exclude=("frames", "initial_model"))
        spec.input("frames", valid_type=FramesData, help="Labelled training frames.")
        spec.input("initial_model", valid_type=ModelData, required=False,
                   help="Warm start for every member (e.g. the previous iteration's ensemble).")
        spec.input("ensemble_size", valid_type=orm.Int, default=lambda: orm.Int(4), help="Number of members K.")
        spec.outline(
            cls.setup,
            cls.validate_frames,
            while_(cls.should_run_process)(
                cls.run_process,
                cls.inspect_process,
            ),
            cls.results,
        )
        spec.expose_outputs(TrainCalculation)
        # 400-499: problems with the inputs found before any training.
        spec.exit_code(401, "ERROR_NO_FRAMES", message="the training set holds no frames")
        spec.exit_code(402, "ERROR_INVALID_ENSEMBLE_SIZE", message="ensemble_size must be >= 1, got {size}")

    def setup(self) -> None:
        super().setup()
        self.ctx.inputs = self.exposed_inputs(TrainCalculation, "train")
        self.ctx.inputs["frames"] = self.inputs.frames
        if "initial_model" in self.inputs:
            self.ctx.inputs["initial_model"] = self.inputs.initial_model
        parameters = self.ctx.inputs["parameters"].get_dict() if "parameters" in self.ctx.inputs else {}
        parameters["ensemble_size"] = self.inputs.ensemble_size.value
        parameters.setdefault("seed", 0)
        self.ctx.parameters = parameters
        self.ctx.inputs["parameters"] = orm.Dict(parameters)

    def validate_frames(self) -> ExitCode | None:
        """Refuse an empty set or a non-positive ensemble size before any job is submitted."""
        if not self.inputs.frames.count:
            return self.exit_codes.ERROR_NO_FRAMES
        if self.inputs.ensemble_size.value < 1:
            return self.exit_codes.ERROR_INVALID_ENSEMBLE_SIZE.format(size=self.inputs.ensemble_size.value)
        return None

    @process_handler(priority=600, exit_codes=[TrainCalculation.exit_codes.ERROR_INTERRUPTED])
    def handle_interrupted_training(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The trainer stopped before writing a model but left its training state (killed, machine lost): resume
        from that state with the same seed and settings, so the result is that of an uninterrupted run."""
        self.ctx.inputs["checkpoint"] = node.outputs.checkpoint
        self.report(f"{node.process_label}<{node.pk}> was interrupted; resuming from its checkpoint")
        return ProcessHandlerReport(do_break=True)

    # Below the resume from a checkpoint (an ended job that left one goes on from it), above the new-seed retry: a job
    # the scheduler ended did not crash, and a new seed would change the ensemble for no reason.
    handle_job_ended_by_the_scheduler = resubmit_jobs_ended_by_the_scheduler(priority=550)

    @process_handler(priority=500, exit_codes=[TrainCalculation.exit_codes.ERROR_MISSING_OUTPUT])
    def handle_crashed_training(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The trainer crashed without writing a model (e.g. a diverging loss): retry once more with a new seed,
        which changes the initial weights and the validation split; the restart limit bounds the retries."""
        self.ctx.parameters["seed"] = self.ctx.parameters.get("seed", 0) + 1000
        self.ctx.inputs["parameters"] = orm.Dict(self.ctx.parameters)
        self.report(f"{node.process_label}<{node.pk}> wrote no model; retrying with seed {self.ctx.parameters['seed']}")
        return ProcessHandlerReport(do_break=True)
