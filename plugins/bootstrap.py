"""Idempotent AiiDA set-up of this machine: ``python -m polmodel.plugins.bootstrap`` (run by ``make setup-aiida``).

Creates, when absent, and only then:
  1. the embedded profile ``polmodel`` (``setup_profiles/profile_embedded.yaml``: core.sqlite_dos + core.zeromq),
     made the default profile only if there is none;
  2. the ``localhost`` computer (``computer_localhost*.yaml``);
  3. the codes ``pw``, ``ph`` and ``polmodel`` on it (``code_*.yaml``; ``polmodel`` points at the executable next to
     this interpreter);
  4. the pseudopotential family ``DEFAULT_PSEUDO_FAMILY``, generated with ld1.x, with its recommended cutoffs.
Each step runs the very ``verdi`` command documented in the YAML file (in-process), so the files and this script
cannot drift apart. Nothing is started (no daemon) and no service (PostgreSQL, RabbitMQ) is needed. A second run
finds everything and changes nothing.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

#: Where the set-up YAML files live: ``setup_profiles/`` at the repository root.
SETUP_PROFILES_DIRECTORY = pathlib.Path(__file__).resolve().parent.parent / "setup_profiles"
PROFILE_NAME = "polmodel"
COMPUTER_LABEL = "localhost"
CODE_FILES = {"pw": "code_pw.yaml", "ph": "code_ph.yaml", "polmodel": "code_polmodel.yaml"}
#: Seconds between scheduler polls of ``localhost``: aiida's 0.1 s default keeps the daemon worker busy polling, and
#: jobs here last seconds to minutes (benchmarks/README.md "Scheduler poll interval").
JOB_POLL_INTERVAL_S = 2.0


class BootstrapError(RuntimeError):
    """A set-up step failed; the message says which and why."""


def polmodel_executable() -> pathlib.Path:
    """The ``polmodel`` console script of the environment this interpreter belongs to."""
    return pathlib.Path(sys.executable).parent / "polmodel"


def _setup_file(name: str) -> str:
    path = SETUP_PROFILES_DIRECTORY / name
    if not path.is_file():
        raise BootstrapError(f"set-up file `{path}` is missing (is this a full checkout of polmodel?)")
    return str(path)


def _verdi(*arguments: str) -> None:
    """Run one ``verdi`` command in this process; a failure becomes a ``BootstrapError`` naming the command."""
    import click

    from aiida.cmdline.commands.cmd_verdi import verdi

    try:
        verdi.main(list(arguments), prog_name="verdi", standalone_mode=False)
    except SystemExit as exception:
        if exception.code not in (0, None):
            raise BootstrapError(f"`verdi {' '.join(arguments)}` failed (exit status {exception.code})") from None
    except click.ClickException as exception:
        raise BootstrapError(f"`verdi {' '.join(arguments)}` failed: {exception.format_message()}") from None


def ensure_profile(report) -> None:
    """Create and load the embedded profile; it becomes the default only where no default exists."""
    from aiida import load_profile
    from aiida.manage.configuration import get_config

    config = get_config(create=True)
    if PROFILE_NAME in config.profile_names:
        report(f"profile `{PROFILE_NAME}` exists")
    else:
        default = "--set-as-default" if config.default_profile_name is None else "--no-set-as-default"
        _verdi("profile", "setup", "core.sqlite_dos", "--config", _setup_file("profile_embedded.yaml"), default)
        report(f"created profile `{PROFILE_NAME}` (core.sqlite_dos + core.zeromq){' as default' if default == '--set-as-default' else ''}")
    load_profile(PROFILE_NAME, allow_switch=True)


def localhost_setting(key: str):
    """A setting of ``localhost`` as ``computer_localhost.yaml`` has it (e.g. ``prepend_text``, ``mpirun_command``)."""
    import yaml

    return yaml.safe_load(pathlib.Path(_setup_file("computer_localhost.yaml")).read_text())[key]


def ensure_computer(report) -> None:
    """Set up and configure the ``localhost`` computer."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer(COMPUTER_LABEL)
        report(f"computer `{COMPUTER_LABEL}` exists")
    except NotExistent:
        _verdi("-p", PROFILE_NAME, "computer", "setup", "--config", _setup_file("computer_localhost.yaml"))
        computer = orm.load_computer(COMPUTER_LABEL)
        report(f"created computer `{COMPUTER_LABEL}` ({computer.transport_type} + {computer.scheduler_type})")
    if not computer.is_configured:
        _verdi(
            "-p", PROFILE_NAME, "computer", "configure", computer.transport_type, COMPUTER_LABEL,
            "--config", _setup_file("computer_localhost_configure.yaml"),
        )
        report(f"configured computer `{COMPUTER_LABEL}`")
    # computers made by an earlier version of this script get today's settings
    prepend_text = localhost_setting("prepend_text")
    if computer.get_prepend_text() != prepend_text:
        computer.set_prepend_text(prepend_text)
        report(f"computer `{COMPUTER_LABEL}`: prepend text (threads, job slots) from computer_localhost.yaml")
    mpirun_command = localhost_setting("mpirun_command").split()
    if computer.get_mpirun_command() != mpirun_command:
        computer.set_mpirun_command(mpirun_command)
        report(f"computer `{COMPUTER_LABEL}`: mpirun command {' '.join(mpirun_command)}")
    if computer.get_minimum_job_poll_interval() != JOB_POLL_INTERVAL_S:
        computer.set_minimum_job_poll_interval(JOB_POLL_INTERVAL_S)
        report(f"computer `{COMPUTER_LABEL}`: scheduler poll interval {JOB_POLL_INTERVAL_S} s")


