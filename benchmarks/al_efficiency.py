"""How many labels the active-learning loop needs to reach a target accuracy, against random sampling.

ON THE ANALYTIC TOY ORACLE (tests/toy_labelling.py: a field-dependent toy potential stands in for DFT; the same
comparison on real pw.x labels belongs to the α-quartz issue). Pure Python: polmodel.training.train,
polmodel.dynamics.md, polmodel.active_learning.selection, .exploration and .initial_structures; no AiiDA.

For each seed, both methods start from the same initial set (the ideal toy crystal at `--given-tier`, by default
the full response as the workchain's `initial_data.given_tier`, and `--initial` strained and displaced copies at
the cheap tier) and the same first model. Then, per iteration:
- loop: train an ensemble on its data (from the loop's previous ensemble after the first iteration, as the
  workchain does), explore the current stage with ensemble MD (fresh seeds; fields capped at the labelled range
  plus the margin; the stage advances once the accurate fraction reaches the threshold), select with the adaptive
  trust window (lower level `--force-lower-factor` x the training force RMSE, as in the protocols; with
  `--born-charge-threshold`, a frame whose Z* spread reaches it is a candidate too; random draws within it,
  near-duplicates removed), label within the budget (cheap tier at the sampled field; the full response for the
  largest response spread, the Z* spread where the MD records it, else the polarization spread, as in
  workflows/explore.py; with `--full-label-born-spread`, as the workchain's `full_label_born_spread`, only where
  that Z* spread exceeds it);
- random: train the same way on its own data (from its own previous ensemble), then draw frames uniformly from ALL
  trajectories the loop has run so far (the same MD), labelled at the cheap tier at each frame's field, the first
  `--max-full` of each `--max-candidates` draws with the full response instead (no model signal: random sampling
  has none; until 4ff0e52 the draw with the largest polarization spread of the loop's MD got it), spending the
  same budget of pw.x runs per iteration (one or two fewer where the tier costs of the draws do not add up to
  it). The loop spends less than the budget when its trust window holds fewer candidates, and nothing once its
  ensemble agrees on every explored frame; random sampling has no such signal. `--random-budget loop` makes random
  spend only what the loop spent in the same iteration instead, which compares the two at equal label counts.
After each training, both models (ensemble means) are evaluated on a held-out set drawn from a long toy MD under a
cosine field at the hardest stage's conditions: forces (at each frame's field) and Born charges. Labels are
counted in pw.x runs (energy_forces 1, field_frames 2, full 10). "Labels to target" is the label count at the
first evaluation where both errors are at or below the target; a method that never gets there within
`--iterations` is counted at its last label count plus one iteration's budget, and the printed number is then a
lower bound (marked with >). Seeds run side by side (`--workers` processes, one core each).

What this measures at the default size, and what it does not: the tiny models are far from converged after 30
epochs, so their held-out errors keep falling with more epochs on unchanged labels, and the errors differ more
between seeds than between the methods. With the default `--random-budget full`, the loop's saving is that it
spends less: nothing once its ensemble agrees, and no full response where the members agree on Z*, while
training goes on improving both models. `--random-budget loop` measures the choice of frames alone (README,
"Active learning", has both).

Usage: python benchmarks/al_efficiency.py [--seeds 4] [--iterations 8] [--workers 2] ...
The last line reads `labels to target: loop N, random M, ratio R` (N, M means over the seeds, R = N / M).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from toy_labelling import toy_label_frames  # noqa: E402  (the toy oracle lives with the tests)
from toy_potential import ToyIonicCalculator, reference_crystal  # noqa: E402

from polmodel.active_learning.exploration import (ExplorationStage, covered_field, next_stage,  # noqa: E402
                                                  stage_field_protocols)
from polmodel.active_learning.initial_structures import perturbed_structures  # noqa: E402
from polmodel.active_learning.selection import (ENERGY_FORCES, FULL, SelectionCriteria,  # noqa: E402
                                                adapt_trust_window, assign_label_tiers, full_response_spread,
                                                pw_runs_per_label, select_candidates)
from polmodel.data.frames import frame_efield  # noqa: E402

REPEAT = (2, 1, 1)  # 4-atom toy cell: seconds per training on one loaded core
ARCHITECTURE = {"num_features": 4, "lmax": 1, "num_layers": 1, "num_radial": 4, "radial_hidden": 8,
                "readout_hidden": 4}
STAGES = [ExplorationStage((150.0,), 0.0, 100), ExplorationStage((300.0,), 0.05, 150),
          ExplorationStage((600.0,), 0.1, 200)]
FIELD_SHAPES = [{"kind": "cosine", "amplitude": 1.0, "period_fs": 100.0, "axis": [1, 1, 1]}]
FULL_COST = pw_runs_per_label(FULL)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="seeds run side by side, one process each")
    parser.add_argument("--initial", type=int, default=8, help="perturbed copies in the initial set")
    parser.add_argument("--budget", type=int, default=16, help="pw.x runs per iteration")
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--random-budget", choices=("full", "loop"), default="full",
                        help="pw.x runs random sampling spends per iteration: the whole --budget, or what the loop "
                             "spent in that iteration")
    parser.add_argument("--max-full", type=int, default=1)
    parser.add_argument("--ensemble", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the first training (from scratch)")
    parser.add_argument("--warm-epochs", type=int, default=30,
                        help="epochs of each later training, warm-started from the method's previous ensemble")
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    parser.add_argument("--curves-json", default=None, help="write every evaluation (labels, errors) here")
    parser.add_argument("--force-target", type=float, default=0.07, help="eV/Å, held-out force MAE")
    parser.add_argument("--born-target", type=float, default=0.12, help="e, held-out Born-charge MAE")
    parser.add_argument("--force-lower", type=float, default=0.01, help="floor of the lower trust level, eV/Å")
    parser.add_argument("--force-lower-factor", type=float, default=2.0,
                        help="lower trust level = this x the training force RMSE (the protocols use 1.5-2)")
    parser.add_argument("--force-upper", type=float, default=1.0)
    parser.add_argument("--born-charge-threshold", type=float, default=0.0,
                        help="e; a frame whose largest per-atom Z* spread reaches this is a candidate too (0: off; "
                             "0.12 measured ratio 0.76, README)")
    parser.add_argument("--full-label-born-spread", type=float, default=0.3,
                        help="e; the loop gives the full response only to a frame whose Born-charge spread exceeds "
                             "this (the MD records Z* spreads; 0: to the largest polarization spread, any size)")
    parser.add_argument("--given-tier", choices=(ENERGY_FORCES, FULL), default=FULL,
                        help="label of the ideal crystal in the initial set of both methods (its copies: "
                             "energy_forces)")
    parser.add_argument("--scheduler", choices=("plateau", "cosine", "constant"), default="plateau",
                        help="learning-rate schedule of every training (both methods)")
    parser.add_argument("--stage-threshold", type=float, default=0.8)
    parser.add_argument("--field-margin", type=float, default=0.03)
    parser.add_argument("--test-frames", type=int, default=30)
    return parser.parse_args(argv)


def training_config(args, seed, epochs=None):
    """Small batches at a high learning rate and no validation split: with lr 1e-2, batches of 4 and one
    validation structure (often the ideal crystal, zero forces by symmetry) the tiny models of the first run
    predicted ~0 forces, their members agreed everywhere, and the loop selected nothing."""
    from polmodel.training.config import TrainingConfig

    return TrainingConfig(cutoff=4.5, architecture=ARCHITECTURE, epochs=epochs or args.epochs,
                          batch_size=2, learning_rate=args.learning_rate, scheduler=args.scheduler,
                          patience=epochs or args.epochs,
                          validation_fraction=0.0, seed=seed, quiet=True)


def label(atoms, tier, fields, source):
    return toy_label_frames(atoms, tier, fields, source=source, repeat=REPEAT)


def held_out_frames(args, seed):
    """Frames of a long toy MD (the oracle's own forces) at the hardest stage under a cosine field: Born charges at
    zero field, and forces at the frame's field."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from polmodel.dynamics.fields import field_protocol_from_dict

    hardest = STAGES[-1]
    reference = reference_crystal(REPEAT)
    protocol = field_protocol_from_dict(
        stage_field_protocols(FIELD_SHAPES[:1], hardest.field_amplitude, np.inf, 0.0)[0])
    rng = np.random.default_rng(10_000 + seed)
    atoms = reference.copy()
    calculator = ToyIonicCalculator(reference.get_scaled_positions())
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=hardest.temperatures[0], rng=rng)
    dynamics = Langevin(atoms, 1.0 * units.fs, temperature_K=hardest.temperatures[0], friction=0.02, rng=rng)
    frames, step = [], 0
    while len(frames) < 2 * args.test_frames:
        calculator.efield = protocol(step * 1.0)  # the field changes every 25 fs: a 100 fs period in 4 steps
        dynamics.run(25)
        step += 25
        if step > 200:  # after equilibration
            snapshot = atoms.copy()
            snapshot.calc = None
            frames.append(label(snapshot, FULL, (), f"held-out-{seed}")[0])
            frames.extend(label(snapshot, "field_frames", [protocol(step * 1.0)], f"held-out-{seed}")[1:])
    return frames


