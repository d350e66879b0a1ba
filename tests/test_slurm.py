"""Jobs through a real SLURM scheduler: the one-node cluster of setup_profiles/slurm_one_node.sh, reached through a
computer set up from the project's cluster template (setup_profiles/computer_slurm.yaml) with the edits the README's
cluster section tells a user to make, on the local transport.

- a field response of AlAs (`field_frames` tier: a zero-field and three finite-field pw.x runs, each under mpirun with
  2 ranks), one of whose field runs is killed with `scancel` while pw.x iterates: the restart handler resubmits it,
  and the labels come out whole and once;
- a training of a tiny ensemble (`polmodel train`);
- the check every test applies, that a job went through `sbatch`: the scheduler's own record (`scontrol show job`) of
  the job id AiiDA recorded names the calculation's working directory. A job of the `core.direct` computer fails it.

Each test prints every job's times in the scheduler's record: queued (submit to start), ran (start to end) and queue
to finish (submit to end).
"""
from __future__ import annotations

import datetime
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from fixtures_al import TINY_TRAINING
from polmodel.plugins.bootstrap import JOB_POLL_INTERVAL_S, SETUP_PROFILES_DIRECTORY, localhost_setting

pytestmark = [pytest.mark.slurm, pytest.mark.aiida]

SLURM_COMPUTER_LABEL = "slurm-localhost"
#: MPI ranks of each pw.x job: both cores of the 2-core node, so the scheduler runs one pw.x job at a time and queues
#: the others.
PW_RANKS = 2
#: The cluster template; the tests change only what its README section tells a user to change.
SLURM_TEMPLATE = SETUP_PROFILES_DIRECTORY / "computer_slurm.yaml"
#: pw.x writes this line as it starts each SCF step: a job whose output has it is mid-run.
PW_SCF_STEP = "iteration #"
#: pw.x writes this line as it exits normally.
PW_DONE = "JOB DONE."


# --- the scheduler's own record ---------------------------------------------------------------------------------------


def scheduler_record(job_id) -> dict | None:
    """The controller's record of job `job_id` (`scontrol show job`, one line of Key=Value fields), or None when the
    controller knows no such job."""
    completed = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)],
                               capture_output=True, text=True, timeout=60)
    if completed.returncode != 0:
        return None
    return dict(field.split("=", 1) for field in completed.stdout.split() if "=" in field)


def assert_submitted_through_sbatch(calculation) -> dict:
    """Fail unless the job AiiDA recorded for `calculation` is in SLURM's record, running the calculation's own
    submission script in its own working directory; return that record."""
    job_id = calculation.get_job_id()
    assert job_id is not None, f"{calculation.process_label}<{calculation.pk}> recorded no job id"
    record = scheduler_record(job_id)
    assert record is not None, (f"job {job_id} of {calculation.process_label}<{calculation.pk}> is not in SLURM's "
                                "record (`scontrol show job`): it was not submitted through sbatch")
    workdir = pathlib.Path(calculation.get_remote_workdir()).resolve()
    assert pathlib.Path(record["WorkDir"]).resolve() == workdir, (
        f"SLURM's job {job_id} ran in {record['WorkDir']}, not in the working directory of "
        f"{calculation.process_label}<{calculation.pk}> ({workdir}): that job was not this calculation's")
    assert pathlib.Path(record["Command"]).resolve() == workdir / calculation.get_option("submit_script_filename")
    return record


def seconds_between(record, start, end) -> float:
    times = [datetime.datetime.fromisoformat(record[key]) for key in (start, end)]
    return (times[1] - times[0]).total_seconds()


def print_job_times(title, rows, capsys):
    """One line per job: what it was, its id and state, and its times in the scheduler's record."""
    with capsys.disabled():
        print(f"\n{title}: job times in SLURM's record (s)")
        print(f"  {'job':>5} {'state':<10} {'queued':>6} {'ran':>5} {'queue to finish':>15}  calculation")
        for description, record in rows:
            print(f"  {record['JobId']:>5} {record['JobState']:<10} {seconds_between(record, 'SubmitTime', 'StartTime'):6.0f} "
                  f"{seconds_between(record, 'StartTime', 'EndTime'):5.0f} "
                  f"{seconds_between(record, 'SubmitTime', 'EndTime'):15.0f}  {description}")


# --- the computer and codes, from the project's templates -------------------------------------------------------------


