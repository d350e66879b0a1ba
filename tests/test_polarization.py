"""Exact minimum image of dipole differences in skewed cells (docs/conventions.md "The polarization quantum")."""
import itertools

import numpy as np
import pytest
import torch

from polmodel.data.polarization import fold_dipole_difference, nearest_lattice_coefficients, reduce_lattice_basis


def hexagonal_quartz_quantum():
    """2·e·R_i of α-quartz (a = 4.916 Å, c = 5.405 Å, γ = 120°)."""
    a, c = 4.916, 5.405
    cell = np.array([[a, 0, 0], [-a / 2, a * np.sqrt(3) / 2, 0], [0, 0, c]])
    return 2.0 * cell


def rhombohedral_quantum(a=5.0, alpha_degrees=40.0):
    """2·e·R_i of a rhombohedral cell: three vectors of length a at pairwise angle alpha (a sharp one)."""
    cos_a, sin_a = np.cos(np.radians(alpha_degrees)), np.sin(np.radians(alpha_degrees))
    third_y = (cos_a - cos_a ** 2) / sin_a
    basis = np.array([[1.0, 0, 0], [cos_a, sin_a, 0], [cos_a, third_y, np.sqrt(1 - cos_a ** 2 - third_y ** 2)]])
    return 2.0 * a * basis


SKEWED = {"hexagonal": hexagonal_quartz_quantum(), "rhombohedral": rhombohedral_quantum()}


def brute_force_minimum_image(delta, quantum, reach=6):
    """The shortest delta - n @ quantum over every integer n in a box of ±reach (an independent oracle)."""
    candidates = np.array(list(itertools.product(range(-reach, reach + 1), repeat=3)), dtype=float)
    images = delta - candidates @ quantum
    return images[np.argmin(np.linalg.norm(images, axis=1))]


def rounding_fold(delta, quantum):
    """The previous fold: nearest integers in the quantum basis (Babai's rounding), not the minimum image."""
    fractional = np.linalg.solve(quantum.T, delta)
    return delta - np.round(fractional) @ quantum


@pytest.mark.parametrize("name", sorted(SKEWED))
def test_any_integer_combination_of_quanta_folds_back_exactly(name):
    quantum = SKEWED[name]
    rng = np.random.default_rng(4)
    for _ in range(40):
        delta = rng.uniform(-0.5, 0.5, 3) @ quantum
        folded = fold_dipole_difference(delta, quantum)
        np.testing.assert_allclose(np.linalg.norm(folded), np.linalg.norm(brute_force_minimum_image(delta, quantum)),
                                   rtol=1e-12)
        for shift in rng.integers(-7, 8, size=(5, 3)):
            np.testing.assert_allclose(fold_dipole_difference(delta + shift @ quantum, quantum), folded, atol=1e-9)
        # small differences (the ±ε dipoles of one structure) are their own minimum image
        small = 0.05 * rng.standard_normal(3)
        np.testing.assert_allclose(fold_dipole_difference(small, quantum), small, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SKEWED))
def test_rounding_in_the_skewed_basis_fails_where_the_exact_fold_does_not(name):
    quantum = SKEWED[name]
    rng = np.random.default_rng(7)
    deltas = rng.uniform(-0.5, 0.5, size=(400, 3)) @ quantum
    rounding_wrong = 0
    for delta in deltas:
        true_image = brute_force_minimum_image(delta, quantum)
        rounded = rounding_fold(delta, quantum)
        if np.linalg.norm(rounded) > np.linalg.norm(true_image) + 1e-9:
            rounding_wrong += 1
            np.testing.assert_allclose(fold_dipole_difference(delta, quantum), true_image, atol=1e-9)
    # the case the test is about exists in this cell (α-quartz: about one random difference in five)
    assert rounding_wrong >= 20


def test_constructed_hexagonal_case():
    """In the 120° basis, fractional (0.4, 0.6, 0) rounds to n = (0, 1, 0), leaving 0.4·q1 − 0.4·q2 of length
    0.4·√3·|q| ≈ 0.69·|q|; the difference itself (n = 0) is shorter, √(0.1² + 0.27) ≈ 0.53·|q|."""
    quantum = hexagonal_quartz_quantum()
    delta = np.array([0.4, 0.6, 0.0]) @ quantum
    rounded = rounding_fold(delta, quantum)
    np.testing.assert_allclose(rounded, np.array([0.4, -0.4, 0.0]) @ quantum, atol=1e-12)
    exact = fold_dipole_difference(delta, quantum)
    np.testing.assert_allclose(exact, delta, atol=1e-12)
    np.testing.assert_allclose(exact, brute_force_minimum_image(delta, quantum), atol=1e-12)
    assert np.linalg.norm(exact) < 0.8 * np.linalg.norm(rounded)


def test_reduction_keeps_the_lattice():
    for quantum in (*SKEWED.values(), np.array([[1.0, 0, 0], [7.0, 1, 0], [3.0, 5, 1]])):
        reduced, transform = reduce_lattice_basis(quantum)
        np.testing.assert_allclose(reduced, transform @ quantum, atol=1e-12)
        assert round(abs(np.linalg.det(transform))) == 1
        assert np.all(np.linalg.norm(reduced, axis=1) <= np.linalg.norm(quantum, axis=1).max() + 1e-9)


def test_batched_numpy_and_torch_agree_with_per_row_folds():
    rng = np.random.default_rng(2)
    quanta = np.stack([SKEWED["hexagonal"], SKEWED["rhombohedral"], 3.0 * np.eye(3)])
    deltas = rng.uniform(-3, 3, size=(3, 3)) @ quanta[0]
    expected = np.array([fold_dipole_difference(d, q) for d, q in zip(deltas, quanta)])
    np.testing.assert_allclose(fold_dipole_difference(deltas, quanta), expected, atol=1e-12)
    delta_torch = torch.tensor(deltas, requires_grad=True)
    folded = fold_dipole_difference(delta_torch, torch.tensor(quanta))
    np.testing.assert_allclose(folded.detach().numpy(), expected, atol=1e-12)
    folded.sum().backward()
    np.testing.assert_allclose(delta_torch.grad.numpy(), np.ones((3, 3)))
    integers = nearest_lattice_coefficients(deltas, quanta)
    np.testing.assert_allclose(integers, np.round(integers))
