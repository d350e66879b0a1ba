"""Unit tests of polmodel.active_learning.selection: trust levels, the adaptive window, random draws, P / Z* thresholds,
deduplication, the cap, label tiers within a budget, convergence."""
import numpy as np
import pytest

from fixtures_al import batio3_atoms
from polmodel.active_learning.selection import (
    ACCURATE,
    CANDIDATE,
    FAILED,
    ENERGY_FORCES,
    FIELD_FRAMES,
    FULL,
    SelectionCriteria,
    adapt_trust_window,
    assign_label_tiers,
    classify,
    fingerprint,
    fingerprint_distance,
    TIERS,
    cheap_tier,
    is_converged,
    pw_runs_per_label,
    remove_near_duplicates,
    select_candidates,
    shortest_pair_distances,
)


def test_classify_trust_levels_are_half_open():
    criteria = SelectionCriteria(force_lower=0.1, force_upper=0.3)
    labels = classify([0.0, 0.0999, 0.1, 0.2, 0.2999, 0.3, 5.0], criteria)
    assert list(labels) == [ACCURATE, ACCURATE, CANDIDATE, CANDIDATE, CANDIDATE, FAILED, FAILED]


def test_polarization_and_born_spreads_promote_accurate_frames():
    criteria = SelectionCriteria(force_lower=0.1, force_upper=0.3, polarization_threshold=0.01, born_charge_threshold=0.5)
    force = [0.01, 0.01, 0.01, 0.5]
    polarization = np.array([[0, 0, 0.001], [0.008, 0.008, 0.0], [0, 0, 0], [1.0, 0, 0]])  # norm of row 1 > 0.01
    born = [0.1, 0.1, 0.6, 0.0]
    labels = classify(force, criteria, polarization_std=polarization, born_charge_std=born)
    # a spread above its threshold makes a candidate; the upper force trust level still wins (unphysical frame)
    assert list(labels) == [ACCURATE, CANDIDATE, CANDIDATE, FAILED]


def test_thresholds_are_ignored_when_unset():
    labels = classify([0.01], SelectionCriteria(force_lower=0.1, force_upper=0.3), polarization_std=[[9.0, 9, 9]])
    assert list(labels) == [ACCURATE]


@pytest.mark.parametrize(
    "values",
    [dict(force_lower=0.3, force_upper=0.1), dict(force_lower=-1.0), dict(polarization_threshold=0.0),
     dict(max_candidates=-1)],
)
def test_bad_criteria_are_refused(values):
    with pytest.raises(ValueError):
        SelectionCriteria(**values)


def test_unknown_criteria_key_is_refused():
    with pytest.raises(ValueError, match="unknown selection parameter"):
        SelectionCriteria.from_dict({"force_low": 0.1})


def test_fingerprint_is_invariant_to_rotation_translation_and_permutation():
    atoms = batio3_atoms(0.1, seed=1)
    moved = atoms.copy()
    moved.rotate(37, "z", rotate_cell=True)
    moved.translate([0.3, -0.2, 1.1])
    permuted = atoms[[0, 1, 4, 2, 3]]
    reference = fingerprint(atoms)
    assert fingerprint_distance(reference, fingerprint(moved)) < 1e-10
    assert fingerprint_distance(reference, fingerprint(permuted)) < 1e-10
    assert fingerprint_distance(reference, fingerprint(batio3_atoms(0.1, seed=2))) > 1e-3


def test_near_duplicates_are_removed_and_distinct_frames_kept():
    base = batio3_atoms(0.1, seed=3)
    almost = base.copy()
    almost.positions += 1e-4
    other = batio3_atoms(0.15, seed=4)
    frames = [base, almost, other]
    assert remove_near_duplicates(frames, [0, 1, 2], tolerance=0.01) == [0, 2]
    # tolerance 0 keeps everything that is not identical
    assert remove_near_duplicates(frames, [0, 1, 2], tolerance=0.0) == [0, 1, 2]
    assert remove_near_duplicates(frames, [2, 1, 0], tolerance=0.01, limit=1) == [2]


