"""The set-up layer: setup_profiles/*.yaml accepted by verdi, the bootstrap script, and the test profile itself."""
import json
import os
import pathlib
import secrets
import subprocess
import sys

import pytest

from polmodel.plugins.bootstrap import SETUP_PROFILES_DIRECTORY

VERDI = str(pathlib.Path(sys.executable).parent / "verdi")


def run_verdi(*arguments, aiida_path=None, check=True):
    """Run ``verdi`` as a separate process, optionally against another configuration directory."""
    env = dict(os.environ)
    if aiida_path is not None:
        env["AIIDA_PATH"] = str(aiida_path)
    completed = subprocess.run([VERDI, *map(str, arguments)], capture_output=True, text=True, env=env, timeout=300)
    if check and completed.returncode != 0:
        raise AssertionError(f"verdi {' '.join(map(str, arguments))} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def read_config(aiida_path):
    return json.loads((pathlib.Path(aiida_path) / ".aiida" / "config.json").read_text())


def setup_file(name):
    path = SETUP_PROFILES_DIRECTORY / name
    assert path.is_file(), path
    return path


# --------------------------------------------------------------------------------------------------------------
# The session's test profile
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.aiida
def test_profile_uses_sqlite_and_zeromq(aiida_profile, aiida_config, tmp_path_factory):
    from fixtures_aiida import PROCESS_POLL_INTERVAL_S

    assert aiida_profile.storage_backend == "core.sqlite_dos"
    assert aiida_profile.process_control_backend == "core.zeromq"
    # a throw-away profile in the session's temporary configuration, never a user's
    assert pathlib.Path(aiida_config.dirpath).resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())
    # not flagged a test profile, so that aiida's runners check for ended children every second and not in a busy loop
    assert not aiida_profile.is_test_profile
    assert aiida_profile.get_option("runner.poll.interval") == PROCESS_POLL_INTERVAL_S


@pytest.mark.aiida
def test_fixture_computer_and_codes(aiida_localhost, pw_code, ph_code, polmodel_code, generate_code):
    assert aiida_localhost.transport_type == "core.local"
    assert aiida_localhost.scheduler_type == "core.direct"
    assert aiida_localhost.get_mpirun_command()[:2] == ["/usr/bin/mpirun", "--allow-run-as-root"]
    assert aiida_localhost.is_configured
    assert (pw_code.full_label, str(pw_code.filepath_executable), pw_code.default_calc_job_plugin) == (
        "pw@localhost", "/usr/bin/pw.x", "quantumespresso.pw")
    assert (ph_code.full_label, ph_code.default_calc_job_plugin) == ("ph@localhost", "quantumespresso.ph")
    assert pathlib.Path(polmodel_code.filepath_executable) == pathlib.Path(sys.executable).parent / "polmodel"
    assert polmodel_code.default_calc_job_plugin is None
    assert generate_code("pw").pk == pw_code.pk  # get-or-create
    with pytest.raises(ValueError, match="unknown code"):
        generate_code("vasp")


@pytest.mark.aiida
@pytest.mark.daemon
def test_daemon_runs_workchain_with_calcfunction_and_calcjob(submit_and_await, aiida_localhost, aiida_code_installed):
    from aiida import orm
    from aiida.plugins import WorkflowFactory

    code = aiida_code_installed(label="bash", default_calc_job_plugin="core.arithmetic.add", filepath_executable="/bin/bash")
    node = submit_and_await(
        WorkflowFactory("core.arithmetic.multiply_add"),
        x=orm.Int(2), y=orm.Int(3), z=orm.Int(4), code=code, timeout=180,
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
        options={"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 2}, "withmpi": True,
                 "max_wallclock_seconds": 600},
    )
    node = submit_and_await(builder, timeout=600)
    assert node.is_finished_ok, node.exit_status
    script = node.called[-1].base.repository.get_object_content("_aiidasubmit.sh")
    assert "'/usr/bin/mpirun' '--allow-run-as-root' '--bind-to' 'none' '-np' '2' '/usr/bin/pw.x'" in script
    assert node.outputs.output_parameters["energy"] < 0
    assert node.inputs.pw.parameters["SYSTEM"]["ecutwfc"] == pytest.approx(30.0)  # the family's recommendation


# --------------------------------------------------------------------------------------------------------------
# setup_profiles/*.yaml are accepted by verdi
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.aiida
def test_embedded_profile_yaml_creates_a_sqlite_zeromq_profile(tmp_path):
    aiida_path = tmp_path / "config"
    run_verdi("profile", "setup", "core.sqlite_dos", "--config", setup_file("profile_embedded.yaml"), aiida_path=aiida_path)
    profile = read_config(aiida_path)["profiles"]["polmodel"]
    assert profile["storage"]["backend"] == "core.sqlite_dos"
    assert profile["process_control"]["backend"] == "core.zeromq"
    assert read_config(aiida_path)["default_profile"] == "polmodel"
    storage = pathlib.Path(profile["storage"]["config"]["filepath"])
    assert storage.is_dir()

    run_verdi("profile", "delete", "polmodel", "--delete-data", "--force", aiida_path=aiida_path)
    assert "polmodel" not in read_config(aiida_path)["profiles"]
    assert not storage.exists()


