"""benchmarks/al_pool.py: the loop's choice from a pool of real labels (frames cut from Allegro-pol's SiO2 file), the
random order, and the pw.x-run accounting, down to the table the benchmark prints."""
import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import al_pool  # noqa: E402

from polmodel.active_learning.selection import ENERGY_FORCES, FULL  # noqa: E402

CUT = pathlib.Path(__file__).parent / "data" / "allegro_pol" / "SiO2.cut.xyz"


@pytest.fixture(scope="module")
def frames():
    return al_pool.read_pool(CUT, "allegro-pol")


def arguments(**changes):
    values = {"frames": str(CUT), "budget": "8", "max_candidates": "8", "max_full": "2",
              "force_lower_factor": "2.0", "response_factor": "2.0", **changes}
    argv = []
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return al_pool.parse_arguments(argv)


def planted_spreads(count, outlier, force=0.01, born=0.01, alpha=0.01):
    spreads = {"force": np.full(count, 0.01), "born": np.full(count, 0.01), "alpha": np.full(count, 0.01)}
    spreads["force"][outlier], spreads["born"][outlier], spreads["alpha"][outlier] = force, born, alpha
    return spreads


# errors the trust window follows: lower force level 2 × 0.1, Z* threshold 2 × 0.05, α threshold 2 × 0.05
TRAINING_ERRORS = {"forces": 0.1, "born_effective_charges": 0.05, "polarizability": 0.05}


def test_the_loop_picks_a_planted_outlier_first_with_its_response_when_members_disagree_on_it(frames):
    picked, criteria, statistics = al_pool.loop_choice(
        frames, planted_spreads(len(frames), 6, force=1.0, born=0.5), TRAINING_ERRORS, arguments(), seed=0)
    assert criteria.force_lower == pytest.approx(0.2) and criteria.born_charge_threshold == pytest.approx(0.1)
    assert statistics["num_candidates"] == 1
    assert picked == [(6, FULL)]


def test_agreement_on_the_response_gives_the_cheap_part_and_agreement_on_everything_gives_nothing(frames):
    forces_only, _, _ = al_pool.loop_choice(frames, planted_spreads(len(frames), 3, force=1.0), TRAINING_ERRORS,
                                            arguments(), seed=0)
    assert forces_only == [(3, ENERGY_FORCES)]
    alpha_only, _, _ = al_pool.loop_choice(frames, planted_spreads(len(frames), 3, alpha=0.5), TRAINING_ERRORS,
                                           arguments(), seed=0)
    assert alpha_only == [(3, FULL)]   # forces agree, α does not: the frame is asked for, with its response
    nothing, _, _ = al_pool.loop_choice(frames, planted_spreads(len(frames), 3), TRAINING_ERRORS, arguments(), seed=0)
    assert nothing == []


def test_random_order_follows_its_seed_skips_taken_frames_and_stays_in_the_budget():
    order = np.random.default_rng(7).permutation(20).tolist()
    same_seed, other_seed = (np.random.default_rng(seed).permutation(20).tolist() for seed in (7, 8))
    assert order == same_seed != other_seed
    chosen = al_pool.random_choice(order, taken={order[1]: FULL}, budget=9)
    assert chosen == [(order[0], FULL), (order[2], FULL)]      # two full labels (4 runs each) fit in 9


def test_a_cheap_part_keeps_energy_forces_and_stress_and_drops_the_response(frames):
    cheap = al_pool.cheap_part(frames[0])
    assert {"energy", "stress"} <= set(cheap.info) and "forces" in cheap.arrays
    assert not {"dipole", "polarizability"} & set(cheap.info) and "born_effective_charges" not in cheap.arrays
    assert "born_effective_charges" in frames[0].arrays                  # the pool's frame is untouched
    assert (al_pool.label_runs(ENERGY_FORCES), al_pool.label_runs(FULL)) == (1, 4)


def test_the_test_part_is_fixed_and_never_in_the_pool(frames):
    pool, test = al_pool.split_test(frames, 0.2)
    again, test_again = al_pool.split_test(frames, 0.2)
    indices = {frame.info["pool_index"] for frame in pool}
    assert [f.info["pool_index"] for f in test] == [f.info["pool_index"] for f in test_again] and len(test) == 2
    assert not indices & {frame.info["pool_index"] for frame in test} and len(indices) + len(test) == len(frames)


