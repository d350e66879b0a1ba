"""Γ-point phonons of a periodic cell and their coupling to light: frequencies, mode effective charges, IR
intensities, oscillator strengths.

One set of pure functions serves both sources of force constants: ph.x's dynamical matrix at q = 0
(`polmodel.workflows.dfpt`) and the model's Hessian (`model_force_constants`, autograd through the model's
forces). Units: force constants eV/Å², masses amu, Born charges e with the project's index order
Z*[i, a, b] = ∂(ΩP_a)/∂R_ib = ∂F_ib/∂ε_a, frequencies in cm⁻¹ (negative numbers stand for imaginary ones),
mode effective charges e/√amu.
"""
import math

import numpy as np

from polmodel.data.units import (DEBYE_PER_ANGSTROM_SQUARED_PER_AMU_IN_KM_PER_MOL,
                                 E_SQUARED_IN_DEBYE_PER_ANGSTROM_SQUARED, EIGENVALUE_TO_WAVENUMBER,
                                 EPSILON0_E_PER_V_ANGSTROM)

# Squared overlap with the rigid translations above which a mode counts as acoustic.
ACOUSTIC_OVERLAP = 0.9


def impose_translation_invariance(force_constants):
    """Γ force constants (N, 3, N, 3) symmetrized and projected so that a rigid translation costs nothing.

    Φ' = P ½(Φ + Φᵀ) P with P the projector orthogonal to the three rigid translations: Σ_j Φ'_ij = 0 exactly
    and Φ' stays symmetric (a diagonal-only correction, dynmat.x's `asr='simple'`, gives up the symmetry).
    """
    force_constants = np.asarray(force_constants, dtype=float)
    num_atoms = force_constants.shape[0]
    if force_constants.shape != (num_atoms, 3, num_atoms, 3):
        raise ValueError(f"force constants must be (N, 3, N, 3), got {force_constants.shape}")
    matrix = force_constants.reshape(3 * num_atoms, 3 * num_atoms)
    matrix = 0.5 * (matrix + matrix.T)
    translations = np.kron(np.ones((num_atoms, 1)), np.eye(3)) / math.sqrt(num_atoms)  # (3N, 3), orthonormal
    projector = np.eye(3 * num_atoms) - translations @ translations.T
    return (projector @ matrix @ projector).reshape(num_atoms, 3, num_atoms, 3)


def born_charges_obeying_sum_rule(born_charges):
    """Z* (N, 3, 3) with the mean over atoms subtracted per component (the acoustic sum rule Σ_i Z*_i = 0)."""
    born_charges = np.asarray(born_charges, dtype=float)
    return born_charges - born_charges.mean(axis=0, keepdims=True)


def gamma_modes(force_constants, masses, *, acoustic_sum_rule=True):
    """Normal modes at Γ from force constants Φ[i, a, j, b] = ∂²E/∂R_ia∂R_jb (eV/Å²) and masses (amu).

    Returns a dict: `wavenumbers` (3N,) cm⁻¹ ascending (negative = imaginary), `eigenvalues` (3N,) ω² in
    eV/(Å²·amu), `eigenvectors` (3N, N, 3) orthonormal mass-weighted displacement patterns e_m[i, b], and
    `acoustic` (3N,) bool, the (up to) three modes closest to a rigid translation, where their overlap with the
    mass-weighted translations exceeds ACOUSTIC_OVERLAP (exactly 1 after `acoustic_sum_rule`).
    """
    masses = np.asarray(masses, dtype=float)
    num_atoms = len(masses)
    if np.any(masses <= 0):
        raise ValueError("masses must be positive")
    force_constants = np.asarray(force_constants, dtype=float)
    if force_constants.shape != (num_atoms, 3, num_atoms, 3):
        raise ValueError(f"force constants must be (N, 3, N, 3) for N = {num_atoms}, got {force_constants.shape}")
    if acoustic_sum_rule:
        force_constants = impose_translation_invariance(force_constants)
    inverse_sqrt_mass = np.repeat(masses ** -0.5, 3)
    dynamical = force_constants.reshape(3 * num_atoms, 3 * num_atoms) * np.outer(inverse_sqrt_mass, inverse_sqrt_mass)
    eigenvalues, vectors = np.linalg.eigh(0.5 * (dynamical + dynamical.T))
    # the three mass-weighted rigid translations: √M_i along each axis, normalized
    translations = np.kron(np.sqrt(masses)[:, None], np.eye(3))
    translations /= np.linalg.norm(translations, axis=0)
    overlap = np.sum((translations.T @ vectors) ** 2, axis=0)
    acoustic = np.zeros(3 * num_atoms, dtype=bool)
    most_translational = np.argsort(overlap)[-3:]
    # a pinned crystal (no translation invariance) has no acoustic modes: demand a near-rigid translation
    acoustic[most_translational[overlap[most_translational] > ACOUSTIC_OVERLAP]] = True
    return {
        "wavenumbers": np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * EIGENVALUE_TO_WAVENUMBER,
        "eigenvalues": eigenvalues,
        "eigenvectors": vectors.T.reshape(3 * num_atoms, num_atoms, 3),
        "acoustic": acoustic,
    }