def errors(model, frames):
    from polmodel.training.evaluation import evaluate

    metrics = evaluate(model, frames)
    return metrics["forces"]["mae"], metrics["born_effective_charges"]["mae"]


def explore(ensemble, dataset, stage, args, seed, iteration, workdir):
    """Ensemble MD of the stage from the ideal crystal; returns explored frames (step 0 left out)."""
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.dynamics.fields import field_protocol_from_dict
    from polmodel.dynamics.md import MDSettings, read_trajectory, run_md

    covered = covered_field(dataset)
    protocols = stage_field_protocols(FIELD_SHAPES, stage.field_amplitude, covered, args.field_margin)
    frames = []
    for index, field in enumerate(protocols):
        for temperature in stage.temperatures:
            path = Path(workdir) / f"md_{seed}_{iteration}_{index}_{int(temperature)}.xyz"
            calculator = PolCalculator(ensemble)
            settings = MDSettings(steps=stage.steps, timestep_fs=2.0, temperature_K=temperature, thermostat="langevin",
                                  friction=0.02, interval=5, seed=1000 * seed + 10 * iteration + index,
                                  born_spread=bool(args.born_charge_threshold or args.full_label_born_spread))
            run_md(reference_crystal(REPEAT), calculator, field_protocol_from_dict(field), settings,
                   trajectory_path=path, restart=False, progress=False)
            frames.extend(frame for frame in read_trajectory(path) if frame.info.get("step", 0) != 0)
    return frames