def test_select_candidates_draws_at_random_within_the_window_caps_and_counts():
    frames = [batio3_atoms(0.12, seed=10 + index) for index in range(12)]
    force = [0.01, 0.2, 0.25, 0.15, 0.9, 0.22, 0.3, 0.11, 0.45, 0.6, 0.12, 0.35]
    window = {1, 2, 3, 5, 6, 7, 8, 10, 11}
    draws = []
    for seed in range(8):
        criteria = SelectionCriteria(force_lower=0.1, force_upper=0.5, max_candidates=3, similarity_tolerance=1e-6,
                                     seed=seed)
        selected, statistics = select_candidates(frames, force, criteria)
        assert len(selected) == 3 and set(selected) <= window  # never below the window, never above it
        # the same seed draws the same frames
        assert select_candidates(frames, force, criteria)[0] == selected
        draws.append(tuple(selected))
    # a random draw, not largest spread first: the seeds do not all pick the three most uncertain frames
    assert len(set(draws)) > 4
    assert sum(draws_ == (8, 11, 6) for draws_ in draws) < len(draws)
    assert statistics["num_frames"] == 12
    assert (statistics["num_accurate"], statistics["num_candidates"], statistics["num_failed"]) == (1, 9, 2)
    assert statistics["num_selected"] == 3
    assert statistics["candidate_fraction"] == pytest.approx(9 / 12)
    assert statistics["failed_fraction"] == pytest.approx(2 / 12)
    assert statistics["accurate_fraction"] == pytest.approx(1 / 12)


def test_a_frame_above_the_upper_level_is_never_selected():
    frames = [batio3_atoms(0.12, seed=30 + index) for index in range(10)]
    force = [0.2, 0.7, 0.8, 0.9, 1.5, 0.5, 0.51, 3.0, 0.6, 0.55]  # only frame 0 is inside the window
    for seed in range(5):
        criteria = SelectionCriteria(force_lower=0.1, force_upper=0.5, max_candidates=10, similarity_tolerance=1e-6,
                                     seed=seed)
        assert select_candidates(frames, force, criteria)[0] == [0]


def test_the_adaptive_window_follows_the_validation_error():
    criteria = SelectionCriteria(force_lower=0.02, force_upper=1.0, force_lower_factor=3.0)
    assert adapt_trust_window(criteria, 0.1).force_lower == pytest.approx(0.3)
    assert adapt_trust_window(criteria, 0.05).force_lower == pytest.approx(0.15)
    assert adapt_trust_window(criteria, 0.001).force_lower == pytest.approx(0.02)  # the floor
    assert adapt_trust_window(criteria, 2.0).force_lower == pytest.approx(0.5)  # half the upper level at most
    assert adapt_trust_window(criteria, 0.1).force_upper == 1.0
    fixed = SelectionCriteria(force_lower=0.02, force_upper=1.0)
    assert adapt_trust_window(fixed, 0.1) == fixed
    # a frame of spread 0.2 is a candidate for a model of error 0.05, accurate for one of error 0.1
    assert classify([0.2], adapt_trust_window(criteria, 0.05))[0] == CANDIDATE
    assert classify([0.2], adapt_trust_window(criteria, 0.1))[0] == ACCURATE
    with pytest.raises(ValueError):
        adapt_trust_window(criteria, float("nan"))


def test_no_adapted_level_rises_above_the_previous_exploration_of_its_stage():
    criteria = SelectionCriteria(force_lower=0.02, force_upper=1.0, force_lower_factor=3.0,
                                 response_threshold_factor=2.0)
    first = adapt_trust_window(criteria, 0.1, born_charge_rmse=0.05, polarizability_rmse=0.2)
    risen = adapt_trust_window(criteria, 0.15, born_charge_rmse=0.08, polarizability_rmse=0.1, previous=first)
    assert risen.force_lower == pytest.approx(0.3) and risen.born_charge_threshold == pytest.approx(0.1)
    assert risen.polarizability_threshold == pytest.approx(0.2)           # α's fell: it follows
    assert adapt_trust_window(criteria, 0.15).force_lower == pytest.approx(0.45)   # a new stage starts afresh
    # a frame of force spread 0.4 stays a candidate after the estimate rose
    assert classify([0.4], risen)[0] == CANDIDATE and classify([0.4], adapt_trust_window(criteria, 0.15))[0] == ACCURATE


def test_the_tiers_and_their_pw_x_costs_have_one_home():
    """The tiers and what a label of each costs in pw.x runs are written once, here; the workchain and the loop
    import them (FieldResponseWorkChain's `tier` input, FULL_LABEL_COST, the cheap tier of a candidate)."""
    from polmodel.workflows import active_learning, field_response

    assert TIERS == (ENERGY_FORCES, FIELD_FRAMES, FULL) == ("energy_forces", "field_frames", "full")
    assert field_response.TIERS is TIERS and field_response.pw_runs_per_label is pw_runs_per_label
    assert cheap_tier(np.zeros(3))[2] == pw_runs_per_label(ENERGY_FORCES) == 1
    assert cheap_tier([0.0, 0.0, 0.05])[2] == pw_runs_per_label(FIELD_FRAMES, [[0.0, 0.0, 0.05]]) == 2
    assert active_learning.FULL_LABEL_COST == pw_runs_per_label(FULL) == 10
    assert pw_runs_per_label(FULL, string_extrapolation=True) == 16