def test_frame_spreads_vanish_for_identical_members_and_not_for_different_ones(frames):
    import copy

    import torch

    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel

    torch.manual_seed(0)
    member = PolModel(["O", "Si"], 4.0, num_features=4, num_layers=1, lmax=1)
    same = al_pool.frame_spreads(PolEnsemble([member, copy.deepcopy(member)]), frames[:3])
    other = PolModel(["O", "Si"], 4.0, num_features=4, num_layers=1, lmax=1)
    different = al_pool.frame_spreads(PolEnsemble([member, other]), frames[:3])
    for name in ("force", "born", "alpha"):
        assert same[name].shape == different[name].shape == (3,)
        assert np.all(same[name] < 1e-5) and np.all(different[name] > 1e-4), name


def test_each_frames_error_is_the_held_out_error_of_that_frame_alone(frames):
    import torch

    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel
    from polmodel.training.evaluation import predict_pairs

    torch.manual_seed(1)
    ensemble = PolEnsemble([PolModel(["O", "Si"], 4.0, num_features=4, num_layers=1, lmax=1) for _ in range(2)])
    spreads = al_pool.frame_spreads(ensemble, frames[:3])     # the three frames in one batch
    for index, frame in enumerate(frames[:3]):
        alone = predict_pairs(ensemble, [frame])                # the frame alone: its labels and the member mean
        for name, quantity, width in (("force_error", "forces", 3), ("born_error", "born_effective_charges", 9)):
            label, predicted = alone[quantity]
            largest = np.linalg.norm((predicted - label).reshape(len(frame), width), axis=1).max()
            assert spreads[name][index] == pytest.approx(largest, rel=1e-5)


def test_a_level_does_not_rise_with_a_noisy_error_estimate_within_the_loop(frames):
    spreads = planted_spreads(len(frames), 6, force=0.3)
    first_picked, first, _ = al_pool.loop_choice(frames, spreads, TRAINING_ERRORS, arguments(), seed=0)
    assert first_picked and first.force_lower == pytest.approx(0.2)
    risen = {**TRAINING_ERRORS, "forces": 0.2}                 # the estimate doubled by chance: 2 × 0.2 > 0.3
    alone, _, _ = al_pool.loop_choice(frames, spreads, risen, arguments(), seed=1)
    kept, criteria, _ = al_pool.loop_choice(frames, spreads, risen, arguments(), seed=1, previous=first)
    assert alone == [] and [index for index, _ in kept] == [6]
    assert criteria.force_lower == pytest.approx(0.2)
    fallen = {**TRAINING_ERRORS, "forces": 0.05}
    _, lower, _ = al_pool.loop_choice(frames, spreads, fallen, arguments(), seed=2, previous=first)
    assert lower.force_lower == pytest.approx(0.1)


@pytest.mark.slow
def test_the_printed_counts_are_the_sums_of_the_labels_taken_and_methods_stop_at_the_target(tmp_path, capsys):
    workdir = tmp_path / "work"
    common = ["--frames", str(CUT), "--seeds", "1", "--workers", "1", "--iterations", "2", "--epochs", "1",
              "--initial-epochs", "1", "--reference-epochs", "1", "--initial", "2", "--budget", "5",
              "--architecture", '{"num_features": 4, "num_layers": 1, "lmax": 1}', "--workdir", str(workdir),
              "--quiet"]
    al_pool.main(common + ["--tolerance", "-0.99"])               # a target no method reaches: every iteration runs
    lines = capsys.readouterr().out.strip().splitlines()
    # neither method reaches it, so there is no ratio to give: lower bounds are not compared
    assert lines[-1] == "labels to target: no seed where both methods reached the target", lines[-1]
    (seed_file,) = workdir.glob("*-0.json")
    curves = json.loads(seed_file.read_text())["result"]
    taken = [tier for choice in curves["loop_choices"] for _, tier in choice["picked"]]
    assert curves["loop"][-1][0] == 2 * 4 + sum(al_pool.label_runs(tier) for tier in taken)
    assert [runs for runs, _ in curves["random"]] == [8, 12, 16]      # one full frame (4 runs) fits in 5
    row = next(line for line in lines if line.lstrip().startswith("0 "))
    assert f"{curves['loop'][-1][0]}," in row                         # the table's count is the JSON's sum
    assert f">{16 + 5:6d}" in row                                     # random not reached: a lower bound, last count + budget
    # a rerun reads the finished tasks instead of training again
    before = seed_file.stat().st_mtime_ns
    al_pool.main(common + ["--tolerance", "-0.99"])
    assert seed_file.stat().st_mtime_ns == before
    capsys.readouterr()
    al_pool.main(common + ["--tolerance", "1000"])                # met by the first ensemble: nothing more is taken
    assert capsys.readouterr().out.strip().splitlines()[-1] == "labels to target: loop 8, random 8, ratio 1.00"