def response_spread(frame):
    """The spread of an explored frame that decides the full response, as the loop's selection takes it."""
    return full_response_spread(frame.info.get("max_born_charge_std", 0.0),
                                np.linalg.norm(frame.info.get("polarization_std", np.zeros(3))))


def plan_and_label(frames, order, args, source, spread, min_full_spread=0.0):
    """Labels of frames[order] under the tier rule within the budget, `spread` (one per frame of `order`) deciding
    the full response; returns (new labelled frames, pw.x runs)."""
    efields = [frame_efield(frames[i]) for i in order]
    plans = assign_label_tiers(efields, spread, args.budget, FULL_COST, args.max_full, min_full_spread)
    labelled = []
    for plan in plans:
        atoms = frames[order[plan.index]].copy()
        atoms.calc = None
        labelled.extend(label(atoms, plan.tier, plan.fields, source))
    return labelled, sum(plan.cost for plan in plans)


def run_seed(args, seed, workdir, log):
    from polmodel.training.ensembles import train_ensemble

    reference = reference_crystal(REPEAT)
    held_out = held_out_frames(args, seed)
    initial = []
    for index, atoms in enumerate([reference, *perturbed_structures(reference, args.initial, 0.03, 0.1, seed=seed)]):
        initial.extend(label(atoms, args.given_tier if index == 0 else ENERGY_FORCES, (), f"initial-{index}"))
    initial_runs = pw_runs_per_label(args.given_tier) + args.initial
    loop_data, random_data = list(initial), list(initial)
    curves = {"loop": [], "random": []}
    runs = {"loop": initial_runs, "random": initial_runs}
    pool, stage_index = [], 0
    rng = np.random.default_rng(seed)
    criteria = SelectionCriteria(force_lower=args.force_lower, force_upper=args.force_upper,
                                 force_lower_factor=args.force_lower_factor, max_candidates=args.max_candidates,
                                 born_charge_threshold=args.born_charge_threshold or None,
                                 similarity_tolerance=0.01, min_distance=1.0)
    loop_model = random_model = None
    for iteration in range(args.iterations):
        config = training_config(args, seed * 100 + iteration, args.warm_epochs if iteration else args.epochs)
        loop_model, loop_metrics = train_ensemble(loop_data, config, args.ensemble, bootstrap=True,
                                                  initial_model=loop_model)
        random_model = loop_model if iteration == 0 else train_ensemble(random_data, config, args.ensemble,
                                                                        bootstrap=True, initial_model=random_model)[0]
        for name, model in (("loop", loop_model), ("random", random_model)):
            force, born = errors(model, held_out)
            curves[name].append((runs[name], force, born))
        stage = STAGES[stage_index]
        explored = explore(loop_model, loop_data, stage, args, seed, iteration, workdir)
        pool.extend(explored)
        force_rmse = loop_metrics["validation"]["forces"]["rmse"]  # on the training frames here
        window = adapt_trust_window(SelectionCriteria(**{**criteria.as_dict(), "seed": 1000 * seed + iteration}),
                                    force_rmse)
        spreads = np.array([frame.info["max_force_std"] for frame in explored])
        recorded_born = [frame.info["max_born_charge_std"] for frame in explored
                         if "max_born_charge_std" in frame.info]
        born_spreads = recorded_born if args.born_charge_threshold else None
        selected, statistics = select_candidates(explored, spreads, window, born_charge_std=born_spreads)
        new, spent = plan_and_label(explored, selected, args, f"loop-{iteration}",
                                    [response_spread(explored[i]) for i in selected], args.full_label_born_spread)
        loop_data.extend(new)
        runs["loop"] += spent
        # random: uniform draws from every trajectory the loop has run so far
        random_budget = args.budget if args.random_budget == "full" else spent
        order = list(rng.permutation(len(pool)))
        new_random, spent_random = [], 0
        while spent_random < random_budget and order:
            chunk, order = order[:args.max_candidates], order[args.max_candidates:]
            remaining = argparse.Namespace(**{**vars(args), "budget": random_budget - spent_random})
            # no model signal: the first `max_full` draws of each chunk get the full response
            labelled, cost = plan_and_label(pool, chunk, remaining, f"random-{iteration}",
                                            list(range(len(chunk), 0, -1)))
            if not cost:
                break
            new_random.extend(labelled)
            spent_random += cost
        random_data.extend(new_random)
        runs["random"] += spent_random
        log(f"seed {seed} iteration {iteration} stage {stage_index} (T {stage.temperatures}, field cap "
            f"{min(stage.field_amplitude, covered_field(loop_data) + args.field_margin):.3f}): "
            f"loop F {curves['loop'][-1][1]:.4f} Z* {curves['loop'][-1][2]:.4f} | random F "
            f"{curves['random'][-1][1]:.4f} Z* {curves['random'][-1][2]:.4f} | accurate "
            f"{statistics['accurate_fraction']:.2f}, window [{window.force_lower:.3f}, {window.force_upper:.2f}], "
            f"spread p10/50/90 {np.percentile(spreads, 10):.3f}/{np.percentile(spreads, 50):.3f}/"
            f"{np.percentile(spreads, 90):.3f}, Z* spread p50/90 "
            f"{np.percentile(recorded_born, 50) if recorded_born else np.nan:.3f}/"
            f"{np.percentile(recorded_born, 90) if recorded_born else np.nan:.3f}, "
            f"selected {len(selected)} (full {sum('born_effective_charges' in f.arrays for f in new)}), "
            f"loop runs {runs['loop']}, "
            f"random runs {runs['random']}")
        stage_index = next_stage(stage_index, statistics["accurate_fraction"], args.stage_threshold, len(STAGES))
    return curves


