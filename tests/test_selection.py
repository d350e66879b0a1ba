"""Unit tests of polmodel.selection: trust levels, P / Z* thresholds, deduplication, the cap, convergence."""
import numpy as np
import pytest

from fixtures_al import batio3_atoms
from polmodel.selection import (
    ACCURATE,
    CANDIDATE,
    FAILED,
    SelectionCriteria,
    classify,
    fingerprint,
    fingerprint_distance,
    is_converged,
    remove_near_duplicates,
    select_candidates,
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


def test_select_candidates_orders_by_uncertainty_caps_and_counts():
    frames = [batio3_atoms(0.12, seed=10 + index) for index in range(6)]
    force = [0.01, 0.2, 0.25, 0.15, 0.9, 0.22]
    criteria = SelectionCriteria(force_lower=0.1, force_upper=0.5, max_candidates=2, similarity_tolerance=1e-6)
    selected, statistics = select_candidates(frames, force, criteria)
    assert selected == [2, 5]  # the two most uncertain candidates
    assert statistics["num_frames"] == 6
    assert (statistics["num_accurate"], statistics["num_candidates"], statistics["num_failed"]) == (1, 4, 1)
    assert statistics["num_selected"] == 2
    assert statistics["candidate_fraction"] == pytest.approx(4 / 6)
    assert statistics["failed_fraction"] == pytest.approx(1 / 6)
    assert statistics["accurate_fraction"] == pytest.approx(1 / 6)


def test_collapsed_frames_are_failed_not_candidates():
    frames = [batio3_atoms(0.12, seed=10 + index) for index in range(3)]
    collapsed = frames[1]
    collapsed.positions[2] = collapsed.positions[1] + [0.244, 0.0, 0.0]  # Ti and O 0.244 Å apart (seen in an MD run)
    criteria = SelectionCriteria(force_lower=0.1, force_upper=0.5, similarity_tolerance=1e-6)
    selected, statistics = select_candidates(frames, [0.3, 0.35, 0.2], criteria)
    assert 1 not in selected and selected == [0, 2]
    assert (statistics["num_candidates"], statistics["num_failed"]) == (2, 1)


def test_select_candidates_deduplicates_copies():
    frame = batio3_atoms(0.1, seed=5)
    frames = [frame.copy() for _ in range(4)]
    selected, statistics = select_candidates(frames, [0.2] * 4, SelectionCriteria(force_lower=0.1, force_upper=0.5))
    assert selected == [0]
    assert statistics["num_candidates"] == 4


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 frames but 3"):
        select_candidates([batio3_atoms(), batio3_atoms()], [0.1, 0.2, 0.3], SelectionCriteria())


def test_convergence_counts_failed_frames_as_untrusted():
    stats = {"num_frames": 10, "candidate_fraction": 0.02, "failed_fraction": 0.0}
    assert is_converged(stats, 0.05)
    assert not is_converged(dict(stats, failed_fraction=0.04), 0.05)
    assert not is_converged({"num_frames": 0, "candidate_fraction": 0.0, "failed_fraction": 0.0}, 0.05)