def _verdi(*arguments):
    """A verdi command in this process, against the loaded test profile (as `make setup` runs them)."""
    from aiida.cmdline.commands.cmd_verdi import verdi

    try:
        verdi.main(list(map(str, arguments)), prog_name="verdi", standalone_mode=False)
    except SystemExit as exception:
        assert exception.code in (0, None), f"verdi {' '.join(map(str, arguments))} exited with {exception.code}"


def one_node_cluster_template(work_directory) -> dict:
    """The cluster template with the edits the README's cluster section tells a user to make, here for the one-node
    cluster on this machine."""
    import yaml

    cpus, memory_mb = subprocess.run(["sinfo", "--noheader", "--format=%c %m"], capture_output=True, text=True,
                                     check=True, timeout=60).stdout.split()[:2]
    settings = yaml.safe_load(SLURM_TEMPLATE.read_text())
    settings.update({
        "label": SLURM_COMPUTER_LABEL,
        "hostname": "localhost",
        "description": "one-node SLURM cluster on this machine (setup_profiles/slurm_one_node.sh)",
        # the jobs are submitted on the machine that runs them (on a real cluster: core.ssh to the login node)
        "transport": "core.local",
        "work_dir": str(work_directory),
        "mpiprocs_per_machine": int(cpus),
        "default_memory_per_machine": int(memory_mb) * 1024,  # kB; the template's 250 GB is not on this node
        # Open MPI's mpirun reads the allocation from SLURM's environment. srun could not start Debian's Open MPI
        # pw.x: SLURM's PMIx plugin loads libpmix.so, which Debian ships only in libpmix-dev (and its build tools).
        "mpirun_command": localhost_setting("mpirun_command"),
        # the partition and account lines stay (the one-node cluster's partition is the template's `normal`, and
        # without accounting any account is accepted); Debian has no environment modules, pw.x is on PATH
        "prepend_text": "".join(line for line in settings["prepend_text"].splitlines(keepends=True)
                                if not line.startswith("module ")),
    })
    return settings


@pytest.fixture
def slurm_computer(aiida_profile, tmp_path_factory):
    """The `slurm-localhost` computer (core.local + core.slurm), set up from the cluster template; get-or-create."""
    import yaml
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer(SLURM_COMPUTER_LABEL)
    except NotExistent:
        directory = tmp_path_factory.mktemp("slurm")
        edited_template = directory / "computer_slurm.yaml"
        edited_template.write_text(yaml.safe_dump(one_node_cluster_template(directory / "workdir")))
        _verdi("computer", "setup", "--config", edited_template)
        computer = orm.load_computer(SLURM_COMPUTER_LABEL)
        # squeue as often as on localhost: these jobs last seconds to minutes (aiida's default of 10 s suits a real
        # cluster's queue); with a 1 s poll `ps` showed the daemon worker at half a core beside the pw.x jobs
        computer.set_minimum_job_poll_interval(JOB_POLL_INTERVAL_S)
    if not computer.is_configured:
        _verdi("computer", "configure", "core.local", SLURM_COMPUTER_LABEL,
               "--config", SETUP_PROFILES_DIRECTORY / "computer_localhost_configure.yaml")
    return computer


@pytest.fixture
def slurm_code(slurm_computer):
    """Factory `slurm_code(label)`: `pw` or `polmodel` on the SLURM computer, from the project's code templates."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    def factory(label):
        try:
            return orm.load_code(f"{label}@{SLURM_COMPUTER_LABEL}")
        except NotExistent:
            pass
        extra = ["--filepath-executable", pathlib.Path(sys.executable).parent / "polmodel"] if label == "polmodel" else []
        _verdi("code", "create", "core.code.installed", "--config", SETUP_PROFILES_DIRECTORY / f"code_{label}.yaml",
               "--computer", SLURM_COMPUTER_LABEL, *extra)
        return orm.load_code(f"{label}@{SLURM_COMPUTER_LABEL}")

    return factory


def test_the_computer_is_the_template_with_the_documented_edits(slurm_computer):
    """The scheduler and the job script's header come from the template: the partition and account reach sbatch."""
    import yaml

    template = yaml.safe_load(SLURM_TEMPLATE.read_text())
    assert (slurm_computer.scheduler_type, slurm_computer.transport_type) == ("core.slurm", "core.local")
    assert slurm_computer.get_shebang() == template["shebang"]
    assert "#SBATCH --partition=normal" in slurm_computer.get_prepend_text()
    assert "module load" not in slurm_computer.get_prepend_text()


# --- the check itself ---------------------------------------------------------------------------------------------------


