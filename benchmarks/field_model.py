"""The field coupling before and after issue 12, side by side: same frames, split, seeds and training settings.

- before: the gate-only field coupling (`field_readout` 0) with the field in V/Å (a field scale of 1 V/Å), the
  model as it was before the field readout and the field scale;
- after: the default model (field readout, field scale from the training fields).
Everything else (architecture, EMA, field-magnitude weights, loss weights, optimizer) is the same, so the
comparison isolates the field coupling.

Frames: `--frames FILE` (labelled extended XYZ, e.g. an active-learning loop's dataset written by
`verdi data core.array ...` or `FramesData.get_atoms()`), split by structure with `--validation-fraction`; or
`--toy` (THE ANALYTIC TOY POTENTIAL of tests/toy_potential.py, not DFT: 16 training and 5 validation structures,
each at zero field and at three fields of magnitude `--toy-field`, V/Å; 0.0364 is that of the DFT protocols).

Per layout and seed it prints the validation MAEs (E and α per atom, F, P as cell dipole per atom, Z*) of the
returned model, the epoch at which the validation Z* RMSE first fell to half its untrained value, and the epoch at
which it first came within 10 % of its lowest value in the run ("converged").

    python benchmarks/field_model.py --toy --seeds 0 1 --epochs 40
    python benchmarks/field_model.py --frames demo_dataset.xyz --seeds 0 1 --epochs 300 --patience 100
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from polmodel.training.config import TrainingConfig
from polmodel.training.data import split_frames
from polmodel.training.evaluation import evaluate, learning_milestones
from polmodel.training.train import initialize_model, train_model

BORN = "born_effective_charges"
LAYOUTS = {"before": {"field_readout": 0}, "after": {}}
#: The quantities of the table: (metric key, column title)
COLUMNS = (("energy", "E eV/atom"), ("forces", "F eV/Å"), ("dipole", "P e·Å/atom"), (BORN, "Z* e"),
           ("polarizability", "α e·Å²/V/atom"))


def train_layout(train, valid, layout, seed, options):
    config = TrainingConfig(seed=seed, quiet=True, **{**options, "architecture": {**options.get("architecture", {}),
                                                                                    **LAYOUTS[layout]}})
    start = initialize_model(train, config)
    if layout == "before":
        start.set_field_scale(1.0)   # the network saw the field in V/Å
    model, history = train_model(train, valid, config, initial_model=start)
    halved, converged = learning_milestones(history, BORN)
    return {"layout": layout, "seed": seed, "errors": {key: entry["mae"] for key, entry in evaluate(model, valid).items()},
            "field_scale": float(model.field_scale), "zstar_halved_epoch": halved, "zstar_converged_epoch": converged,
            "epochs_run": len(history["epochs"]), "best_epoch": history["best_epoch"]}


def toy_frames(field):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from toy_potential import make_toy_frames

    fields = field * np.eye(3)
    return make_toy_frames(16, seed=0, fields=fields), make_toy_frames(5, seed=1, fields=fields)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", help="labelled frames (extended XYZ), split by structure")
    source.add_argument("--toy", action="store_true", help="the analytic toy potential (not DFT)")
    parser.add_argument("--toy-field", type=float, default=0.1, help="|ε| of the toy's field frames, V/Å")
    parser.add_argument("--validation-fraction", type=float, default=0.25)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=1000)
    parser.add_argument("--options", default="{}", help="more TrainingConfig fields as JSON (e.g. architecture)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)

    if args.toy:
        train, valid = toy_frames(args.toy_field)
        options = {"architecture": dict(num_features=8, num_layers=1, radial_hidden=16, readout_hidden=8, lmax=1),
                   "batch_size": 4, "learning_rate": 5e-3, "cutoff": 5.0}
    else:
        from polmodel.data.frames import read_frames

        train, valid = split_frames(read_frames(args.frames), args.validation_fraction, args.split_seed)
        options = {}
    options.update(epochs=args.epochs, patience=args.patience, **json.loads(args.options))
    print(f"{len(train)} training and {len(valid)} validation frames; options {options}", flush=True)
    print("| layout | seed | field scale V/Å | " + " | ".join(title for _, title in COLUMNS)
          + " | Z* halved at epoch | Z* converged at epoch | epochs run |")
    print("|---" * (6 + len(COLUMNS)) + "|", flush=True)
    rows = []
    for seed in args.seeds:
        for layout in LAYOUTS:
            row = train_layout(train, valid, layout, seed, options)
            rows.append(row)
            errors = " | ".join(f"{row['errors'][key]:.4g}" if key in row["errors"] else "–" for key, _ in COLUMNS)
            print(f"| {row['layout']} | {row['seed']} | {row['field_scale']:.3g} | {errors} "
                  f"| {row['zstar_halved_epoch']} | {row['zstar_converged_epoch']} | {row['epochs_run']} |", flush=True)
    for layout in LAYOUTS:
        ratios = [row["zstar_halved_epoch"] / row["zstar_converged_epoch"] for row in rows
                  if row["layout"] == layout and row["zstar_halved_epoch"] and row["zstar_converged_epoch"]]
        if ratios:
            print(f"{layout}: Z* halved / converged epochs {np.round(ratios, 3).tolist()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
