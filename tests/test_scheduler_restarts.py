"""Jobs the scheduler ended (`scancel`, preemption, a failed node) are resubmitted unchanged by the restart work chains:
the record they leave, and the handler's place among the handlers of the pw.x and training work chains. The same on
a real SLURM cluster: tests/test_slurm.py."""
import pytest
from aiida import orm

from test_field_response import field_response_inputs, started_workchain  # noqa: F401  (fixtures)

pytestmark = pytest.mark.aiida

#: What slurmstepd wrote to a job's stderr after `scancel` on the one-node cluster (setup_profiles/slurm_one_node.sh).
RECORDED_SCANCEL_LINE = "mpirun: Forwarding signal 18 to job\nslurmstepd-vm: error: *** JOB 3 ON vm CANCELLED AT 2026-12-04T15:56:44 ***\n"
SCHEDULER_STDERR = "_scheduler-stderr.txt"


@pytest.fixture
def generate_ended_job(aiida_localhost):
    """Factory: a finished, failed CalcJobNode of `entry_point` with `scheduler_stderr` retrieved and, optionally, the
    `sacct` table AiiDA stores as detailed job info."""
    from aiida.common.links import LinkType
    from aiida.engine import ProcessState
    from aiida.plugins.entry_point import format_entry_point_string

    def factory(entry_point, exit_status, scheduler_stderr=None, sacct_state=None):
        node = orm.CalcJobNode(computer=aiida_localhost,
                               process_type=format_entry_point_string("aiida.calculations", entry_point))
        node.set_process_label(entry_point)
        node.set_option("resources", {"num_machines": 1, "num_mpiprocs_per_machine": 2})
        node.set_option("scheduler_stderr", SCHEDULER_STDERR)
        node.set_job_id("3")
        if sacct_state is None:  # a cluster without accounting: sacct fails
            node.set_detailed_job_info({"retval": 1, "stdout": "", "stderr": "Slurm accounting storage is disabled\n"})
        else:
            node.set_detailed_job_info({"retval": 0, "stdout": f"JobID|JobName|State\n3|aiida-1|{sacct_state}\n",
                                        "stderr": ""})
        node.set_process_state(ProcessState.FINISHED)
        node.set_exit_status(exit_status)
        node.store()
        retrieved = orm.FolderData()
        if scheduler_stderr is not None:
            retrieved.base.repository.put_object_from_bytes(scheduler_stderr.encode(), SCHEDULER_STDERR)
        retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label="retrieved")
        retrieved.store()
        return node

    return factory


@pytest.mark.parametrize("scheduler_stderr, sacct_state, expected", [
    (RECORDED_SCANCEL_LINE, None, "cancelled at 2026-12-04T15:56:44"),
    ("slurmstepd: error: *** STEP 41.0 ON n7 CANCELLED AT 2026-01-02T03:04:05 DUE TO PREEMPTION ***\n", None,
     "cancelled at 2026-01-02T03:04:05 due to preemption"),
    ("slurmstepd: error: *** JOB 41 ON n7 CANCELLED AT 2026-01-02T03:04:05 DUE TO NODE FAILURE ***\n", None,
     "cancelled at 2026-01-02T03:04:05 due to node failure"),
    # the time limit: the same job would meet it again; the walltime handlers decide
    ("slurmstepd: error: *** JOB 41 ON n7 CANCELLED AT 2026-01-02T03:04:05 DUE TO TIME LIMIT ***\n", None, None),
    ("Traceback (most recent call last):\nFloatingPointError: the loss diverged\n", None, None),
    ("", None, None),
    (None, None, None),  # nothing retrieved
    # with accounting, sacct knows a job cancelled before it ever wrote a line
    (None, "CANCELLED by 1000", "sacct state CANCELLED by 1000"),
    (None, "PREEMPTED", "sacct state PREEMPTED"),
    (None, "FAILED", None),
])
def test_what_tells_a_job_ended_by_the_scheduler(generate_ended_job, scheduler_stderr, sacct_state, expected):
    from polmodel.workflows.scheduler_restarts import ended_by_the_scheduler

    node = generate_ended_job("quantumespresso.pw", 312, scheduler_stderr, sacct_state)
    assert ended_by_the_scheduler(node) == expected