def test_label_tiers_follow_the_sampled_field_and_the_budget():
    efields = [[0, 0, 0], [0, 0, 0.02], [0.01, 0, 0], [0, 0, 0], [0, 0.03, 0]]
    spread = [0.1, 0.5, 0.05, 0.9, 0.2]
    plans = assign_label_tiers(efields, spread, budget=15, full_cost=10, max_full=1)
    by_index = {plan.index: plan for plan in plans}
    # the largest response spread (frame 3) gets the full response; the others the cheap tier at their field
    assert by_index[3].tier == FULL and by_index[3].cost == 10
    assert by_index[0].tier == ENERGY_FORCES and by_index[0].cost == 1 and by_index[0].fields == ()
    assert by_index[1].tier == FIELD_FRAMES and by_index[1].fields == ((0.0, 0.0, 0.02),) and by_index[1].cost == 2
    assert sum(plan.cost for plan in plans) <= 15
    assert [plan.index for plan in plans] == [0, 1, 2, 3]  # frame 4 (2 runs) no longer fits: 10 + 1 + 2 + 2 = 15
    # a budget too small for the full response labels everything cheaply instead
    cheap = assign_label_tiers(efields, spread, budget=8, full_cost=10, max_full=1)
    assert {plan.tier for plan in cheap} == {ENERGY_FORCES, FIELD_FRAMES} and len(cheap) == 5
    assert sum(plan.cost for plan in cheap) == 8
    # no spread known: nobody is upgraded
    assert FULL not in {plan.tier for plan in assign_label_tiers(efields, None, 100, 10, 2)}
    assert len(assign_label_tiers(efields, spread, budget=0, full_cost=10, max_full=1)) == 0


def test_full_response_only_where_the_response_spread_exceeds_the_minimum():
    efields = [[0, 0, 0], [0, 0, 0.02], [0, 0, 0]]
    spread = [0.1, 0.5, 0.3]
    tiers = {plan.index: plan.tier for plan in assign_label_tiers(efields, spread, 40, 10, 2, min_full_spread=0.4)}
    # two full labels allowed, but only frame 1 disagrees enough; frame 2 (0.3) gets the cheap tier
    assert tiers == {0: ENERGY_FORCES, 1: FULL, 2: ENERGY_FORCES}
    assert FULL not in {plan.tier for plan in assign_label_tiers(efields, spread, 40, 10, 2, min_full_spread=0.5)}
    with pytest.raises(ValueError, match="min_full_spread"):
        assign_label_tiers(efields, spread, 40, 10, 2, min_full_spread=-0.1)


def test_collapsed_frames_are_failed_not_candidates():
    frames = [batio3_atoms(0.12, seed=10 + index) for index in range(3)]
    collapsed = frames[1]
    collapsed.positions[2] = collapsed.positions[1] + [0.244, 0.0, 0.0]  # Ti and O 0.244 Å apart (seen in an MD run)
    criteria = SelectionCriteria(force_lower=0.1, force_upper=0.5, similarity_tolerance=1e-6)
    selected, statistics = select_candidates(frames, [0.3, 0.35, 0.2], criteria)
    assert 1 not in selected and selected == [0, 2]
    assert (statistics["num_candidates"], statistics["num_failed"]) == (2, 1)


