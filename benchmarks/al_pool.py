"""Pool-based active learning on real DFT labels: how many pw.x runs the loop's decisions need to reach the accuracy
of a model trained on the whole pool, against taking frames in random order.

The pool is a labelled extended-XYZ file (`--frames`; Allegro-pol's training files by default convention, e.g.
data/allegro_pol/SiO2.train.xyz.gz) in which every frame has energy, forces, stress, dipole, Z* and α. Each
frame's labels cost pw.x runs in two parts, as they were made: the *cheap part* (energy, forces and stress: one
zero-field SCF) `ENERGY_FORCES_RUNS`, and the *response part* (dipole, Z*, α: Allegro-pol's forward differences,
one finite-field SCF per field direction) `RESPONSE_RUNS` more. Nothing is computed: a label is read from the pool
when a method takes it.

A fixed part of the pool (`--test-fraction`, drawn with TEST_SPLIT_SEED, the same for every seed and method) is
held out; every error below is measured there, on frames no model trained on. Per seed, both methods start from
the same `--initial` frames (full labels) and the same first ensemble; then per iteration, with `--budget` pw.x
runs:
- loop: the ensemble (`--members`, warm-started from its last weights each iteration) predicts forces, Z* and α
  on every frame not taken yet; the frames are classified and drawn exactly as the workchain draws explored
  frames (polmodel.active_learning.selection: a candidate when its largest atomic force spread lies in the trust
  window, whose lower level is `--force-lower-factor` × the ensemble's current validation force error, or when its
  Z* or α spread exceeds `--response-factor` × the ensemble's validation Z* or α error, each error in spread units
  (adapt_trust_window with the training's spread_calibration); candidates drawn at random,
  near-duplicates removed), and labelled within the budget: the cheap part for each, the response part too for
  the `--max-full` frames whose response spread is largest above its threshold (`response_spread_ratio`). The
  upper trust level is set out of reach (`POOL_FORCE_UPPER`): in MD it marks frames that went where no structure
  should be, and every frame of a DFT pool is a real structure.
- random: frames in a seeded random order, each with both parts, as many as the budget pays for.
Both train the same way after each iteration (`--epochs` epochs from their last weights). The target is the
held-out force and Z* RMSE of the reference, an ensemble trained from scratch on every non-test frame of the pool
for `--reference-epochs` epochs (computed first), each within `--tolerance` (10 %); a method stops at the first
evaluation that meets both, and "labels to target" is its pw.x count there. A method that never does within
`--iterations` is counted at its last count plus one budget, marked with > (a lower bound).

The model is small (`--architecture`, default 1 layer, 8 channels, lmax 1) so that the defaults fit in about
30 minutes on 2 cores for SiO2 (`--workers` processes, one thread each; tasks are the reference and each seed's
pair of methods). Every task writes its result under `--workdir` as it ends, and a rerun with the same settings
skips finished tasks. The last line reads `labels to target: loop N, random M, ratio R` (means over the seeds).

    python benchmarks/al_pool.py --frames data/allegro_pol/SiO2.train.xyz.gz --seeds 3 --workdir build/al_pool_sio2
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from polmodel.active_learning.selection import (FULL, SelectionCriteria, adapt_trust_window, assign_label_tiers,
                                                response_spread_ratio, select_candidates)

#: pw.x runs of a frame's cheap part (energy, forces, stress: one zero-field SCF)
ENERGY_FORCES_RUNS = 1
#: pw.x runs of a frame's response part (dipole, Z*, α: one finite-field SCF per field direction)
RESPONSE_RUNS = 3
#: the held-out test part is the same for every seed and method
TEST_SPLIT_SEED = 12345
#: eV/Å; out of reach on purpose (module docstring)
POOL_FORCE_UPPER = 1.0e6
CHEAP_LABELS = ("energy", "stress")          # info labels of the cheap part (forces live in arrays)
RESPONSE_LABELS = ("dipole", "polarization_quantum", "polarizability")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", required=True, help="labelled pool (extended XYZ, optionally gzipped)")
    parser.add_argument("--convention", default="allegro-pol",
                        help="label convention of --frames: 'polmodel' (our own frames) or one of "
                             "polmodel.data.external's conventions (default allegro-pol)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--initial", type=int, default=4, help="frames both methods start from (full labels)")
    parser.add_argument("--iterations", type=int, default=12, help="at most; a method stops at the target")
    parser.add_argument("--budget", type=int, default=16, help="pw.x runs per iteration")
    parser.add_argument("--max-candidates", type=int, default=16, help="frames the loop draws per iteration")
    # Full labels may take half of each iteration's budget, as in the `fast` protocol (1 full label of 10 runs in a
    # budget of 20; `balanced` and `stringent` allow 80 %): at 4 full labels of 4 runs in 16 they took all of it, and
    # the loop was random order under another name (benchmarks/README.md "Pool-based active learning").
    parser.add_argument("--max-full", type=int, default=2, help="frames per iteration that get the response part")
    parser.add_argument("--force-lower-factor", type=float, default=1.0,
                        help="lower trust level / the ensemble's validation force error, in spread units (the "
                             "protocols' 1.0)")
    parser.add_argument("--response-factor", type=float, default=1.0,
                        help="Z* and α thresholds / the ensemble's Z* and α error, in spread units")
    parser.add_argument("--draw", choices=("random", "largest-spread-first"), default="random",
                        help="the loop's order among candidates: the workchain's seeded random draw (default) or "
                             "largest spread (relative to its level) first")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="of each method's frames, kept for validation (the protocols' 0.1); the reference "
                             "trains on every pool frame")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per iteration, from the last weights")
    parser.add_argument("--initial-epochs", type=int, default=20, help="epochs of the first, shared ensemble")
    parser.add_argument("--reference-epochs", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="of the reference's errors (above -1; negative asks for errors below the reference's)")
    parser.add_argument("--architecture", type=json.loads,
                        default={"num_features": 8, "num_layers": 1, "lmax": 1})
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="build/al_pool")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("seeds", "initial", "iterations", "budget", "members", "epochs", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.tolerance > -1.0:
        parser.error("--tolerance must be above -1")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must lie in (0, 1)")
    return args


# --- the pool ------------------------------------------------------------------------------------------------------
def read_pool(path, convention):
    from polmodel.data.external import read_external_frames
    from polmodel.data.frames import read_frames

    frames = read_frames(path) if convention == "polmodel" else read_external_frames(path, convention)
    for index, frame in enumerate(frames):
        frame.info["pool_index"] = index
    return frames


def split_test(frames, test_fraction):
    """(pool, test): the test part drawn with TEST_SPLIT_SEED, never trained on."""
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(frames))
    count = max(1, int(round(test_fraction * len(frames))))
    test = set(order[:count].tolist())
    return ([frame for index, frame in enumerate(frames) if index not in test],
            [frame for index, frame in enumerate(frames) if index in test])


def cheap_part(frame):
    """A copy of `frame` with only its cheap labels: energy, forces, stress (and its field)."""
    copy = frame.copy()
    for name in RESPONSE_LABELS:
        copy.info.pop(name, None)
    copy.arrays.pop("born_effective_charges", None)
    return copy


def label_runs(tier):
    """pw.x runs of one frame labelled at `tier` (FULL: both parts, else the cheap part only)."""
    return ENERGY_FORCES_RUNS + (RESPONSE_RUNS if tier == FULL else 0)


# --- models --------------------------------------------------------------------------------------------------------
def training_config(args, seed, epochs, validation_fraction):
    from polmodel.training.config import TrainingConfig

    # the shipped cards' settings (data/allegro_pol/*.yaml): small response weights, batches of 2
    return TrainingConfig(architecture=dict(args.architecture), epochs=epochs, batch_size=2, learning_rate=0.01,
                          validation_fraction=validation_fraction, seed=seed, patience=10 ** 6,
                          scheduler="constant", quiet=True,
                          loss_weights={"energy": 1.0, "forces": 1.0, "stress": 10.0, "dipole": 1.0,
                                        "born_effective_charges": 0.1, "polarizability": 0.1})


def train(frames, args, seed, epochs, initial=None, species=None, validation_fraction=None):
    """(ensemble, its validation RMSE per quantity and its spread calibration under "calibration") after `epochs`
    epochs from `initial` (or from scratch); the
    methods keep `--validation-fraction` of their frames for validation, as the workchain's training does, and the
    trust window and the response thresholds follow those errors (the training frames' where too few frames make
    no validation part)."""
    from polmodel.training.ensembles import train_ensemble

    fraction = args.validation_fraction if validation_fraction is None else validation_fraction
    config = replace(training_config(args, seed, epochs, fraction), species=species)
    ensemble, metrics = train_ensemble(frames, config, args.members, initial_model=initial)
    errors = {quantity: values["rmse"] for quantity, values in metrics["validation"].items()}
    return ensemble, {**errors, "calibration": metrics.get("calibration")}


def test_errors(ensemble, test):
    from polmodel.training.evaluation import evaluate

    metrics = evaluate(ensemble, test)
    return {quantity: metrics[quantity]["rmse"] for quantity in ("energy", "forces", "born_effective_charges",
                                                                 "polarizability") if quantity in metrics}


def frame_spreads(ensemble, frames):
    """Per frame the spreads the loop sees (largest atomic force and Z* spread, α spread per atom and component) and,
    from the same predictions, the ensemble mean's error in the same forms, which the loop never reads
    (spread_error_ranking does): polmodel.training.evaluation.frame_spreads under the short names used here."""
    from polmodel.training.evaluation import frame_spreads as measured_spreads

    measured = measured_spreads(ensemble, frames)
    forces, born, alpha = (measured[name] for name in ("forces", "born_effective_charges", "polarizability"))
    return {"force": forces["spread"], "born": born["spread"], "alpha": alpha["spread"],
            "force_error": forces["error"], "born_error": born["error"]}


def spread_error_ranking(spreads):
    """Spearman rank correlation over the frames of `spreads` (frame_spreads) between the ensemble's spread and its
    actual error there (largest atomic force and Z* error of each frame): how well the spread orders frames by what
    labelling them would correct. Near 0 the loop's order is no better than a random one, whatever the thresholds."""
    from scipy.stats import spearmanr

    return {"force": float(spearmanr(spreads["force"], spreads["force_error"]).statistic),
            "born": float(spearmanr(spreads["born"], spreads["born_error"]).statistic)}