def _invoke_verdi_in_process(*arguments):
    """Run a verdi command against the loaded test profile without a new interpreter."""
    from aiida.cmdline.commands.cmd_verdi import verdi

    try:
        verdi.main(list(map(str, arguments)), prog_name="verdi", standalone_mode=False)
    except SystemExit as exception:
        assert exception.code in (0, None), f"verdi {' '.join(map(str, arguments))} exited with {exception.code}"


@pytest.mark.aiida
def test_computer_and_code_yaml_set_up_localhost_and_the_cluster_template(aiida_profile_clean):
    from aiida import orm

    profile = aiida_profile_clean.name
    _invoke_verdi_in_process("-p", profile, "computer", "setup", "--config", setup_file("computer_localhost.yaml"))
    _invoke_verdi_in_process("-p", profile, "computer", "configure", "core.local", "localhost",
                             "--config", setup_file("computer_localhost_configure.yaml"))
    localhost = orm.load_computer("localhost")
    assert (localhost.transport_type, localhost.scheduler_type) == ("core.local", "core.direct")
    assert localhost.get_mpirun_command() == ["/usr/bin/mpirun", "--allow-run-as-root", "--bind-to", "none", "-np",
                                              "{tot_num_mpiprocs}"]
    assert "OMP_NUM_THREADS=1" in localhost.get_prepend_text()
    assert localhost.is_configured

    for name in ("code_pw.yaml", "code_ph.yaml"):
        _invoke_verdi_in_process("-p", profile, "code", "create", "core.code.installed", "--config", setup_file(name))
    executable = pathlib.Path(sys.executable).parent / "polmodel"
    _invoke_verdi_in_process("-p", profile, "code", "create", "core.code.installed",
                             "--config", setup_file("code_polmodel.yaml"), "--filepath-executable", executable)
    assert orm.load_code("pw@localhost").default_calc_job_plugin == "quantumespresso.pw"
    assert str(orm.load_code("ph@localhost").filepath_executable) == "/usr/bin/ph.x"
    assert str(orm.load_code("polmodel@localhost").filepath_executable) == str(executable)

    # The SLURM template: setup only, configuring needs the user's key and connecting needs the cluster.
    _invoke_verdi_in_process("-p", profile, "computer", "setup", "--config", setup_file("computer_slurm.yaml"))
    cluster = orm.load_computer("cluster")
    assert (cluster.transport_type, cluster.scheduler_type) == ("core.ssh", "core.slurm")
    assert not cluster.is_configured


def test_every_setup_file_is_covered_by_a_test():
    covered = {
        "profile_embedded.yaml", "profile_production.yaml",
        "computer_localhost.yaml", "computer_localhost_configure.yaml", "computer_slurm.yaml",
        "computer_slurm_configure.yaml", "code_pw.yaml", "code_ph.yaml", "code_polmodel.yaml",
    }
    assert {path.name for path in SETUP_PROFILES_DIRECTORY.glob("*.yaml")} == covered


@pytest.mark.aiida
def test_slurm_ssh_configure_yaml_is_accepted(aiida_profile_clean, tmp_path):
    """verdi accepts the SSH configuration template once its key file exists (no connection is made)."""
    import yaml
    from aiida import orm

    key = tmp_path / "id_ed25519"
    key.write_text("not a real key; configure only records the path\n")
    configuration = yaml.safe_load(setup_file("computer_slurm_configure.yaml").read_text())
    configuration["key_filename"] = str(key)
    config_file = tmp_path / "configure.yaml"
    config_file.write_text(yaml.safe_dump(configuration))

    profile = aiida_profile_clean.name
    _invoke_verdi_in_process("-p", profile, "computer", "setup", "--config", setup_file("computer_slurm.yaml"))
    _invoke_verdi_in_process("-p", profile, "computer", "configure", "core.ssh", "cluster", "--config", config_file)
    authinfo = orm.load_computer("cluster").get_authinfo(orm.User.collection.get_default())
    assert authinfo.get_auth_params()["username"] == "myuser"
    assert authinfo.get_auth_params()["safe_interval"] == pytest.approx(30.0)