def test_closest_approach_follows_the_labelled_pair_distances():
    # the demo's first run of 2026-11-26 chose MD frames with Ti–O at 1.33-1.40 Å (DFT: metallic); BaTiO3's Ti–O
    # bond is 2.0 Å, far above the absolute 0.5 Å limit
    labelled = [batio3_atoms(0.03, seed=index) for index in range(4)]
    shortest = shortest_pair_distances(labelled)
    # Ba–Ba and Ti–Ti sit at the 4.0 Å lattice constant, beyond the 4.0 Å search: no relative limit for them
    assert set(shortest) == {"Ba-O", "Ba-Ti", "O-O", "O-Ti"}
    assert 1.85 < shortest["O-Ti"] < 2.0 and shortest["Ba-O"] > 2.6
    frames = [batio3_atoms(0.03, seed=20 + index) for index in range(3)]
    frames[1].positions[2] = frames[1].positions[1] + [1.35, 0.0, 0.0]   # Ti–O at 1.35 Å
    absolute = SelectionCriteria(force_lower=0.1, force_upper=0.5, similarity_tolerance=1e-6)
    relative = SelectionCriteria(force_lower=0.1, force_upper=0.5, similarity_tolerance=1e-6,
                                 min_distance_fraction=0.8, labelled_pair_distances=shortest)
    assert sorted(select_candidates(frames, [0.3, 0.35, 0.2], absolute)[0]) == [0, 1, 2]
    selected, statistics = select_candidates(frames, [0.3, 0.35, 0.2], relative)
    assert sorted(selected) == [0, 2] and statistics["num_failed"] == 1
    assert relative.pair_limits()["O-Ti"] == pytest.approx(0.8 * shortest["O-Ti"])
    # a pair without a labelled distance keeps the absolute limit only; the relative one never goes below it
    only_ti_o = SelectionCriteria(min_distance_fraction=0.8, labelled_pair_distances={"O-Ti": shortest["O-Ti"]})
    squeezed = batio3_atoms(0.0)
    squeezed.positions[0] = squeezed.positions[2] + [-1.2, -1.2, 0.0]  # Ba–O at 1.7 Å, Ti–O untouched at 2.0 Å
    assert not only_ti_o.too_close(squeezed) and relative.too_close(squeezed)
    assert SelectionCriteria(min_distance=1.0, min_distance_fraction=0.1,
                             labelled_pair_distances={"O-Ti": 2.0}).pair_limits() == {"O-Ti": 1.0}
    with pytest.raises(ValueError, match="min_distance_fraction"):
        SelectionCriteria(min_distance_fraction=1.5)
    with pytest.raises(ValueError, match="labelled_pair_distances"):
        SelectionCriteria(min_distance_fraction=0.8, labelled_pair_distances={"Ti-O": 2.0})


def test_select_candidates_deduplicates_copies():
    frame = batio3_atoms(0.1, seed=5)
    frames = [frame.copy() for _ in range(4)]
    selected, statistics = select_candidates(frames, [0.2] * 4, SelectionCriteria(force_lower=0.1, force_upper=0.5))
    assert len(selected) == 1 and selected[0] in range(4)
    assert statistics["num_candidates"] == 4


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 frames but 3"):
        select_candidates([batio3_atoms(), batio3_atoms()], [0.1, 0.2, 0.3], SelectionCriteria())


def test_convergence_counts_failed_frames_as_untrusted():
    stats = {"num_frames": 10, "candidate_fraction": 0.02, "failed_fraction": 0.0}
    assert is_converged(stats, 0.05)
    assert not is_converged(dict(stats, failed_fraction=0.04), 0.05)
    assert not is_converged({"num_frames": 0, "candidate_fraction": 0.0, "failed_fraction": 0.0}, 0.05)


def test_a_measured_spread_to_error_ratio_puts_each_level_into_spread_units():
    criteria = SelectionCriteria(force_lower=0.02, force_upper=10.0, force_lower_factor=2.0,
                                 response_threshold_factor=2.0)
    # errors in the spread's form (largest atomic norm), larger than the per-component RMSE given beside them
    calibration = {"forces": {"error": 1.2, "ratio": 0.25}, "born_effective_charges": {"error": 0.6, "ratio": 0.5}}
    plain = adapt_trust_window(criteria, 0.4, born_charge_rmse=0.2, polarizability_rmse=0.01)
    scaled = adapt_trust_window(criteria, 0.4, born_charge_rmse=0.2, polarizability_rmse=0.01,
                                calibration=calibration)
    assert plain.force_lower == pytest.approx(0.8) and scaled.force_lower == pytest.approx(2.0 * 1.2 * 0.25)
    assert scaled.born_charge_threshold == pytest.approx(2.0 * 0.6 * 0.5)
    assert scaled.polarizability_threshold == pytest.approx(plain.polarizability_threshold)   # no calibration: as is
    # members that disagree by a quarter of their error: a frame of spread 0.7 is a candidate only when calibrated
    assert classify([0.7], plain)[0] == ACCURATE and classify([0.7], scaled)[0] == CANDIDATE
    # the floor still holds
    assert adapt_trust_window(criteria, 0.4, calibration={"forces": {"error": 1.0, "ratio": 0.0}}).force_lower == 0.02
    with pytest.raises(ValueError, match="finite"):
        adapt_trust_window(criteria, 0.4, calibration={"forces": {"error": float("nan"), "ratio": 0.5}})
