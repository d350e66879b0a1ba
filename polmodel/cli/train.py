"""Train a model (or an ensemble) on labelled frames and write it, its validation metrics and parity plots.

`polmodel train FRAMES.xyz --output model.pt [--ensemble K] [--bootstrap] [--seed S] [--epochs N]
[--hyperparameters JSON_FILE_OR_STRING] [--metrics metrics.json] [--plots DIR] [--validation-fraction F]
[--initial-model FILE] [--checkpoint PATH] [--quiet]`. The --hyperparameters JSON may hold the architecture (PolModel
keywords: num_features, lmax, ...; also under "architecture" or its alias "hyperparameters") and any TrainingConfig
option (cutoff, learning_rate, batch_size, loss_weights, ema_decay, checkpoint_every, ...); the command-line flags win.
--initial-model starts from a previous model or ensemble file (member k of the new ensemble from member k mod M);
--checkpoint saves the training state there (one file per member of an ensemble: PATH's stem + .memberK) and
resumes from it when it exists, so a killed job started again with the same command ends as if never killed.
"""
import json
import os
import sys


def add_arguments(parser):
    parser.add_argument("frames", help="labelled frames, extended XYZ (docs/conventions.md)")
    parser.add_argument("--output", required=True, help="model file to write (polmodel format)")
    parser.add_argument("--ensemble", type=int, default=1, metavar="K", help="number of members (default 1)")
    parser.add_argument("--bootstrap", action="store_true", help="train each member on a bootstrap resample")
    parser.add_argument("--retrain-outliers", action="store_true",
                        help="train a member again from scratch when its error on the training frames is an outlier "
                             "among the members' (polmodel.training.ensembles.OUTLIER_FACTOR)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the split and of the first member")
    parser.add_argument("--epochs", type=int, default=None, help="maximum number of epochs")
    parser.add_argument("--hyperparameters", default=None, metavar="JSON_FILE_OR_STRING",
                        help="model hyperparameters and training options as a JSON file or string")
    parser.add_argument("--metrics", default=None, help="write validation metrics to this JSON file")
    parser.add_argument("--plots", default=None, metavar="DIR", help="write parity plots (PNG) to this folder")
    parser.add_argument("--validation-fraction", type=float, default=None, help="fraction held out (default 0.1)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--initial-model", default=None, metavar="FILE",
                        help="warm start from this model or ensemble file (polmodel format)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="save the training state here every checkpoint_every epochs; resume when it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-predictions", action="store_true",
                        help="take frames written by `polmodel md` (a model's own predictions) as if they were labels")


def load_options(text):
    """A JSON object from a file path or an inline string; a clear error for anything else."""
    if text is None:
        return {}
    source = text
    if os.path.exists(text):
        with open(text) as handle:
            source = handle.read()
    try:
        options = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"--hyperparameters is neither a JSON file nor a JSON string: {error}") from error
    if not isinstance(options, dict):
        raise ValueError("--hyperparameters must be a JSON object")
    return options


def build_config(args):
    """TrainingConfig from --hyperparameters (model keys go to `architecture`) and the command-line flags."""
    from polmodel.nn.model import DEFAULT_ARCHITECTURE
    from polmodel.training.config import TrainingConfig

    options = load_options(args.hyperparameters)
    model_options = {name: options.pop(name) for name in list(options) if name in DEFAULT_ARCHITECTURE}
    # the nested "hyperparameters" alias of "architecture" is TrainingConfig.from_dict's to merge (beneath both)
    options["architecture"] = {**options.get("architecture", {}), **model_options}
    for flag, name in (("seed", "seed"), ("epochs", "epochs"), ("validation_fraction", "validation_fraction"),
                       ("device", "device")):
        if getattr(args, flag) is not None:
            options[name] = getattr(args, flag)
    options["quiet"] = bool(args.quiet or options.get("quiet", False))
    return TrainingConfig.from_dict(options)


def load_initial_model(path):
    """The warm-start model or ensemble of --initial-model; InputError naming the file if it is unusable."""
    from polmodel.cli import InputError
    from polmodel.nn.serialization import ModelFileError, load

    if path is None:
        return None
    try:
        return load(path)
    except ModelFileError as error:
        raise InputError(f"--initial-model: {error}") from error


def check_checkpoint_path(path):
    """--checkpoint must be a file in an existing folder (checked before training, not at the first save)."""
    from polmodel.cli import InputError

    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"--checkpoint {path}: must be a file in an existing, writable folder")


def _check_inputs(args):
    """The checks that need no training: files, outputs, numbers (InputError, before any work)."""
    from polmodel.cli import InputError, check_input_file, check_number, check_output_file, check_output_folder

    check_input_file(args.frames, "frames file")
    check_output_file(args.output, "--output")
    if args.metrics:
        check_output_file(args.metrics, "--metrics")
    if args.plots:
        check_output_folder(args.plots, "--plots")
    if args.ensemble < 1:
        raise InputError(f"--ensemble must be >= 1, got {args.ensemble}")
    if args.epochs is not None and args.epochs < 0:
        raise InputError(f"--epochs must be >= 0, got {args.epochs}")
    check_number(args.validation_fraction, "--validation-fraction", minimum=0.0, below=1.0)


