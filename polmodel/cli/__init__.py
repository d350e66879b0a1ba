"""`polmodel` command line: one sub-command per job.

Each sub-command is a module of this package (train.py, evaluate.py, domain.py, md.py, switch.py, lammps.py,
analyze.py, provenance.py, launch.py) that defines `add_arguments(parser)` and `run(args)`; this module holds `main`
and the input checks they share.
Start-up stays light: this module and the sub-command modules import only the standard library (and numpy) at module
level, and `main` imports only the module of the sub-command it runs; torch, ASE and AiiDA are imported inside each
`run`. Every `run` first checks its inputs with the helpers below and raises `InputError`, which `main` prints as one
line (exit status 2) before any work starts.
"""
import argparse
import importlib
import math
import os
import sys

# sub-command -> module that defines `add_arguments(parser)` and `run(args)`
SUBCOMMANDS = {
    "train": "polmodel.cli.train",
    "evaluate": "polmodel.cli.evaluate",
    "domain": "polmodel.cli.domain",
    "md": "polmodel.cli.md",
    "switch": "polmodel.cli.switch",
    "lammps": "polmodel.cli.lammps",
    "analyze": "polmodel.cli.analyze",
    "provenance": "polmodel.cli.provenance",
    "launch": "polmodel.cli.launch",
}
EXIT_BAD_INPUT = 2
#: a run stopped by Ctrl-C (the shell's 128 + SIGINT) that the same command continues
EXIT_INTERRUPTED = 130


class InputError(Exception):
    """A bad input to a command (missing or corrupt file, wrong kind of file, number out of range, unwritable
    output). `main` prints it as one line and exits with status 2, before any work starts; raise it from the
    checks a sub-command runs first."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (`polmodel md: argument --steps: ...`), exit status 2,
    like the commands' own input checks."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# --- input checks shared by the sub-commands (each raises InputError) ----------------------------------------


def check_input_file(path, what):
    """`path` is an existing, readable regular file."""
    if not os.path.exists(path):
        raise InputError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable")
    if os.path.getsize(path) == 0:
        raise InputError(f"{what} {path} is empty")


def check_output_file(path, what):
    """`path` can be written: not a folder, in an existing writable folder, writable if it exists."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{what} {path}: {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise InputError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{what} {path} is not writable")
    # access() says yes for root in folders no file can be made in (/proc, /sys): try, and leave no trace
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise InputError(f"{what} {path} cannot be written ({error.strerror})") from None
    if not existed:
        os.remove(path)


def check_output_folder(path, what):
    """`path` is a writable folder or can be made as one (its parent exists and is writable)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InputError(f"{what} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{what} {path} is not writable")
        return
    check_output_file(path, what)


def check_structure(atoms, what, model=None):
    """`atoms` can be given to a model: finite positions, fully periodic with a cell of volume, or fully open,
    and (with `model`) only species the model knows."""
    import numpy as np

    if not np.all(np.isfinite(atoms.positions)):
        raise InputError(f"{what} has NaN or infinite positions")
    partial = sorted({symbol for site in (atoms.info.get("occupancy") or {}).values()
                      for symbol, occupancy in site.items() if occupancy < 1.0 - 1e-6})
    if partial:   # ASE's CIF reader keeps a partly occupied site as a full atom and records the occupancy here
        raise InputError(f"{what} has partly occupied sites ({', '.join(partial)}): a disordered structure, which "
                         "ASE reads as fully occupied; order it first (e.g. pymatgen's OrderDisorderedStructure"
                         "Transformation)")
    if np.any(atoms.pbc) and not np.all(atoms.pbc):
        raise InputError(f"{what} is periodic along some directions only (pbc={atoms.pbc.tolist()}): give a fully "
                         "periodic cell or an open cluster")
    if np.all(atoms.pbc) and not (np.all(np.isfinite(atoms.cell[:])) and abs(atoms.cell.volume) > 1e-6):
        raise InputError(f"{what} is periodic but its cell has no volume ({np.asarray(atoms.cell).tolist()})")
    if model is not None:
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(model.species))
        if unknown:
            raise InputError(f"{what} has {', '.join(unknown)}, which the model does not know (it knows "
                             f"{', '.join(model.species)})")


def load_aiida_profile(name):
    """Load the AiiDA profile `name` (None: the default one); InputError naming it when there is no such profile."""
    from aiida import load_profile
    from aiida.common.exceptions import MissingConfigurationError, ProfileConfigurationError
    try:
        return load_profile(name, allow_switch=True)
    except (MissingConfigurationError, ProfileConfigurationError) as error:
        raise InputError(f"no AiiDA profile {name or '(default)'}: "
                         f"{str(error).splitlines()[0] if str(error) else 'not configured'}") from error


def check_number(value, name, *, minimum=None, maximum=None, above=None, below=None):
    """`value` is finite and inside the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    for bound, fails, relation in ((minimum, lambda b: value < b, ">="), (maximum, lambda b: value > b, "<="),
                                   (above, lambda b: value <= b, ">"), (below, lambda b: value >= b, "<")):
        if bound is not None and fails(bound):
            raise InputError(f"{name} must be {relation} {bound:g}, got {value:g}")


def load_model_file(path, what="--model"):
    """The model or ensemble in `path` (a polmodel file); InputError for anything else."""
    check_input_file(path, what)
    from polmodel.nn.serialization import ModelFileError, load
    try:
        return load(path)
    except ModelFileError as error:
        raise InputError(f"{what}: {error}") from error


# --- the command ---------------------------------------------------------------------------------------------


def _add_subcommand(subparsers, name):
    module_name = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return
    # a module with OWN_HELP adds its own -h/--help (launch: the help of the workflow named before it)
    sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=not getattr(module, "OWN_HELP", False))
    module.add_arguments(sub)
    sub.set_defaults(_run=module.run)


def build_parser(argv=None):
    """The parser; when `argv` names a sub-command, only that sub-command's module is imported."""
    parser = _Parser(prog="polmodel", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=_Parser)
    chosen = next((word for word in (argv or []) if not word.startswith("-")), None)
    for name in ([chosen] if chosen in SUBCOMMANDS else SUBCOMMANDS):
        _add_subcommand(subparsers, name)
    return parser


def default_threads():
    """CPU threads for this process when OMP_NUM_THREADS is unset: the cores not already busy (cores available to
    it minus the 1-minute load average, at least 1). torch's own default takes every core, and on a loaded machine
    its threads then wait on each other (benchmarks/README.md "Threads")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def main(argv=None):
    # before torch is imported (the sub-commands import it in `run`): it reads the variable once
    os.environ.setdefault("OMP_NUM_THREADS", str(default_threads()))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args._run(args) or 0
    except InputError as error:
        print(f"polmodel {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