def test_a_node_failure_reported_by_aiida_is_an_end_by_the_scheduler(generate_ended_job):
    from aiida.engine import CalcJob

    from polmodel.workflows.scheduler_restarts import ended_by_the_scheduler

    node = generate_ended_job("quantumespresso.pw", CalcJob.exit_codes.ERROR_SCHEDULER_NODE_FAILURE.status)
    assert ended_by_the_scheduler(node) == "node failure"


@pytest.fixture
def field_run_base_workchain(started_workchain, generate_workchain):
    """The +x field run's pw.x work chain of an AlAs field response, after `setup`, as the field response builds it."""
    from polmodel.workflows.field_response import ResubmittingPwBaseWorkChain

    parent = started_workchain()
    control, electrons = parent._lelfield([0.0364, 0.0, 0.0])
    inputs = parent._base_inputs(parent._parameters(control=control, electrons=electrons), "field_x_plus")
    process = generate_workchain(ResubmittingPwBaseWorkChain, inputs)
    process.setup()
    process.validate_kpoints()
    return process


@pytest.mark.parametrize("scheduler_stderr, resubmitted", [
    (RECORDED_SCANCEL_LINE, True),
    ("slurmstepd: error: *** JOB 3 ON vm CANCELLED AT 2026-12-04T15:56:44 DUE TO TIME LIMIT ***\n", False),
    ("", False),
])
def test_a_pw_job_ended_by_the_scheduler_is_resubmitted_unchanged(field_run_base_workchain, generate_ended_job,
                                                                  scheduler_stderr, resubmitted, caplog):
    """Cut short by `scancel`, pw.x's output is incomplete: the stock PwBaseWorkChain aborts on that as an unhandled
    failure; the project's resubmits the same inputs. An output cut short at the time limit or for no recorded reason
    still aborts."""
    import copy

    from aiida.plugins import CalculationFactory

    process = field_run_base_workchain
    parameters = copy.deepcopy(process.ctx.inputs.parameters)
    incomplete = CalculationFactory("quantumespresso.pw").exit_codes.ERROR_OUTPUT_STDOUT_INCOMPLETE.status
    process.ctx.children = [generate_ended_job("quantumespresso.pw", incomplete, scheduler_stderr)]
    process.ctx.iteration = 1
    result = process.inspect_process()
    if resubmitted:
        assert result.status == 0 and not process.ctx.unhandled_failure  # 0: handled, run it again
        assert process.ctx.inputs.parameters == parameters
        # from the log records, not the Log nodes: an in-process `verdi` of an earlier test reconfigures logging
        assert "was ended by the scheduler (cancelled at 2026-12-04T15:56:44); resubmitting it unchanged" in caplog.text
    else:
        assert result.status == process.exit_codes.ERROR_UNHANDLED_FAILURE.status


def test_a_training_ended_by_the_scheduler_keeps_its_seed(generate_al_workchain, generate_frames_data, polmodel_code,
                                                          generate_ended_job):
    """A training that wrote no model is retried with a new seed when it crashed, with the same seed when the
    scheduler ended it: the ensemble is the one an uninterrupted run gives."""
    process = generate_al_workchain("polmodel.train_ensemble", {
        "frames": generate_frames_data(2), "train": {"code": polmodel_code}, "ensemble_size": orm.Int(2)})
    process.setup()
    seed = process.ctx.parameters["seed"]
    missing_model = 300  # TrainCalculation ERROR_MISSING_OUTPUT: no model, no checkpoint

    process.ctx.children = [generate_ended_job("polmodel.train", missing_model, RECORDED_SCANCEL_LINE)]
    process.ctx.iteration = 1
    assert process.inspect_process().status == 0
    assert process.ctx.parameters["seed"] == seed and process.ctx.inputs["parameters"]["seed"] == seed

    process.ctx.children.append(generate_ended_job("polmodel.train", missing_model, "FloatingPointError: nan loss\n"))
    process.ctx.iteration = 2
    assert process.inspect_process().status == 0
    assert process.ctx.parameters["seed"] == seed + 1000
