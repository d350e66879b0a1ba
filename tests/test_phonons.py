"""Γ phonons: the model's Hessian (autograd) against finite differences of its forces; sum rules; the CLI."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.analysis import phonons
from polmodel.dynamics.calculator import PolCalculator
from polmodel.nn.model import PolModel


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = PolModel(["Ba", "Ti", "O"], 4.0, num_features=8, lmax=1, num_layers=1)
    model.set_energy_scale(5.0)
    return model.to(torch.float64)


def batio3():
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.mark.parametrize("ensemble", [False, True])
def test_model_hessian_equals_finite_differences_of_its_forces(ensemble):
    from polmodel.nn.ensemble import PolEnsemble

    model = PolEnsemble([tiny_model(0), tiny_model(1)]) if ensemble else tiny_model()
    calculator = PolCalculator(model, efield=(0.0, 0.0, 0.02))
    atoms = batio3()
    analytic = phonons.model_force_constants(calculator, atoms)
    numeric = phonons.finite_difference_force_constants(atoms, calculator, displacement=1e-4)
    assert np.abs(analytic).max() > 0.1
    np.testing.assert_allclose(analytic, numeric, atol=1e-6 * np.abs(analytic).max() + 1e-8)
    # translation invariance of the model: the rows already sum to zero
    assert np.abs(analytic.sum(axis=2)).max() < 1e-8 * np.abs(analytic).max()


def test_translation_projection_and_acoustic_modes():
    rng = np.random.default_rng(0)
    random = rng.standard_normal((4, 3, 4, 3))
    projected = phonons.impose_translation_invariance(random)
    np.testing.assert_allclose(projected.sum(axis=2), 0.0, atol=1e-12)
    matrix = projected.reshape(12, 12)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    # a diatomic chain-like crystal: bond spring k between atoms 0 and 1 along x only
    spring = 10.0
    force_constants = np.zeros((2, 3, 2, 3))
    for i, j, sign in ((0, 0, 1), (1, 1, 1), (0, 1, -1), (1, 0, -1)):
        force_constants[i, :, j, :] = sign * spring * np.eye(3)
    masses = np.array([16.0, 48.0])
    modes = phonons.gamma_modes(force_constants, masses)
    reduced = masses.prod() / masses.sum()
    optical = np.sqrt(spring / reduced) * phonons.EIGENVALUE_TO_WAVENUMBER
    np.testing.assert_allclose(np.sort(modes["wavenumbers"][~modes["acoustic"]]), [optical] * 3, rtol=1e-10)
    np.testing.assert_allclose(modes["wavenumbers"][modes["acoustic"]], 0.0, atol=1e-5)
    # rigid-ion charges ±2: the optical mode carries Z̃ = 2 / √μ along its axis
    born = np.array([2.0 * np.eye(3), -2.0 * np.eye(3)])
    charges = phonons.mode_effective_charges(born, modes["eigenvectors"], masses)
    np.testing.assert_allclose(np.linalg.norm(charges[~modes["acoustic"]], axis=1), 2.0 / np.sqrt(reduced), rtol=1e-10)
    np.testing.assert_allclose(charges[modes["acoustic"]], 0.0, atol=1e-12)
    intensities = phonons.ir_intensities(charges)["debye2_per_angstrom2_amu"]
    np.testing.assert_allclose(intensities[~modes["acoustic"]], 4.0 / reduced * 4.80320 ** 2, rtol=1e-4)


def test_modes_command(tmp_path):
    from polmodel.cli import main
    from polmodel.nn.serialization import save

    save(tiny_model(), tmp_path / "m.pt")
    batio3().write(tmp_path / "s.xyz")
    assert main(["analyze", "modes", str(tmp_path / "s.xyz"), "--model", str(tmp_path / "m.pt"),
                 "--output", str(tmp_path / "modes")]) == 0
    report = json.loads((tmp_path / "modes.json").read_text())
    assert len(report["wavenumbers_cm-1"]) == 15 and sum(report["acoustic"]) == 3
    assert np.shape(report["epsilon_inf"]) == (3, 3)
    assert report["notes"]  # a rattled structure is not at the model's minimum: said so
    assert (tmp_path / "modes.png").read_bytes()[:4] == b"\x89PNG"


def test_mode_charges_are_the_dipole_derivative_along_each_mode():
    """Z̃_m = d(ΩP)/dQ_m: moving the atoms by δ e_m/√M changes the model's cell dipole by δ Z̃_m (the model's Z*
    is not symmetric in [a, b], so this pins the index order)."""
    calculator = PolCalculator(tiny_model(seed=1))
    atoms = batio3()
    atoms.rattle(0.2, seed=5)  # far from cubic: Z* differs from its transpose (~0.5 % of its largest element)
    atoms.calc = calculator
    born = calculator.get_property("born_effective_charges", atoms)
    # far above the 1e-5 tolerance below, so a transposed Z* would fail the comparison
    assert np.abs(born - born.transpose(0, 2, 1)).max() > 1e-3 * np.abs(born).max()
    modes = phonons.gamma_modes(phonons.model_force_constants(calculator, atoms), atoms.get_masses())
    charges = phonons.mode_effective_charges(born, modes["eigenvectors"], atoms.get_masses())
    step = 1e-4
    for mode in (5, 10, 14):
        pattern = modes["eigenvectors"][mode] / np.sqrt(atoms.get_masses())[:, None]
        dipoles = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions += sign * step * pattern
            moved.calc = calculator
            dipoles.append(calculator.get_property("dipole", moved))
        np.testing.assert_allclose(charges[mode], (dipoles[0] - dipoles[1]) / (2 * step),
                                   atol=1e-5 * np.abs(charges).max())


def test_modes_are_matched_by_their_patterns_not_their_order():
    masses = np.array([16.0, 28.0, 16.0])
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(9, 9))
    force_constants = (matrix @ matrix.T).reshape(3, 3, 3, 3)
    reference = phonons.gamma_modes(force_constants, masses, acoustic_sum_rule=False)
    # a slightly perturbed copy, listed in reverse order: each mode is found by its pattern
    perturbed = phonons.gamma_modes(force_constants + 1e-3 * rng.normal(size=(3, 3, 3, 3)), masses,
                                    acoustic_sum_rule=False)
    shuffled = np.array(perturbed["eigenvectors"])[::-1]
    index, overlap = phonons.match_modes(reference["eigenvectors"], shuffled)
    assert list(index) == list(range(8, -1, -1)) and np.all(overlap > 0.99)
    with pytest.raises(ValueError, match="different cells"):
        phonons.match_modes(reference["eigenvectors"], np.zeros((6, 2, 3)))
    # a degenerate pair in another basis: each partner alone overlaps by cos² and sin², the pair's subspace by 1
    pair = np.array(reference["eigenvectors"])
    angle = 0.6
    first, second = pair[3].copy(), pair[4].copy()
    pair[3], pair[4] = np.cos(angle) * first + np.sin(angle) * second, -np.sin(angle) * first + np.cos(angle) * second
    degenerate = np.array(reference["wavenumbers"])
    degenerate[4] = degenerate[3]
    _, alone = phonons.match_modes(reference["eigenvectors"], pair)
    _, together = phonons.match_modes(reference["eigenvectors"], pair, wavenumbers=degenerate)
    assert alone[3] == pytest.approx(np.cos(angle) ** 2) and together[3] == pytest.approx(1.0)
    assert together[4] == pytest.approx(1.0) and together[0] == pytest.approx(1.0)