def test_the_sbatch_check_fails_for_a_job_that_did_not_go_through_slurm(slurm_computer, aiida_localhost, capsys):
    """The same small job on the SLURM computer passes the check and on the `core.direct` computer fails it."""
    from aiida import orm
    from aiida.engine import run_get_node
    from aiida.plugins import CalculationFactory

    ArithmeticAddCalculation = CalculationFactory("core.arithmetic.add")
    nodes = {}
    for computer in (slurm_computer, aiida_localhost):
        code = orm.InstalledCode(computer=computer, filepath_executable="/bin/bash",
                                 default_calc_job_plugin="core.arithmetic.add")
        _, nodes[computer.label] = run_get_node(ArithmeticAddCalculation, code=code, x=orm.Int(1), y=orm.Int(2),
                                                metadata={"options": {"resources": {"num_machines": 1,
                                                                                    "num_mpiprocs_per_machine": 1}}})
    assert all(node.is_finished_ok and node.outputs.sum.value == 3 for node in nodes.values())

    record = assert_submitted_through_sbatch(nodes[SLURM_COMPUTER_LABEL])
    assert record["JobState"] == "COMPLETED" and record["Partition"] == "normal"
    with pytest.raises(AssertionError, match="not submitted through sbatch|was not this calculation's"):
        assert_submitted_through_sbatch(nodes[aiida_localhost.label])
    print_job_times("arithmetic add", [("ArithmeticAddCalculation", record)], capsys)


# --- a field response with a scancel, and a training ---------------------------------------------------------------------


def call_link_label(node):
    """The label under which `node`'s caller called it (the field response's run keys: zero_field, field_x_plus, ...)."""
    from aiida.common.links import LinkType

    return node.base.links.get_incoming(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).one().link_label


def pw_calculations(node):
    from aiida import orm

    return sorted((child for child in node.called_descendants if isinstance(child, orm.CalcJobNode)
                   and child.process_type.endswith("quantumespresso.pw")), key=lambda child: child.pk)


def scancel_a_field_run_mid_scf(workchain, timeout=900):
    """Wait until pw.x of a finite-field run writes its SCF steps, `scancel` that job and return its CalcJobNode."""
    from aiida import orm

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for calculation in pw_calculations(orm.load_node(workchain.pk)):
            if calculation.is_terminated or calculation.get_job_id() is None:
                continue
            if not call_link_label(calculation.caller).startswith("field_vector_"):
                continue
            output = pathlib.Path(calculation.get_remote_workdir()) / calculation.get_option("output_filename")
            if output.is_file() and PW_SCF_STEP in output.read_text(errors="replace"):
                subprocess.run(["scancel", calculation.get_job_id()], check=True, timeout=60)
                return calculation
        assert not workchain.is_terminated, "the field response ended before any field run could be cancelled"
        time.sleep(0.2)
    pytest.fail(f"no field run of {workchain.process_label}<{workchain.pk}> reached its SCF within {timeout} s")


