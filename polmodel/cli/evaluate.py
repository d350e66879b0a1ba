"""Errors of a model or an ensemble on labelled frames it did not train on, with parity plots.

`polmodel evaluate MODEL FRAMES.xyz [--metrics errors.json] [--plots DIR]`: MAE and RMSE per labelled quantity
(energy and polarizability per atom, forces, stress, cell dipole per atom folded onto the prediction's branch,
Born charges; units as in `polmodel train`'s metrics), printed as a table and optionally written as JSON, and a
parity plot per quantity. An ensemble is evaluated by its member mean. The frames are extended XYZ in the format
the DFT labels are written in (docs/conventions.md).
"""
import json
import os


def add_arguments(parser):
    parser.add_argument("model", help="model or ensemble file (polmodel train --output)")
    parser.add_argument("frames", help="labelled frames (extended XYZ), e.g. held-out DFT labels")
    parser.add_argument("--metrics", default=None, help="write the errors to this JSON file")
    parser.add_argument("--allow-predictions", action="store_true",
                        help="take frames written by `polmodel md` (a model's own predictions) as if they were labels")
    parser.add_argument("--plots", default=None, metavar="DIR", help="write parity plots (PNG) to this folder")


def _check_inputs(args):
    from polmodel.cli import check_input_file, check_output_file, check_output_folder

    check_input_file(args.model, "model")
    check_input_file(args.frames, "frames file")
    if args.metrics:
        check_output_file(args.metrics, "--metrics")
    if args.plots:
        check_output_folder(args.plots, "--plots")


def run(args):
    from polmodel.cli import InputError, load_model_file

    _check_inputs(args)
    model = load_model_file(args.model, "model")
    from polmodel.cli.train import refuse_predictions
    from polmodel.data.frames import read_frames

    try:
        frames = read_frames(args.frames)
    except (ValueError, KeyError, OSError) as error:
        raise InputError(f"frames file {args.frames}: {error}") from error
    try:
        refuse_predictions(frames, args)
    except ValueError as error:
        raise InputError(str(error)) from error
    unknown = sorted({symbol for frame in frames for symbol in frame.get_chemical_symbols()} - set(model.species))
    if unknown:
        raise InputError(f"frames file {args.frames} has {', '.join(unknown)}, which the model does not know "
                         f"(it knows {', '.join(model.species)})")
    try:
        result = evaluate_frames(model, frames, args.plots)
    except ValueError as error:
        raise InputError(f"frames file {args.frames}: {error}") from error
    print_errors(result["errors"])
    if args.metrics:
        metrics = {"model": os.path.abspath(args.model), "frames": os.path.abspath(args.frames), **result}
        with open(args.metrics, "w") as handle:
            json.dump(metrics, handle, indent=2)
    return 0


def evaluate_frames(model, frames, plots_dir=None):
    """polmodel.training.evaluation.evaluate_frames, its home; also here for scripts that take it from the command
    (benchmarks/quartz_heldout.py). Imported when called: torch stays out of `polmodel --help`."""
    from polmodel.training.evaluation import evaluate_frames as evaluate

    return evaluate(model, frames, plots_dir)


def print_errors(errors):
    for quantity, entry in errors.items():
        print(f"{quantity:24s} MAE {entry['mae']:.4g}  RMSE {entry['rmse']:.4g}  {entry['unit']}  "
              f"({entry['count']} values)")