# --- the two ways of choosing ----------------------------------------------------------------------------------------
def loop_choice(frames, spreads, training_errors, args, seed, previous=None):
    """The loop's labels for this iteration: [(index into `frames`, tier)], as the workchain decides them (one
    stage: `previous` is the last iteration's criteria, no level rises above them)."""
    criteria = SelectionCriteria(force_lower=0.0, force_upper=POOL_FORCE_UPPER, max_candidates=args.max_candidates,
                                 force_lower_factor=args.force_lower_factor,
                                 response_threshold_factor=args.response_factor, seed=seed, draw=args.draw)
    criteria = adapt_trust_window(criteria, training_errors.get("forces"),
                                  born_charge_rmse=training_errors.get("born_effective_charges"),
                                  polarizability_rmse=training_errors.get("polarizability"), previous=previous,
                                  calibration=training_errors.get("calibration"))
    selected, statistics = select_candidates(frames, spreads["force"], criteria, born_charge_std=spreads["born"],
                                             polarizability_std=spreads["alpha"])
    if not selected:
        return [], criteria, statistics
    ratio = response_spread_ratio(criteria, spreads["born"][selected], spreads["alpha"][selected])
    plans = assign_label_tiers([None] * len(selected), ratio, args.budget, label_runs(FULL), args.max_full,
                               min_full_spread=1.0)
    return [(selected[plan.index], plan.tier) for plan in plans], criteria, statistics