def match_modes(reference_eigenvectors, eigenvectors, wavenumbers=None, degenerate_within=0.5):
    """For each reference mode, the mode of `eigenvectors` most like it: (indices (M,), overlaps (M,)), the
    overlap |⟨e_ref|e⟩|² of orthonormal mass-weighted patterns (M, N, 3), 1 for the same mode. Within a degenerate
    set any basis is as good as another, so with `wavenumbers` (of `eigenvectors`, cm⁻¹) the overlap is summed over
    the matched mode's degenerate partners (within `degenerate_within` cm⁻¹): 1 when the reference mode lies in
    their subspace. Both sets must come from the same structure and masses, atoms in the same order."""
    reference = np.asarray(reference_eigenvectors, dtype=float)
    other = np.asarray(eigenvectors, dtype=float)
    if reference.shape[1:] != other.shape[1:]:
        raise ValueError(f"eigenvectors of different cells: {reference.shape} and {other.shape}")
    overlap = np.einsum("mia,nia->mn", reference, other) ** 2
    index = overlap.argmax(axis=1)
    if wavenumbers is None:
        return index, overlap.max(axis=1)
    wavenumbers = np.asarray(wavenumbers, dtype=float)
    partners = np.abs(wavenumbers[index][:, None] - wavenumbers[None, :]) <= degenerate_within
    return index, np.sum(overlap * partners, axis=1)


def mode_effective_charges(born_charges, eigenvectors, masses):
    """Z̃_m[a] = Σ_ib Z*[i, a, b] e_m[i, b] / √M_i (e/√amu): the dipole each normal mode carries per unit of
    mass-weighted amplitude. born_charges (N, 3, 3) [i, a, b], eigenvectors (M, N, 3), masses (N,) amu."""
    born_charges = np.asarray(born_charges, dtype=float)
    masses = np.asarray(masses, dtype=float)
    return np.einsum("iab,mib->ma", born_charges, np.asarray(eigenvectors) / np.sqrt(masses)[None, :, None])


def ir_intensities(mode_charges):
    """IR intensity of each mode, |Z̃_m|², in (D/Å)²/amu (dynmat.x's unit) and km/mol."""
    squared = np.sum(np.asarray(mode_charges) ** 2, axis=-1) * E_SQUARED_IN_DEBYE_PER_ANGSTROM_SQUARED
    return {"debye2_per_angstrom2_amu": squared,
            "km_per_mol": squared * DEBYE_PER_ANGSTROM_SQUARED_PER_AMU_IN_KM_PER_MOL}


def static_dielectric_harmonic(epsilon_inf, mode_charges, eigenvalues, volume, *, polar=None):
    """ε0 = ε∞ + (1/(ε_vac Ω)) Σ_m S_m / ω_m², S_m[a, b] = Z̃_m[a] Z̃_m[b], over the modes in `polar` (bool mask,
    default every mode with ω² > 0). eigenvalues: ω² in eV/(Å²·amu); Ω Å³. Returns (3, 3)."""
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    mode_charges = np.asarray(mode_charges, dtype=float)
    if polar is None:
        polar = eigenvalues > 0
    polar = np.asarray(polar, dtype=bool)
    if np.any(eigenvalues[polar] <= 0):
        raise ValueError("an unstable mode (ω² ≤ 0) has no static response: relax the structure first")
    strengths = np.einsum("ma,mb->mab", mode_charges[polar], mode_charges[polar])
    ionic = np.sum(strengths / eigenvalues[polar][:, None, None], axis=0) / (EPSILON0_E_PER_V_ANGSTROM * volume)
    return as_dielectric_tensor(epsilon_inf) + ionic


