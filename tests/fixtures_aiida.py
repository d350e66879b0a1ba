"""AiiDA test fixtures shared by every AiiDA-facing test of polmodel.

The session runs on a throw-away AiiDA configuration directory with one test profile on ``core.sqlite_dos`` storage
and the ``core.zeromq`` broker, so processes can be submitted to a real daemon without PostgreSQL or RabbitMQ.
aiida-core's own fixtures (``aiida.tools.pytest_fixtures``) do the heavy lifting; this module only swaps in the
broker and adds the project's computer, codes and pseudopotential family.

The configuration and profile fixtures are autouse (as in aiida-core): every test of the session, AiiDA or not,
sees ``AIIDA_PATH`` pointing at the temporary configuration, so no test (nor a ``verdi`` subprocess it starts) can
touch a user's real profile.

Factory fixtures (call them inside the test):
    ``aiida_localhost``   the ``localhost`` computer (core.local + core.direct, MPI through ``mpirun``)
    ``generate_code``     ``generate_code("pw")`` / ``("ph")`` / ``("polmodel")`` -> stored ``InstalledCode``
Ready-made nodes: ``pw_code``, ``ph_code``, ``polmodel_code``, ``pseudo_family``.
Daemon: ``daemon_client``, ``started_daemon_client``, ``stopped_daemon_client``, ``submit_and_await`` (aiida-core).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest

# The daemon is launched through ``verdi``, looked up on PATH when aiida is imported; ``.venv/bin/pytest`` runs
# without an activated environment, so the interpreter's own bin directory goes first on PATH.
if shutil.which("verdi") is None:
    os.environ["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])

from polmodel.plugins.bootstrap import localhost_setting  # noqa: E402
from aiida.tools.pytest_fixtures import (  # noqa: E402,F401  (re-exported as fixtures of this plugin)
    aiida_code,
    aiida_code_installed,
    aiida_config,
    aiida_config_factory,
    aiida_manager,
    aiida_profile_clean,
    aiida_profile_clean_class,
    aiida_profile_factory,
    daemon_client,
    run_aiida_broker_service,
    run_aiida_broker_service_for_profile,
    started_daemon_client,
    stopped_daemon_client,
    submit_and_await,
)

#: Label of the computer the fixtures and the embedded profile use.
LOCALHOST_LABEL = "localhost"
#: Seconds between a waiting process's checks that its children have ended, the backup of the broker's broadcast.
#: aiida checks every 0 s on a test profile: a daemon worker waiting on a few children then re-reads their nodes in a
#: busy loop (80 % of a core by `ps`, SQLite queries by py-spy), and on two cores it starved the daemon tests' jobs
#: (a 2-rank pw.x run of 9 s took 5-7 min through SLURM beside it). Production profiles use aiida's 60 s.
PROCESS_POLL_INTERVAL_S = 1
#: Executables of the codes, keyed by the code label.
CODE_EXECUTABLES = {
    "pw": ("/usr/bin/pw.x", "quantumespresso.pw"),
    "ph": ("/usr/bin/ph.x", "quantumespresso.ph"),
    # The polmodel executable serves several CalcJobs (train, md), so it has no default plugin.
    "polmodel": (str(pathlib.Path(sys.executable).parent / "polmodel"), None),
}


@pytest.fixture(scope="session", autouse=True)
def aiida_profile(aiida_config, aiida_profile_factory):
    """Session test profile: ``core.sqlite_dos`` storage and the ``core.zeromq`` broker (daemon-capable, no services).

    Overrides aiida-core's fixture of the same name, which defines no broker.
    """
    with aiida_profile_factory(aiida_config, storage_backend="core.sqlite_dos", broker_backend="core.zeromq") as profile:
        # Two busy cores make the 2 s default too short for circus calls (start/stop of the daemon).
        aiida_config.set_option("daemon.timeout", 30, scope=profile.name)
        # Not a test profile for aiida's runners, so that they poll every PROCESS_POLL_INTERVAL_S and not in a busy
        # loop (aiida's only other uses of the flag: RabbitMQ's testing mode, not used here, and `verdi daemon
        # start-all`); the storage is still this session's own, emptied by `reset_storage` as before.
        profile.is_test_profile = False
        aiida_config.update_profile(profile)
        aiida_config.set_option("runner.poll.interval", PROCESS_POLL_INTERVAL_S, scope=profile.name)
        aiida_config.store()
        yield profile


@pytest.fixture(scope="session")
def aiida_work_directory(tmp_path_factory) -> pathlib.Path:
    """Scratch directory of the ``localhost`` computer for the whole session."""
    return tmp_path_factory.mktemp("aiida_workdir")


@pytest.fixture
def aiida_localhost(aiida_profile, aiida_work_directory):
    """The configured ``localhost`` computer (core.local transport, core.direct scheduler, MPI through mpirun).

    Get-or-create by label, so it survives ``aiida_profile_clean`` (which empties the storage) by being recreated.
    """
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer(LOCALHOST_LABEL)
    except NotExistent:
        computer = orm.Computer(
            label=LOCALHOST_LABEL,
            description="this machine (test session)",
            hostname="localhost",
            transport_type="core.local",
            scheduler_type="core.direct",
            workdir=str(aiida_work_directory),
        ).store()
        computer.set_mpirun_command(localhost_setting("mpirun_command").split())
        computer.set_default_mpiprocs_per_machine(1)
        # 1 s: polling every job with no pause kept the daemon worker busy on a core that pw.x needs
        computer.set_minimum_job_poll_interval(1.0)
        # one thread per rank and machine-wide job slots, as `make setup` configures localhost
        computer.set_prepend_text(localhost_setting("prepend_text"))
    if not computer.is_configured:
        computer.configure(safe_interval=0.0)
    return computer


@pytest.fixture
def aiida_profile_for_import(aiida_profile_clean):
    """The session profile with empty storage, emptied again when the test ends (pass or fail): for tests that
    import an archive. The import lands as on a new machine, and the archive's own ``localhost`` computer and codes
    (another machine's executable paths) cannot serve later tests' ``polmodel@localhost``."""
    yield aiida_profile_clean
    aiida_profile_clean.reset_storage()


@pytest.fixture
def generate_code(aiida_localhost):
    """Factory ``generate_code(label) -> InstalledCode`` for the project's executables (``pw``, ``ph``, ``polmodel``).

    Get-or-create by ``label@localhost``; ``with_mpi`` is left unset so each calculation chooses through its
    ``metadata.options.withmpi``.
    """
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    def factory(label: str) -> orm.InstalledCode:
        if label not in CODE_EXECUTABLES:
            raise ValueError(f"unknown code `{label}`; known codes: {sorted(CODE_EXECUTABLES)}")
        try:
            return orm.load_code(f"{label}@{LOCALHOST_LABEL}")
        except NotExistent:
            pass
        executable, plugin = CODE_EXECUTABLES[label]
        if not pathlib.Path(executable).is_file():
            pytest.skip(f"executable `{executable}` of code `{label}` is not installed")
        return orm.InstalledCode(
            label=label,
            computer=aiida_localhost,
            filepath_executable=executable,
            default_calc_job_plugin=plugin,
        ).store()

    return factory


@pytest.fixture
def pw_code(generate_code):
    """``pw@localhost``: /usr/bin/pw.x with plugin ``quantumespresso.pw``."""
    return generate_code("pw")


@pytest.fixture
def ph_code(generate_code):
    """``ph@localhost``: /usr/bin/ph.x with plugin ``quantumespresso.ph``."""
    return generate_code("ph")


@pytest.fixture
def polmodel_code(generate_code):
    """``polmodel@localhost``: the virtual environment's ``polmodel`` executable (no default plugin)."""
    return generate_code("polmodel")


@pytest.fixture(scope="session")
def pseudopotential_directory(tmp_path_factory) -> pathlib.Path:
    """Directory holding the project's pseudopotentials, generated once per session with ld1.x (with the
    transferability report ``transferability.json``, see ``polmodel.plugins.pseudos.read_transferability_report``)."""
    from polmodel.plugins.pseudos import generate_pseudopotentials

    directory = tmp_path_factory.mktemp("pseudos")
    generate_pseudopotentials(directory)
    return directory


@pytest.fixture(scope="session")
def pseudopotential_files(pseudopotential_directory) -> dict:
    """``{element: Path}`` of the project's generated UPF files."""
    from polmodel.plugins.pseudos import read_transferability_report

    return {element: pathlib.Path(entry["path"]) for element, entry in read_transferability_report(pseudopotential_directory).items()}


@pytest.fixture
def pseudo_family(aiida_profile, pseudopotential_files):
    """The project's pseudopotential family (aiida-pseudo, with recommended cutoffs), stored in the test profile."""
    from polmodel.plugins.pseudos import install_pseudo_family

    return install_pseudo_family(pseudopotential_files)
