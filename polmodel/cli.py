"""`polmodel` command line: one sub-command per job, each defined next to the code it drives."""
import argparse
import importlib
import sys

# sub-command -> module that defines `add_arguments(parser)` and `run(args)`
SUBCOMMANDS = {
    "train": "polmodel.train_cli",
    "md": "polmodel.md_cli",
    "analyze": "polmodel.analysis_cli",
    "provenance": "polmodel.provenance_cli",
    "launch": "polmodel.launch_cli",
}


class InputError(Exception):
    """A bad input to a command (missing or corrupt file, wrong kind of file, number out of range, unwritable
    output). `main` prints it as one line and exits with status 2, before any work starts; raise it from the
    checks a sub-command runs first."""


def build_parser():
    parser = argparse.ArgumentParser(prog="polmodel", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except InputError as error:
        print(f"polmodel {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
