"""Set-up layer: the embedded test profile, daemon, computer and codes (smoke tests first)."""
import pytest


@pytest.mark.aiida
def test_profile_uses_sqlite_and_zeromq(aiida_profile):
    assert aiida_profile.storage_backend == "core.sqlite_dos"
    assert aiida_profile.process_control_backend == "core.zeromq"


@pytest.mark.aiida
@pytest.mark.daemon
def test_daemon_runs_workchain_with_calcfunction_and_calcjob(submit_and_await, aiida_localhost, aiida_code_installed):
    from aiida import orm
    from aiida.plugins import WorkflowFactory

    code = aiida_code_installed(label="bash", default_calc_job_plugin="core.arithmetic.add", filepath_executable="/bin/bash")
    node = submit_and_await(
        WorkflowFactory("core.arithmetic.multiply_add"),
        x=orm.Int(2), y=orm.Int(3), z=orm.Int(4), code=code, timeout=120,
    )
    assert node.is_finished_ok, node.exit_status
    assert node.outputs.result.value == 10


@pytest.mark.aiida
@pytest.mark.daemon
@pytest.mark.dft
def test_daemon_runs_pw_with_project_codes_and_pseudos(submit_and_await, pw_code, pseudo_family):
    """pw@localhost + the project's family + mpirun on two ranks, end to end through the daemon."""
    from aiida import orm
    from aiida.plugins import WorkflowFactory
    from ase.build import bulk

    structure = orm.StructureData(ase=bulk("Si", "diamond", a=5.47))
    builder = WorkflowFactory("quantumespresso.pw.base").get_builder_from_protocol(
        pw_code,
        structure,
        protocol="fast",
        overrides={"pseudo_family": pseudo_family.label, "kpoints_distance": 0.5},
        options={"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 2}, "withmpi": True, "max_wallclock_seconds": 300},
    )
    node = submit_and_await(builder, timeout=300)
    assert node.is_finished_ok, node.exit_status
    calc = node.called[-1]
    assert "'mpirun' '--allow-run-as-root' '-np' '2' '/usr/bin/pw.x'" in calc.base.repository.get_object_content("_aiidasubmit.sh")
    assert node.outputs.output_parameters["energy"] < 0
    assert node.inputs.pw.parameters["SYSTEM"]["ecutwfc"] == pytest.approx(30.0)