@pytest.mark.dft
@pytest.mark.daemon
@pytest.mark.slow
def test_field_response_through_slurm_survives_scancel_of_a_field_run(slurm_code, alas_structure, alas_lda_family,
                                                                      submit_and_await, capsys):
    from aiida import orm
    from aiida.engine import submit

    from polmodel.workflows.field_response import FieldResponseWorkChain, pw_runs_per_label

    options = {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": PW_RANKS}, "withmpi": True,
               "max_wallclock_seconds": 1800}
    # the `fast` protocol's k-mesh (5x5x5 for AlAs): about 9 s of pw.x per run, long enough to be caught mid-SCF;
    # fields +ε along x, y and z (the tier's default): one-sided Z* and α
    builder = FieldResponseWorkChain.get_builder_from_protocol(
        slurm_code("pw"), alas_structure, protocol="fast", pseudo_family=alas_lda_family.label, options=options,
        tier="field_frames")
    started = time.monotonic()
    node = submit(builder)
    cancelled = scancel_a_field_run_mid_scf(node)
    node = submit_and_await(node, timeout=1500)
    wall = time.monotonic() - started
    assert node.is_finished_ok, (node.exit_status, node.exit_message,
                                 [log.message for log in orm.Log.collection.get_logs_for(node)])

    # every pw.x job went through sbatch, with 2 MPI ranks; all but the cancelled one completed
    calculations = pw_calculations(node)
    records = {calculation.pk: assert_submitted_through_sbatch(calculation) for calculation in calculations}
    for calculation in calculations:
        record = records[calculation.pk]
        assert (record["NumTasks"], record["NumCPUs"]) == (str(PW_RANKS), str(PW_RANKS))
        output = calculation.outputs.retrieved.base.repository.get_object_content(calculation.get_option("output_filename"))
        if calculation.pk == cancelled.pk:
            assert record["JobState"] == "CANCELLED", record
            assert calculation.is_failed and PW_DONE not in output, "the cancelled job's pw.x was not cut short"
        else:
            assert record["JobState"] == "COMPLETED" and calculation.is_finished_ok, record
            assert re.search(rf"running on\s+{PW_RANKS} processors", output), "pw.x did not run with 2 MPI ranks"

    # the restart handler resubmitted the cancelled job unchanged, and the run's outputs are the resubmitted job's
    base = cancelled.caller
    attempts = pw_calculations(base)
    assert [attempt.pk for attempt in attempts][0] == cancelled.pk and len(attempts) == 2
    rerun = attempts[1]
    assert rerun.is_finished_ok
    assert rerun.inputs.parameters.get_dict() == cancelled.inputs.parameters.get_dict()
    assert rerun.inputs.structure.uuid == cancelled.inputs.structure.uuid
    assert rerun.inputs.kpoints.get_kpoints_mesh() == cancelled.inputs.kpoints.get_kpoints_mesh()
    assert base.is_finished_ok and base.outputs.output_parameters.creator.uuid == rerun.uuid
    reports = [log.message for log in orm.Log.collection.get_logs_for(base)]
    assert any(f"job {cancelled.get_job_id()}) was ended by the scheduler" in message for message in reports), reports

    # nothing lost, nothing duplicated: every run of the label once, one pw.x job more than the label costs, every
    # frame from a finished job and none from the cancelled one
    labels = sorted(call_link_label(child) for child in node.called if child.process_label.endswith("PwBaseWorkChain"))
    assert labels == ["field_vector_000", "field_vector_001", "field_vector_002", "zero_field"]
    assert len(calculations) == pw_runs_per_label("field_frames", node.inputs.field_vectors.get_list()) + 1 == 5
    frames = node.outputs.frames.get_atoms()
    sources = [frame.info["source"] for frame in frames]
    assert len(frames) == 4 and len(set(sources)) == 4
    assert cancelled.uuid not in sources and rerun.uuid in sources
    assert all(orm.load_node(source).is_finished_ok for source in sources)
    born = node.outputs.born_effective_charges.get_array("born_effective_charges")
    assert born.shape == (2, 3, 3) and 1.5 < born[0, 0, 0] < 2.7  # Z*(Al) of AlAs: about 2.1 e

    rows = [(f"{call_link_label(calculation.caller)} PwCalculation<{calculation.pk}>"
             + (" (cancelled)" if calculation.pk == cancelled.pk else ""), records[calculation.pk])
            for calculation in calculations]
    print_job_times(f"field response of AlAs, {len(calculations)} pw.x jobs, {wall:.0f} s from submission to the end",
                    rows, capsys)


@pytest.mark.daemon
@pytest.mark.slow
def test_training_through_slurm(slurm_code, generate_frames_data, submit_and_await, capsys):
    from aiida import orm

    from polmodel.workflows.train_ensemble import TrainEnsembleWorkChain

    frames = generate_frames_data(count=6)
    inputs = {
        "frames": frames,
        "ensemble_size": orm.Int(2),
        "train": {
            "code": slurm_code("polmodel"),
            "parameters": orm.Dict({"epochs": 4, "hyperparameters": TINY_TRAINING}),
            "metadata": {"options": {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1},
                                     "max_wallclock_seconds": 1800}},
        },
    }
    node = submit_and_await(TrainEnsembleWorkChain, timeout=900, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message,
                                 [log.message for log in orm.Log.collection.get_logs_for(node)])
    (training,) = [child for child in node.called if isinstance(child, orm.CalcJobNode)]
    record = assert_submitted_through_sbatch(training)
    assert record["JobState"] == "COMPLETED" and record["NumCPUs"] == "1"
    model = node.outputs.model
    assert model.kind == "ensemble" and model.ensemble_size == 2 and model.verify() == model.sha256
    assert model.creator.uuid == training.uuid
    # the validation errors the parser copied from the job's metrics: the training ran to its end
    assert {"energy", "forces"} <= set(model.metrics)
    assert all(np.isfinite(errors["mae"]) for errors in model.metrics.values())
    print_job_times("training of a 2-member ensemble", [(f"TrainCalculation<{training.pk}>", record)], capsys)