@pytest.fixture
def throwaway_postgres_database():
    """A PostgreSQL role and database that exist only for one test (local server, trust authentication)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"polmodel_test_{secrets.token_hex(6)}"
    password = secrets.token_hex(12)
    try:
        admin = psycopg.connect("host=localhost port=5432 user=postgres dbname=postgres", autocommit=True)
    except psycopg.OperationalError as exception:
        pytest.skip(f"no PostgreSQL server on localhost: {exception}")
    with admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        admin.execute(f"CREATE DATABASE {name} OWNER {name} ENCODING 'UTF8' TEMPLATE template0")
        try:
            yield {"name": name, "username": name, "password": password}
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.mark.postgres
def test_production_profile_yaml_with_real_postgres_and_rabbitmq(throwaway_postgres_database, tmp_path):
    database = throwaway_postgres_database
    aiida_path = tmp_path / "config"
    profile = f"polmodel-production-{secrets.token_hex(4)}"
    run_verdi(
        "profile", "setup", "core.psql_dos", "--config", setup_file("profile_production.yaml"),
        "--profile-name", profile,
        "--database-name", database["name"],
        "--database-username", database["username"],
        "--database-password", database["password"],
        "--repository-uri", (tmp_path / "repository").as_uri(),
        aiida_path=aiida_path,
    )
    entry = read_config(aiida_path)["profiles"][profile]
    assert entry["storage"]["backend"] == "core.psql_dos"
    assert entry["storage"]["config"]["database_name"] == database["name"]
    assert entry["process_control"]["backend"] == "core.rabbitmq", "RabbitMQ on localhost was not detected"

    status = run_verdi("-p", profile, "status", aiida_path=aiida_path, check=False)
    lines = {line.split(":")[0].strip(" ✔✘⏺"): line for line in status.stdout.splitlines() if ":" in line}
    assert lines["storage"].lstrip().startswith("✔"), status.stdout
    assert lines["broker"].lstrip().startswith("✔"), status.stdout  # RabbitMQ really answered
    assert status.returncode == 0, status.stdout + status.stderr

    run_verdi("profile", "delete", profile, "--delete-data", "--force", aiida_path=aiida_path)
    assert profile not in read_config(aiida_path)["profiles"]


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------

def run_bootstrap(aiida_path):
    env = dict(os.environ, AIIDA_PATH=str(aiida_path), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "polmodel.plugins.bootstrap"], capture_output=True, text=True, env=env, timeout=900
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return [line for line in completed.stdout.splitlines() if line.startswith("[polmodel setup]")]


@pytest.mark.aiida
@pytest.mark.dft
@pytest.mark.slow
def test_bootstrap_is_idempotent_and_keeps_an_existing_default_profile(tmp_path):
    from polmodel.plugins.pseudos import DEFAULT_PSEUDO_FAMILY

    aiida_path = tmp_path / "config"
    # Somebody's own profile is the default already: bootstrap must add `polmodel` without taking that over.
    run_verdi("profile", "setup", "core.sqlite_dos", "--config", setup_file("profile_embedded.yaml"),
              "--profile-name", "mine", aiida_path=aiida_path)

    first = run_bootstrap(aiida_path)
    created = [line for line in first if "created" in line]
    assert any("created profile `polmodel`" in line for line in created), first
    assert any("created computer `localhost`" in line for line in created), first
    for code in ("pw@localhost", "ph@localhost", "polmodel@localhost"):
        assert any(f"created code `{code}`" in line for line in created), first
    assert any(f"-> {pathlib.Path(sys.executable).parent / 'polmodel'}" in line for line in created), first
    assert any(f"created pseudopotential family `{DEFAULT_PSEUDO_FAMILY}`" in line for line in created), first
    assert read_config(aiida_path)["default_profile"] == "mine"
    assert read_config(aiida_path)["profiles"]["polmodel"]["process_control"]["backend"] == "core.zeromq"
    assert any("scheduler poll interval 2.0 s" in line for line in first), first

    second = run_bootstrap(aiida_path)
    assert not [line for line in second if "created" in line or "configured" in line or "warning" in line
                or "poll interval" in line or "prepend text" in line or "mpirun command" in line], second
    assert sum("exists" in line for line in second) == 6, second
    assert read_config(aiida_path)["default_profile"] == "mine"


def test_localhost_prelude_runs_one_job_per_core_at_a_time(tmp_path):
    """The job slots of computer_localhost.yaml: with N cores, N jobs start at once and job N+1 waits for a slot."""
    import os
    import subprocess

    import yaml

    prelude = yaml.safe_load(open(setup_file("computer_localhost.yaml")))["prepend_text"]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + prelude
                      + "\necho $(date +%s.%N) $OMP_NUM_THREADS\nsleep 2\necho $(date +%s.%N)\n")
    cores = os.cpu_count()
    # OMP_NUM_THREADS=1 is exported by the prelude itself: the slot count must not follow it (nproc would)
    env = {"PATH": os.environ["PATH"], "POLMODEL_JOB_SLOT_DIR": str(tmp_path / "slots")}
    jobs = [subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(cores + 1)]
    outputs = [job.communicate(timeout=120)[0].split() for job in jobs]
    assert all(output[1] == "1" for output in outputs)
    # (start, end) per job in start order; compared with each other, not with a clock, so a loaded machine that
    # starts the processes late cannot fail it
    runs = sorted((float(output[0]), float(output[2])) for output in outputs)
    first_end = min(end for _, end in runs[:cores])
    assert runs[cores - 1][0] < first_end, runs      # the first `cores` jobs ran together
    assert runs[cores][0] >= first_end, runs         # the next one waited until a job had ended
