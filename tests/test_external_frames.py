"""Labelled frames from another code (polmodel.data.external) on ten frames cut unchanged from Allegro-pol's SiO2
parity file (tests/data/allegro_pol, MIT licence beside them): every convention is checked against a fact of the
data, and a wrong mapping is refused naming what is wrong."""
import pathlib

import numpy as np
import pytest

from polmodel.data.external import (ALLEGRO_POL, LabelMapping, born_charge_order_misfit, read_external_frames)
from polmodel.data.frames import FrameError
from polmodel.data.polarization import fold_dipole_difference
from polmodel.data.units import EPSILON0_E_PER_V_ANGSTROM

CUT = pathlib.Path(__file__).parent / "data" / "allegro_pol" / "SiO2.cut.xyz"


@pytest.fixture(scope="module")
def frames():
    return read_external_frames(CUT, "allegro-pol")


def with_mapping(**changes):
    return LabelMapping(**{**ALLEGRO_POL.as_dict(), **changes})


def test_every_label_arrives_in_polmodel_units(frames):
    assert len(frames) == 10
    for frame in frames:
        assert {"energy", "stress", "dipole", "polarization_quantum", "polarizability"} <= set(frame.info)
        assert {"forces", "born_effective_charges"} <= set(frame.arrays)
        # the clamped-ion ε∞ of α-quartz is about 2.4: α must be per cell in e·Å²/V
        epsilon = 1 + np.trace(frame.info["polarizability"]) / 3 / (EPSILON0_E_PER_V_ANGSTROM * frame.get_volume())
        assert 2.2 < epsilon < 2.6
        born = frame.arrays["born_effective_charges"].reshape(-1, 3, 3)
        silicon = np.array(frame.get_chemical_symbols()) == "Si"
        assert 2.8 < np.trace(born[silicon], axis1=1, axis2=2).mean() / 3 < 3.8   # Z*(Si) in e
        assert np.allclose(frame.info["polarization_quantum"], frame.cell.array)   # quantum e·R
        assert frame.info["external_source"].startswith("SiO2.cut.xyz#")


def test_born_charges_obey_the_sum_rule_and_alpha_is_symmetric(frames):
    for frame in frames:
        assert np.abs(frame.arrays["born_effective_charges"].sum(axis=0)).max() < 1e-6
        alpha = frame.info["polarizability"]
        assert np.abs(alpha - alpha.T).max() < 1e-3 * np.abs(alpha).max()


def test_the_stress_sign_is_asEs_thermal_pressure_rises_with_the_energy(frames):
    """The frames share one cell: hotter frames (higher energy) push harder on it, so the pressure −tr(σ)/3 on
    ASE's sign grows with the energy. pw.x's sign (stress_sign -1) turns that around."""
    def pressure_energy_correlation(imported):
        pressure = [-np.trace(frame.info["stress"]) / 3 for frame in imported]
        return np.corrcoef(pressure, [frame.info["energy"] for frame in imported])[0, 1]

    assert pressure_energy_correlation(frames) > 0.3
    assert pressure_energy_correlation(read_external_frames(CUT, with_mapping(stress_sign=-1))) < -0.3


def test_the_born_charge_order_fits_the_dipole_changes_and_the_transpose_is_refused(frames):
    declared, transposed, pairs = born_charge_order_misfit(frames)
    assert pairs >= 2 and declared < 0.1 * transposed
    with pytest.raises(FrameError, match="born_charge_order"):
        read_external_frames(CUT, with_mapping(born_charge_order="force_field"))


def test_a_dipole_moved_by_a_lattice_quantum_folds_back(frames, tmp_path):
    import ase.io

    foreign = ase.io.read(CUT, index=":")
    lattice_vector = foreign[2].cell.array[1]
    foreign[2].calc.results["polarization"] = foreign[2].calc.results["polarization"] + lattice_vector
    moved_file = tmp_path / "moved.xyz"
    ase.io.write(moved_file, foreign, format="extxyz")
    moved = read_external_frames(moved_file, "allegro-pol")
    shift = moved[2].info["dipole"] - frames[2].info["dipole"]
    assert np.allclose(shift, lattice_vector)
    assert np.allclose(fold_dipole_difference(shift, moved[2].info["polarization_quantum"]), 0.0, atol=1e-9)
    # the Z* order check compares folded differences, so it is blind to the move
    assert born_charge_order_misfit(moved)[0] == pytest.approx(born_charge_order_misfit(frames)[0], rel=1e-4)


@pytest.mark.parametrize("changes, named", [
    ({"energy": "energy"}, "'energy'"),                       # Allegro-pol calls it total_energy
    ({"dipole": "dipole"}, "'dipole'"),                       # ... and polarization
    ({"born_effective_charges": "forces"}, "'forces'"),       # (N, 3), not (N, 9)
])
def test_a_wrong_mapping_is_refused_naming_the_key(changes, named):
    with pytest.raises(FrameError, match=named):
        read_external_frames(CUT, with_mapping(**changes))


def test_unknown_mapping_options_and_conventions_are_refused():
    with pytest.raises(ValueError, match="born_charge_ordr"):
        LabelMapping.from_dict({"born_charge_ordr": "field_force"})
    with pytest.raises(ValueError, match="stress_sign"):
        LabelMapping(stress_sign=2)
    with pytest.raises(ValueError, match="unknown convention"):
        read_external_frames(CUT, "nequip")