def labels_to_target(curve, args):
    """(label count, reached) at the first point where both errors meet the target."""
    for count, force, born in curve:
        if force <= args.force_target and born <= args.born_target:
            return count, True
    return curve[-1][0] + args.budget, False


def one_thread_per_worker():
    import torch

    torch.set_num_threads(1)  # seeds run side by side, one core each


def run_seed_logged(args, seed, workdir, start):
    """run_seed with its log lines stamped with the time since `start`."""

    def log(message):
        print(f"[{time.monotonic() - start:6.0f} s] {message}", flush=True)

    return run_seed(args, seed, workdir, log)


def main(argv=None):
    from concurrent.futures import ProcessPoolExecutor

    args = parse_arguments(argv)
    start = time.monotonic()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    with tempfile.TemporaryDirectory() as workdir:
        jobs = ([args] * len(seeds), seeds, [workdir] * len(seeds), [start] * len(seeds))
        if args.workers == 1:  # in this process (its thread settings untouched)
            all_curves = list(map(run_seed_logged, *jobs))
        else:
            with ProcessPoolExecutor(max_workers=args.workers, initializer=one_thread_per_worker) as pool:
                all_curves = list(pool.map(run_seed_logged, *jobs))
    rows = []
    for seed, curves in zip(seeds, all_curves):
        loop_count, loop_reached = labels_to_target(curves["loop"], args)
        random_count, random_reached = labels_to_target(curves["random"], args)
        rows.append((seed, loop_count, loop_reached, random_count, random_reached))
    if args.curves_json:
        import json
        Path(args.curves_json).write_text(json.dumps({"arguments": vars(args), "curves": all_curves}))
    print(f"target: held-out force MAE <= {args.force_target} eV/Å and Born-charge MAE <= {args.born_target} e "
          f"({args.test_frames} frames of toy MD at {STAGES[-1].temperatures[0]:.0f} K under a cosine field of "
          f"{STAGES[-1].field_amplitude} V/Å); labels in pw.x runs")
    print("seed  loop  random  ratio   at the last evaluation: labels loop/random, F loop/random (eV/Å), "
          "Z* loop/random (e)")
    for (seed, loop_count, loop_reached, random_count, random_reached), curves in zip(rows, all_curves):
        (loop_labels, loop_force, loop_born), (random_labels, random_force, random_born) = (
            curves["loop"][-1], curves["random"][-1])
        print(f"{seed:4d}  {'' if loop_reached else '>'}{loop_count:4d}  {'' if random_reached else '>'}"
              f"{random_count:6d}  {loop_count / random_count:5.2f}   {loop_labels}/{random_labels}, "
              f"{loop_force:.3f}/{random_force:.3f}, {loop_born:.3f}/{random_born:.3f}")
    loop_mean = float(np.mean([row[1] for row in rows]))
    random_mean = float(np.mean([row[3] for row in rows]))
    print(f"wall time {time.monotonic() - start:.0f} s; seeds {args.seeds}; "
          f"{'' if all(row[2] for row in rows) else 'loop did not reach the target in every seed; '}"
          f"{'' if all(row[4] for row in rows) else 'random did not reach the target in every seed (lower bound); '}")
    print(f"labels to target: loop {loop_mean:.0f}, random {random_mean:.0f}, ratio {loop_mean / random_mean:.2f}")


if __name__ == "__main__":
    main()