def run(args):
    from polmodel.runtime.allocator import keep_freed_memory_in_heap
    keep_freed_memory_in_heap()   # this process is ours: the measured speed-up on large cells (runtime/allocator.py)
    _check_inputs(args)
    from polmodel.data.frames import read_frames
    from polmodel.nn import serialization
    from polmodel.runtime.devices import resolve_device
    from polmodel.training.data import split_frames
    from polmodel.training.ensembles import OUTLIER_FACTOR, train_ensemble
    from polmodel.training.evaluation import predict_pairs
    from polmodel.training.parity_plots import write_parity_plots

    try:
        config = build_config(args)
        resolve_device(config.device)
        frames = read_frames(args.frames)
        refuse_predictions(frames, args)
        initial_model = load_initial_model(args.initial_model)
        check_checkpoint_path(args.checkpoint)
    except (ValueError, OSError) as error:   # a UnicodeDecodeError of a binary file is a ValueError
        print(f"polmodel train: {error}", file=sys.stderr)
        return 2

    try:
        model, metrics = train_ensemble(frames, config, size=args.ensemble, bootstrap=args.bootstrap,
                                        initial_model=initial_model, checkpoint=args.checkpoint,
                                        retrain_outliers=args.retrain_outliers)
    except ValueError as error:  # e.g. frames without any label, a model option PolModel rejects, a foreign checkpoint
        print(f"polmodel train: {error}", file=sys.stderr)
        return 2
    if args.ensemble == 1:
        model = model.members[0]
    saved_elsewhere = save_or_keep(model, args.output)
    if saved_elsewhere:
        return 1
    metrics["config"] = config.as_dict()
    metrics["model_file"] = os.path.abspath(args.output)
    metrics["model_sha256"] = serialization.file_sha256(args.output)
    if args.initial_model:
        metrics["initial_model_sha256"] = serialization.file_sha256(args.initial_model)

    if args.plots:
        train_frames, valid_frames = split_frames(frames, config.validation_fraction, config.seed)
        pairs = predict_pairs(model, valid_frames or train_frames)
        metrics["plots"] = [os.path.abspath(p) for p in write_parity_plots(pairs, args.plots)]
    if args.metrics:
        with open(args.metrics, "w") as handle:
            json.dump(metrics, handle, indent=2)
    for member, quantities in metrics.get("outlier_members", {}).items():   # a warning even with --quiet
        print(f"polmodel train: member {member}'s error on its training frames of {', '.join(quantities)} is above "
              f"{OUTLIER_FACTOR:g}x the other members' ("
              + ("it stayed so after a retraining from scratch" if "retrained" in metrics["members"][int(member)]
                 else "--retrain-outliers trains it again from scratch") + ")", file=sys.stderr)
    if not args.quiet:
        summary = ", ".join(f"{q} MAE {m['mae']:.3g} {m['unit']}" for q, m in metrics["validation"].items())
        print(f"wrote {args.output} ({metrics['num_train']} train / {metrics['num_validation']} validation frames): "
              f"{summary}")
    return 0


def save_or_keep(model, output):
    """Save the trained model at `output`; if that fails after the work (a full disk, a folder removed during
    training), save it in the working directory or the temporary one instead, say where on one line and return
    that path (None when `output` was written)."""
    import tempfile
    import time

    from polmodel.nn import serialization
    try:
        serialization.save(model, output)
        return None
    except (OSError, RuntimeError) as error:   # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    name = f"polmodel-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.pt"
    for folder in (os.getcwd(), tempfile.gettempdir()):
        fallback = os.path.join(folder, name)
        try:
            serialization.save(model, fallback)
        except (OSError, RuntimeError):
            continue
        print(f"polmodel train: cannot write --output {output} ({reason}); the trained model is saved at {fallback}",
              file=sys.stderr)
        return fallback
    print(f"polmodel train: cannot write --output {output} ({reason}) nor a copy in {os.getcwd()} or "
          f"{tempfile.gettempdir()}: the trained model is lost", file=sys.stderr)
    return output


def refuse_predictions(frames, args):
    """ValueError when the frames are a `polmodel md` trajectory (unless --allow-predictions): training or
    evaluating on a model's own predictions would report agreement that measures nothing."""
    from polmodel.data.frames import model_prediction_frames

    predicted = model_prediction_frames(frames)
    if predicted and not args.allow_predictions:
        raise ValueError(f"frames file {args.frames}: {len(predicted)} of its {len(frames)} frames are records of a "
                         "`polmodel md` run, whose energies and forces are a model's predictions, not DFT labels "
                         "(--allow-predictions takes them anyway)")