def as_dielectric_tensor(value):
    """A scalar (isotropic), (3,) (principal values along x, y, z) or (3, 3) dielectric constant as (3, 3)."""
    value = np.asarray(value, dtype=float)
    if value.ndim == 0:
        return value * np.eye(3)
    if value.shape == (3,):
        return np.diag(value)
    if value.shape != (3, 3):
        raise ValueError(f"a dielectric tensor is a scalar, 3 principal values or (3, 3), got shape {value.shape}")
    return value


def model_force_constants(calculator, atoms):
    """Γ force constants Φ[i, a, j, b] = -∂F_jb/∂R_ia (eV/Å²) of a PolCalculator's model (the ensemble mean for
    an ensemble) at the calculator's field, by automatic differentiation of the model's forces.

    The cell is periodic with its images moving together, so Φ is the Γ-point sum over images.
    """
    # torch and the model's response only here: the rest of this module (ph.x's force constants) is numpy
    import torch

    from polmodel.data import keys
    from polmodel.data.graphs import atoms_to_graph
    from polmodel.nn.response import compute_response

    members = list(calculator.model.members) if calculator.is_ensemble else [calculator.model]
    data = atoms_to_graph(atoms, calculator.species, calculator.cutoff, efield=calculator.efield,
                          dtype=calculator.dtype)
    data = {key: value.to(calculator.device) if isinstance(value, torch.Tensor) else value
            for key, value in data.items()}
    num = 3 * len(atoms)
    total = np.zeros((num, num))
    for member in members:
        positions = data[keys.POSITIONS].detach().clone().requires_grad_(True)
        inputs = dict(data, **{keys.POSITIONS: positions})
        forces = compute_response(member, inputs, stress=False, training=True)[keys.FORCES].reshape(-1)
        rows = [torch.autograd.grad(forces[k], positions, retain_graph=k < num - 1)[0].reshape(-1)
                for k in range(num)]
        total -= torch.stack(rows).detach().cpu().double().numpy()
    hessian = total / len(members)  # [k, l] = -∂F_k/∂x_l
    return hessian.reshape(len(atoms), 3, len(atoms), 3)


def finite_difference_force_constants(atoms, calculator, displacement=1e-3):
    """Φ[i, a, j, b] = -(F_jb(R + δ e_ia) - F_jb(R - δ e_ia)) / 2δ from any ASE calculator's forces (eV/Å²)."""
    atoms = atoms.copy()
    atoms.calc = calculator
    reference = atoms.get_positions()
    num_atoms = len(atoms)
    result = np.zeros((num_atoms, 3, num_atoms, 3))
    for i in range(num_atoms):
        for a in range(3):
            forces = []
            for sign in (1.0, -1.0):
                moved = reference.copy()
                moved[i, a] += sign * displacement
                atoms.set_positions(moved)
                forces.append(atoms.get_forces())
            result[i, a] = -(forces[0] - forces[1]) / (2.0 * displacement)
    return result


def gamma_response(force_constants, masses, born_charges, epsilon_inf, volume, *, acoustic_sum_rule=True):
    """Γ modes, mode charges, IR intensities and the harmonic ε0 in one dict (the report of `polmodel analyze
    modes` and of the DFPT workchain). Z* has its acoustic sum rule imposed when `acoustic_sum_rule`;
    `epsilon_static` is None when an optical mode is unstable (ω² ≤ 0)."""
    modes = gamma_modes(force_constants, masses, acoustic_sum_rule=acoustic_sum_rule)
    born = born_charges_obeying_sum_rule(born_charges) if acoustic_sum_rule else np.asarray(born_charges, float)
    charges = mode_effective_charges(born, modes["eigenvectors"], masses)
    optical = ~modes["acoustic"]
    # an unstable optical mode has no static response: ε0 is then undefined (None), not a number
    epsilon_static = (static_dielectric_harmonic(epsilon_inf, charges, modes["eigenvalues"], volume, polar=optical)
                      if np.all(modes["eigenvalues"][optical] > 0) else None)
    return {**modes, "mode_charges": charges, "ir_intensities": ir_intensities(charges),
            "epsilon_inf": np.asarray(epsilon_inf, dtype=float), "epsilon_static": epsilon_static}
