"""Unit tests of the loop's pure parts: DP-GEN-style initial structures and the exploration schedule."""
import numpy as np
import pytest

from fixtures_al import batio3_atoms
from polmodel.active_learning.exploration import (
    ExplorationStage,
    capped_field_protocol,
    covered_field,
    field_peak,
    next_stage,
    stage_field_protocols,
    validate_schedule,
)
from polmodel.active_learning.initial_structures import perturbed_structures


def test_perturbed_structures_strain_and_displace_within_the_bounds():
    atoms = batio3_atoms()
    copies = perturbed_structures(atoms, 5, max_strain=0.03, max_displacement=0.02, seed=4)
    assert len(copies) == 5
    for perturbed in copies:
        strain = np.linalg.solve(atoms.cell.array, perturbed.cell.array) - np.eye(3)
        assert np.allclose(strain, strain.T) and 0 < np.abs(strain).max() <= 0.03
        # positions relative to the strained ideal cell moved by at most the displacement (per component)
        ideal = atoms.get_scaled_positions() @ perturbed.cell.array
        delta = perturbed.positions - ideal
        delta -= np.round(delta @ np.linalg.inv(perturbed.cell.array)) @ perturbed.cell.array
        assert 0 < np.abs(delta).max() <= 0.02 + 1e-12
    assert np.allclose(atoms.positions, batio3_atoms().positions)  # the input is not modified
    again = perturbed_structures(atoms, 5, 0.03, 0.02, seed=4)
    assert all(np.allclose(a.positions, b.positions) and np.allclose(a.cell, b.cell) for a, b in zip(copies, again))
    assert not np.allclose(copies[0].positions, perturbed_structures(atoms, 1, 0.03, 0.02, seed=5)[0].positions)


@pytest.mark.parametrize("kwargs", [dict(count=-1), dict(max_strain=0.6), dict(max_displacement=-0.1)])
def test_perturbed_structures_refuse_bad_input(kwargs):
    values = dict(count=2, max_strain=0.03, max_displacement=0.02)
    values.update(kwargs)
    with pytest.raises(ValueError):
        perturbed_structures(batio3_atoms(), **values)


def test_schedule_must_not_get_easier_and_advances_on_the_threshold():
    stages = validate_schedule([
        {"temperatures": [100], "field_amplitude": 0.0, "steps": 50},
        {"temperatures": [100, 300], "field_amplitude": 0.05, "steps": 100},
    ])
    assert stages[1] == ExplorationStage((100.0, 300.0), 0.05, 100)
    with pytest.raises(ValueError, match="easier"):
        validate_schedule([{"temperatures": [300], "field_amplitude": 0.05, "steps": 50},
                           {"temperatures": [300], "field_amplitude": 0.01, "steps": 50}])
    with pytest.raises(ValueError, match="unknown stage"):
        validate_schedule([{"temperatures": [300], "field": 0.05, "steps": 50}])
    assert next_stage(0, 0.95, 0.9, 2) == 1
    assert next_stage(0, 0.85, 0.9, 2) == 0
    assert next_stage(1, 1.0, 0.9, 2) == 1  # the last stage stays


def test_fields_stay_within_the_labelled_range_plus_the_margin():
    shapes = [{"kind": "static", "vector": [0.0, 0.0, 0.1]},
              {"kind": "cosine", "amplitude": 0.2, "period_fs": 50.0, "axis": [1, 0, 0], "phase": 0.0},
              {"kind": "ramp", "start": [0, 0, 0], "stop": [0, 0.3, 0], "duration_fs": 20.0}]
    capped = stage_field_protocols(shapes, stage_amplitude=0.1, covered=0.01, margin=0.02)
    assert [field_peak(protocol) for protocol in capped] == pytest.approx([0.03, 0.03, 0.03])
    assert capped[1]["period_fs"] == 50.0 and capped[2]["stop"] == pytest.approx([0, 0.03, 0])
    # once the labels cover more, the stage's own amplitude is the limit
    assert [field_peak(p) for p in stage_field_protocols(shapes, 0.1, covered=0.5, margin=0.02)] == pytest.approx(
        [0.1, 0.1, 0.1])
    # a zero-field stage: one zero field, not three copies of it
    assert stage_field_protocols(shapes, 0.0, 0.0, 0.02) == [{"kind": "static", "vector": [0.0, 0.0, 0.0]}]
    assert capped_field_protocol(shapes[0], 0.05)["vector"] == pytest.approx([0, 0, 0.05])


def test_covered_field_is_the_largest_labelled_field():
    frames = [batio3_atoms() for _ in range(3)]
    frames[1].info["efield"] = np.array([0.0, 0.03, 0.04])
    frames[2].info["efield"] = np.array([0.01, 0.0, 0.0])
    assert covered_field(frames) == pytest.approx(0.05)
    assert covered_field(frames[:1]) == 0.0