def ensure_codes(report) -> None:
    """Create the ``pw``, ``ph`` and ``polmodel`` codes on ``localhost``."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    for label, filename in CODE_FILES.items():
        try:
            code = orm.load_code(f"{label}@{COMPUTER_LABEL}")
        except NotExistent:
            overrides = ["--filepath-executable", str(polmodel_executable())] if label == "polmodel" else []
            _verdi("-p", PROFILE_NAME, "code", "create", "core.code.installed", "--config", _setup_file(filename), *overrides)
            code = orm.load_code(f"{label}@{COMPUTER_LABEL}")
            report(f"created code `{code.full_label}` -> {code.filepath_executable}")
            continue
        report(f"code `{code.full_label}` exists")
        if label == "polmodel" and str(code.filepath_executable) != str(polmodel_executable()):
            # Codes are immutable once stored; a moved environment needs a new code, not a silent edit.
            report(
                f"  warning: `{code.full_label}` runs {code.filepath_executable}, this environment has "
                f"{polmodel_executable()}; create a code with another label if that is not intended"
            )


def ensure_pseudo_family(report) -> None:
    """Generate the project's pseudopotentials with ld1.x and install them as an aiida-pseudo family."""
    from aiida.plugins import GroupFactory

    from polmodel.plugins.pseudos import DEFAULT_PSEUDO_FAMILY, generate_pseudopotentials, install_pseudo_family
    from polmodel.plugins.pseudos import read_transferability_report

    if GroupFactory("pseudo.family").collection.count(filters={"label": DEFAULT_PSEUDO_FAMILY}):
        report(f"pseudopotential family `{DEFAULT_PSEUDO_FAMILY}` exists")
        return
    with tempfile.TemporaryDirectory(prefix="polmodel-ld1-") as workdir:
        files = generate_pseudopotentials(workdir)
        transferability = read_transferability_report(workdir)
        family = install_pseudo_family(files, DEFAULT_PSEUDO_FAMILY)
    report(f"created pseudopotential family `{family.label}` ({', '.join(sorted(files))}), ld1.x transferability:")
    for element, entry in sorted(transferability.items()):
        report(
            f"  {element}: max |dE_AE - dE_PS| {entry['max_energy_error_ry'] * 1e3:.2f} mRy, "
            f"max eigenvalue error {entry['max_eigenvalue_error_ry'] * 1e3:.2f} mRy"
        )


def bootstrap(report=print) -> None:
    """Run every step; each is a no-op when its object exists."""
    ensure_profile(report)
    ensure_computer(report)
    ensure_codes(report)
    ensure_pseudo_family(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polmodel.plugins.bootstrap", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from polmodel.plugins.pseudos import Ld1Error

    start = time.perf_counter()
    try:
        bootstrap(report=lambda line: print(f"[polmodel setup] {line}", flush=True))
    except (BootstrapError, Ld1Error) as exception:
        print(f"[polmodel setup] error: {exception}", file=sys.stderr)
        return 1
    print(f"[polmodel setup] done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