def random_choice(order, taken, budget):
    """The next frames of the seeded random `order` not yet taken, each with both parts, while the budget lasts."""
    chosen = []
    for index in order:
        if index in taken:
            continue
        if (len(chosen) + 1) * label_runs(FULL) > budget:
            break
        chosen.append((int(index), FULL))
    return chosen


# --- one seed ------------------------------------------------------------------------------------------------------
def meets(errors, target):
    return all(errors[quantity] <= limit for quantity, limit in target.items())


def run_seed(args, seed, pool, test, species, log, target):
    """{"loop": curve, "random": curve, "loop_choices": [...]}; a curve is [(pw.x runs, test errors)]. A method
    stops once its test errors meet `target` ({quantity: RMSE})."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool)).tolist()
    initial = order[:args.initial]
    start_frames = [pool[index] for index in initial]
    first, first_training = train(start_frames, args, seed, args.initial_epochs, species=species)
    runs0 = len(initial) * label_runs(FULL)
    state = {method: {"labels": {index: FULL for index in initial}, "runs": runs0, "ensemble": first,
                      "training": first_training, "curve": [(runs0, test_errors(first, test))]}
             for method in ("loop", "random")}
    random_order = order[args.initial:]
    choices = []
    for iteration in range(args.iterations):
        if all(meets(state[method]["curve"][-1][1], target) for method in state):
            break
        for method in ("loop", "random"):
            current = state[method]
            if meets(current["curve"][-1][1], target):
                continue
            if method == "loop":
                open_indices = [index for index in range(len(pool)) if index not in current["labels"]]
                if not open_indices:
                    continue
                spreads = frame_spreads(current["ensemble"], [pool[index] for index in open_indices])
                picked, criteria, statistics = loop_choice([pool[index] for index in open_indices], spreads,
                                                           current["training"], args, seed * 1000 + iteration,
                                                           previous=current.get("criteria"))
                current["criteria"] = criteria
                picked = [(open_indices[index], tier) for index, tier in picked]
                ranking = spread_error_ranking(spreads)
                choices.append({"iteration": iteration, "window": [criteria.force_lower, None],
                                "spread_error_spearman": ranking,
                                "born_threshold": criteria.born_charge_threshold,
                                "alpha_threshold": criteria.polarizability_threshold,
                                "candidates": statistics["num_candidates"], "open": len(open_indices),
                                "picked": [(int(pool[index].info["pool_index"]), tier) for index, tier in picked]})
            else:
                picked = random_choice(random_order, current["labels"], args.budget)
            for index, tier in picked:
                current["labels"][index] = tier
                current["runs"] += label_runs(tier)
            if picked:
                frames = [pool[index] if tier == FULL else cheap_part(pool[index])
                          for index, tier in current["labels"].items()]
                current["ensemble"], current["training"] = train(frames, args, seed, args.epochs,
                                                                 initial=current["ensemble"], species=species)
                current["curve"].append((current["runs"], test_errors(current["ensemble"], test)))
        log(f"seed {seed} iteration {iteration}: " + " | ".join(
            f"{method} {state[method]['runs']} runs, F {state[method]['curve'][-1][1]['forces']:.4f}, "
            f"Z* {state[method]['curve'][-1][1]['born_effective_charges']:.4f}" for method in ("loop", "random"))
            + (f" | loop picked {len(choices[-1]['picked'])} of {choices[-1]['candidates']} candidates "
               f"({sum(tier == FULL for _, tier in choices[-1]['picked'])} full); spread-error rank correlation "
               f"F {choices[-1]['spread_error_spearman']['force']:.2f}, "
               f"Z* {choices[-1]['spread_error_spearman']['born']:.2f}" if choices else ""))
    return {"loop": state["loop"]["curve"], "random": state["random"]["curve"], "loop_choices": choices}



# --- the whole benchmark -------------------------------------------------------------------------------------------
def reference(args, pool, test, species, log):
    """Test errors of an ensemble trained from scratch on every pool frame (full labels)."""
    ensemble, _ = train(pool, args, 0, args.reference_epochs, species=species, validation_fraction=0.0)
    errors = test_errors(ensemble, test)
    log(f"reference ({len(pool)} frames, {args.reference_epochs} epochs): F {errors['forces']:.4f} eV/Å, "
        f"Z* {errors['born_effective_charges']:.4f} e, α {errors.get('polarizability', float('nan')):.4f} e·Å²/V")
    return errors


#: what the reference depends on; a seed's task depends on every setting
REFERENCE_SETTINGS = ("frames", "convention", "test_fraction", "members", "reference_epochs", "architecture")


def settings_key(args, task):
    """Tasks of one setting share a key: a rerun with other settings does not reuse their results; the reference
    is reused by runs that differ only in how the methods choose."""
    settings = {name: value for name, value in vars(args).items()
                if name not in ("workers", "workdir", "quiet", "seeds", "first_seed")
                and (task != "reference" or name in REFERENCE_SETTINGS)}
    settings["frames_sha256"] = hashlib.sha256(Path(args.frames).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_task(args, task, start, target=None):
    """Run one task ("reference", or a seed with the reference's `target`), or read its result when a previous run
    finished it."""
    import torch

    torch.set_num_threads(1)   # tasks run side by side, one core each
    path = Path(args.workdir) / f"{settings_key(args, task)}-{task}.json"
    if path.exists():
        return json.loads(path.read_text())

    def log(message):
        if not args.quiet:
            print(f"[{time.monotonic() - start:6.0f} s] {message}", flush=True)

    all_frames = read_pool(args.frames, args.convention)
    species = sorted({symbol for frame in all_frames for symbol in frame.get_chemical_symbols()})
    pool, test = split_test(all_frames, args.test_fraction)
    began = time.monotonic()
    result = (reference(args, pool, test, species, log) if task == "reference"
              else run_seed(args, int(task), pool, test, species, log, target))
    result = {"task": task, "result": result, "wall_s": time.monotonic() - began}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result))
    temporary.replace(path)
    return result


def labels_to_target(curve, target, budget):
    """(pw.x runs, reached) at the first point of `curve` whose force and Z* errors meet `target`."""
    for runs, errors in curve:
        if meets(errors, target):
            return runs, True
    return curve[-1][0] + budget, False


def errors_at(curve, runs):
    """The errors of the last point of `curve` with at most `runs` pw.x runs (None before its first point)."""
    before = [errors for count, errors in curve if count <= runs]
    return before[-1] if before else None


def main(argv=None):
    from concurrent.futures import ProcessPoolExecutor

    args = parse_arguments(argv)
    start = time.monotonic()
    seeds = [str(seed) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    # the reference first: its errors make the target at which each method stops
    reference_errors = run_task(args, "reference", start)["result"]
    target = {quantity: (1.0 + args.tolerance) * reference_errors[quantity]
              for quantity in ("forces", "born_effective_charges")}
    if args.workers == 1:
        results = [run_task(args, seed, start, target) for seed in seeds]
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as executor:
            results = list(executor.map(run_task, [args] * len(seeds), seeds, [start] * len(seeds),
                                        [target] * len(seeds)))
    print(f"pool {args.frames}: test part {args.test_fraction:.0%} (seed {TEST_SPLIT_SEED}); reference "
          f"F {reference_errors['forces']:.4f} eV/Å, Z* {reference_errors['born_effective_charges']:.4f} e; target "
          f"F <= {target['forces']:.4f}, Z* <= {target['born_effective_charges']:.4f}; labels in pw.x runs "
          f"(cheap part {ENERGY_FORCES_RUNS}, response part {RESPONSE_RUNS} more)")
    print("seed  loop  random  ratio   at the loop's last count: runs, F loop/random (eV/Å), Z* loop/random (e); "
          "loop labels full/cheap")
    rows = []
    for result in results:
        seed, curves = result["task"], result["result"]
        loop_runs, loop_reached = labels_to_target(curves["loop"], target, args.budget)
        random_runs, random_reached = labels_to_target(curves["random"], target, args.budget)
        last_runs, loop_last = curves["loop"][-1]
        random_then = errors_at(curves["random"], last_runs)
        picked = [tier for choice in curves["loop_choices"] for _, tier in choice["picked"]]
        full = sum(tier == FULL for tier in picked)
        rows.append((loop_runs, random_runs, loop_reached and random_reached))
        print(f"{seed:>4}  {'' if loop_reached else '>'}{loop_runs:4d}  {'' if random_reached else '>'}"
              f"{random_runs:6d}  {loop_runs / random_runs:5.2f}   {last_runs}, {loop_last['forces']:.4f}/"
              f"{random_then['forces']:.4f}, {loop_last['born_effective_charges']:.4f}/"
              f"{random_then['born_effective_charges']:.4f}; {full + args.initial}/{len(picked) - full}")
    rankings = [choice["spread_error_spearman"] for result in results for choice in result["result"]["loop_choices"]
                if "spread_error_spearman" in choice]
    if rankings:
        print(f"spread-error rank correlation over the loop's iterations (Spearman, open frames): forces "
              f"{np.mean([r['force'] for r in rankings]):.2f}, Z* {np.mean([r['born'] for r in rankings]):.2f}")
    # A method that stopped short of the target (the loop finds no candidate left, or the iterations ran out) has
    # only a lower bound; a ratio of lower bounds says nothing, so the last line uses the seeds where both reached it.
    reached = [row for row in rows if row[2]]
    print(f"wall time {time.monotonic() - start:.0f} s; {len(rows)} seeds, both methods reached the target in "
          f"{len(reached)}" + ("" if len(reached) == len(rows) else
                               f" (> marks a lower bound; seeds {', '.join(r['task'] for r, row in zip(results, rows) if not row[2])} left out below)"))
    if not reached:
        print("labels to target: no seed where both methods reached the target")
        return
    loop_mean = float(np.mean([row[0] for row in reached]))
    random_mean = float(np.mean([row[1] for row in reached]))
    print(f"labels to target: loop {loop_mean:.0f}, random {random_mean:.0f}, ratio {loop_mean / random_mean:.2f}")


if __name__ == "__main__":
    sys.exit(main())
