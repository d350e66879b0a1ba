"""Jobs that the scheduler ended before they finished, and the process handler that resubmits them.

On a cluster a job can end without any fault of its inputs: a user or an administrator runs `scancel`, a job of
higher priority preempts it, its node fails. The calculation then fails in whatever way its parser sees an output cut
short, which no handler of `PwBaseWorkChain` or `TrainEnsembleWorkChain` recognizes, and the work chain aborts with an
unhandled failure. `resubmit_jobs_ended_by_the_scheduler(priority)` makes the process handler that resubmits such a job
instead; the work chains of this project that run jobs through a BaseRestartWorkChain carry it.

SLURM is the scheduler this project documents (setup_profiles/computer_slurm.yaml). It leaves two records of an ended
job that AiiDA keeps: the line slurmstepd writes to the job's stderr (`_scheduler-stderr.txt`, always retrieved) and,
where the cluster keeps accounting, the job's state in `sacct` (the calculation's `detailed_job_info`).
"""
from __future__ import annotations

import re

from aiida.engine import CalcJob, ProcessHandlerReport, process_handler

#: What slurmstepd writes to the job's stderr when it ends a job or one of its steps:
#: "slurmstepd-node01: error: *** JOB 123 ON node01 CANCELLED AT 2026-12-04T15:56:44 ***", with " DUE TO TIME LIMIT",
#: " DUE TO PREEMPTION" or " DUE TO NODE FAILURE" before the closing stars when SLURM itself ended it.
SLURM_CANCELLED_LINE = re.compile(
    r"\*\*\* (?:JOB|STEP) (?P<job>[\d.]+) ON (?P<node>\S+) CANCELLED AT (?P<time>\S+)(?: DUE TO (?P<reason>[A-Z ]+?))? \*\*\*"
)
#: `sacct` states of a job the scheduler ended for a reason outside the job ("CANCELLED by 1234" with the uid).
SLURM_ENDED_STATES = ("CANCELLED", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL")
#: Ends that a resubmission of the same job would meet again: the time limit is the walltime handlers' business.
NOT_RESUBMITTED_REASONS = ("TIME LIMIT",)


def _state_from_detailed_job_info(calculation) -> str | None:
    """The job's `State` in the `sacct` table AiiDA stored, or None without accounting (`sacct` failed) or a table."""
    info = calculation.get_detailed_job_info()
    if not info or info.get("retval") != 0:
        return None
    lines = str(info.get("stdout", "")).splitlines()
    if len(lines) < 2:
        return None
    fields = dict(zip(lines[0].split("|"), lines[1].split("|")))
    return fields.get("State") or None


def ended_by_the_scheduler(calculation) -> str | None:
    """Why the scheduler ended `calculation` (a finished CalcJobNode) before it finished, in words; None if it did not,
    or if it ended the job at the job's own time limit."""
    if calculation.exit_status == CalcJob.exit_codes.ERROR_SCHEDULER_NODE_FAILURE.status:
        return "node failure"
    state = _state_from_detailed_job_info(calculation)
    if state is not None and state.startswith(SLURM_ENDED_STATES):
        return f"sacct state {state}"
    # None when nothing was retrieved, as for a job cancelled before it started (sacct, where there is one, knows)
    match = SLURM_CANCELLED_LINE.search(calculation.get_scheduler_stderr() or "")
    if match is None:
        return None
    reason = match.group("reason")
    if reason in NOT_RESUBMITTED_REASONS:
        return None
    return f"cancelled at {match.group('time')}" + (f" due to {reason.lower()}" if reason else "")


def resubmit_jobs_ended_by_the_scheduler(priority: int):
    """The process handler `handle_job_ended_by_the_scheduler` at `priority`, for a BaseRestartWorkChain's class body.

    The priority places it among the work chain's own handlers: above every handler that would take an output cut
    short for a fault of the inputs, below those that can do better with what the ended job left (a training resumed
    from its checkpoint).
    """

    @process_handler(priority=priority)
    def handle_job_ended_by_the_scheduler(self, calculation):
        """Strategy: a job that the scheduler ended before it finished (`scancel`, preemption, a failed node) says
        nothing about its inputs, so it is resubmitted unchanged. The ended attempt stays in the provenance as a
        failed iteration and no output is taken from it, so nothing is lost and nothing is counted twice. A job
        ended at its time limit is left to the walltime handlers (the same request would end the same way), and the
        work chain's `max_iterations` bounds how often a job is resubmitted."""
        if not calculation.is_failed:
            return None
        reason = ended_by_the_scheduler(calculation)
        if reason is None:
            return None
        self.report(f"{calculation.process_label}<{calculation.pk}> (job {calculation.get_job_id()}) was ended by the "
                    f"scheduler ({reason}); resubmitting it unchanged")
        return ProcessHandlerReport(do_break=True)

    return handle_job_ended_by_the_scheduler
