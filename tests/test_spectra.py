"""Spectra and static response on a charged harmonic crystal whose answers are known in closed form
(tests/harmonic_crystal.py), sampled as real runs are: `run_md` NVE at 1 fs, a frame every 10 fs."""
import json
import math

import numpy as np
import pytest

from harmonic_crystal import equipartition_momenta, harmonic_crystal
from polmodel.analysis import phonons, spectra
from polmodel.data.units import EPSILON0_E_PER_V_ANGSTROM
from polmodel.dynamics.fields import StaticField
from polmodel.dynamics.md import MDSettings, read_trajectory, run_md

MASSES, CHARGES, SPRING, CELL = (4.5, 27.0), (1.5, -1.5), 20.0, 6.0
TEMPERATURE = 300.0
EPS0_SI, C_SI, E_SI, AMU_SI = 8.8541878128e-12, 2.99792458e8, 1.602176634e-19, 1.66053906660e-27
# ω = √(k/m): 1 eV/(Å² amu) is (521.47 cm⁻¹)²
LINES = [math.sqrt(SPRING / mass) * 521.4709 for mass in MASSES]


def line_integral_cm2(charge, mass, volume):
    """∫ α n dν̃ of one atom's three modes: π q²/(2 ε_vac c V m) per dω, divided by 2πc for dν̃ (cm⁻²)."""
    per_omega = math.pi * (charge * E_SI) ** 2 / (2 * EPS0_SI * C_SI * volume * 1e-30 * mass * AMU_SI)  # 1/(m s)
    return per_omega / (2 * math.pi * C_SI) * 1e-4


@pytest.fixture(scope="module")
def nve_run(tmp_path_factory):
    atoms, calculator = harmonic_crystal(MASSES, CHARGES, SPRING, CELL)
    atoms.set_momenta(equipartition_momenta(atoms, TEMPERATURE))
    path = tmp_path_factory.mktemp("nve") / "nve.xyz"
    run_md(atoms, calculator, StaticField((0.0, 0.0, 0.0)),
           MDSettings(steps=10000, timestep_fs=1.0, thermostat="nve", interval=10), trajectory_path=path,
           progress=False)
    return path, read_trajectory(path)


def test_nve_ir_lines_sit_where_and_as_strong_as_the_oscillators_say(nve_run):
    """Both lines at √(k/m) with the analytic integrated absorption; the 1,100 cm⁻¹ line from frames 10 fs apart
    is not attenuated (a finite-difference Ṁ would keep sinc² ≈ 0.2 of it), and the quantum correction enters
    once (twice would multiply the 1,100 cm⁻¹ line by Q ≈ 5.3, never would divide it by 5.3)."""
    _, frames = nve_run
    dipoles = np.array([frame.info["dipole"] for frame in frames])
    temperature = np.mean([frame.info["temperature"] for frame in frames])
    assert temperature == pytest.approx(TEMPERATURE, rel=0.01)
    volume = CELL ** 3
    result = spectra.ir_absorption_from_dipoles(dipoles, 10.0, volume, temperature)
    wavenumber, absorption = result["wavenumber"], result["absorption"]
    assert result["nyquist_cm-1"] == pytest.approx(1667.8, abs=0.1)
    for line, charge, mass in zip(LINES, CHARGES, MASSES):
        near = np.abs(wavenumber - line) < 60.0
        assert wavenumber[near][np.argmax(absorption[near])] == pytest.approx(line, abs=3.0)
        integral = np.trapezoid(absorption[near], wavenumber[near])
        assert integral == pytest.approx(line_integral_cm2(charge, mass, volume), rel=0.03)
    assert LINES[0] == pytest.approx(1099.4, abs=0.5)
    assert spectra.harmonic_quantum_correction(LINES[0], TEMPERATURE) == pytest.approx(5.28, abs=0.02)


def test_harmonic_spectrum_of_the_same_crystal_matches_md(nve_run):
    """The Hessian route (phonons + harmonic spectrum) gives the same lines and strengths as the MD route."""
    atoms, _ = harmonic_crystal(MASSES, CHARGES, SPRING, CELL)
    force_constants = SPRING * np.einsum("ij,ab->iajb", np.eye(2), np.eye(3))
    born = np.array([q * np.eye(3) for q in CHARGES])
    result = phonons.gamma_response(force_constants, atoms.get_masses(), born, 1.0, CELL ** 3,
                                    acoustic_sum_rule=False)
    np.testing.assert_allclose(np.sort(result["wavenumbers"]), np.repeat(sorted(LINES), 3), rtol=1e-5)
    integrated = spectra.harmonic_integrated_absorption(result["mode_charges"], CELL ** 3)
    for line, charge, mass in zip(LINES, CHARGES, MASSES):
        at_line = np.isclose(result["wavenumbers"], line, rtol=1e-4)
        assert integrated[at_line].sum() == pytest.approx(line_integral_cm2(charge, mass, CELL ** 3), rel=1e-4)
    grid = np.linspace(0, 3000, 30001)
    broadened = spectra.harmonic_ir_absorption(result["wavenumbers"], result["mode_charges"], CELL ** 3, grid,
                                               fwhm=5.0)
    assert np.trapezoid(broadened, grid) == pytest.approx(integrated.sum(), rel=0.01)  # Lorentz tails beyond 3000
    # ε0 − ε∞ = Σ q² / (ε_vac V k)
    expected = 1.0 + sum(q * q for q in CHARGES) / (EPSILON0_E_PER_V_ANGSTROM * CELL ** 3 * SPRING)
    np.testing.assert_allclose(result["epsilon_static"], expected * np.eye(3), rtol=1e-10)


def test_static_dielectric_from_md_fluctuations(nve_run):
    """ε0 − ε∞ = Σ q²/(ε_vac V k) from the NVE run's dipole fluctuations at its temperature, with an error bar
    that covers the deviation."""
    _, frames = nve_run
    dipoles = np.array([frame.info["dipole"] for frame in frames])
    expected = 1.0 + sum(q * q for q in CHARGES) / (EPSILON0_E_PER_V_ANGSTROM * CELL ** 3 * SPRING)
    epsilon, error = spectra.static_dielectric_from_fluctuations(dipoles, CELL ** 3, TEMPERATURE, 1.0, blocks=8)
    np.testing.assert_allclose(np.diag(epsilon), expected, rtol=0.02)
    assert np.all(np.diag(error) > 0) and np.all(np.diag(error) < 0.05 * expected)
    assert np.all(np.abs(np.diag(epsilon) - expected) < 4 * np.diag(error) + 1e-3 * expected)


def test_static_dielectric_from_a_small_static_field(tmp_path):
    """ε0 = 1 + ⟨ΔM⟩/(ε_vac V ε) along the field, from two NVE runs at 0 and at 0.01 V/Å."""
    means = {}
    for magnitude in (0.0, 0.01):
        atoms, calculator = harmonic_crystal(MASSES, CHARGES, SPRING, CELL)
        atoms.set_momenta(equipartition_momenta(atoms, TEMPERATURE, seed=1))
        path = tmp_path / f"field{magnitude}.xyz"
        run_md(atoms, calculator, StaticField((0.0, 0.0, magnitude)),
               MDSettings(steps=3000, timestep_fs=1.0, thermostat="nve", interval=10), trajectory_path=path,
               progress=False)
        means[magnitude] = np.array([frame.info["dipole"] for frame in read_trajectory(path)])
    column, error = spectra.static_dielectric_from_field(means[0.01], means[0.0], (0, 0, 0.01), CELL ** 3, blocks=4)
    expected = 1.0 + sum(q * q for q in CHARGES) / (EPSILON0_E_PER_V_ANGSTROM * CELL ** 3 * SPRING)
    assert column[2] == pytest.approx(expected, rel=0.02)
    assert abs(column[0]) < 0.1 and abs(column[1]) < 0.1


def test_quantum_correction_limits():
    assert spectra.harmonic_quantum_correction(0.0, 300.0) == 1.0
    x = 2000.0 / 208.5103  # hcν̃/k_BT at 300 K
    assert spectra.harmonic_quantum_correction(2000.0, 300.0) == pytest.approx(x / (1 - math.exp(-x)), rel=1e-4)
    assert spectra.harmonic_quantum_correction(1.0, 300.0) == pytest.approx(1.0, abs=3e-3)


def test_dielectric_from_polarizability_numpy_and_torch():
    import torch

    alpha = np.diag([1.0, 2.0, 3.0])
    expected = np.diag([1 + k / (EPSILON0_E_PER_V_ANGSTROM * 64.0) for k in (1.0, 2.0, 3.0)])
    np.testing.assert_allclose(spectra.dielectric_from_polarizability(alpha, 64.0), expected)
    batch = torch.tensor(np.stack([alpha, 2 * alpha]))
    result = spectra.dielectric_from_polarizability(batch, torch.tensor([64.0, 128.0]).view(-1, 1, 1))
    np.testing.assert_allclose(result.numpy(), np.stack([expected, expected]))
    with pytest.raises(ValueError):
        spectra.dielectric_from_polarizability(alpha, -1.0)


def test_ir_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        spectra.ir_absorption_from_dipoles(np.zeros((100, 2)), 1.0, 10.0, 300.0)
    with pytest.raises(ValueError, match="timestep"):
        spectra.ir_absorption_from_dipoles(np.zeros((100, 3)), 0.0, 10.0, 300.0)
    with pytest.raises(ValueError, match="window"):
        spectra.ir_absorption_from_dipoles(np.zeros((100, 3)), 1.0, 10.0, 300.0, window="no-such-window")


def test_cli_ir_and_dielectric_on_the_nve_run(nve_run, tmp_path):
    from polmodel.cli import main

    path, _ = nve_run
    assert main(["analyze", "ir", str(path), "--output", str(tmp_path / "ir")]) == 0
    report = json.loads((tmp_path / "ir.json").read_text())
    assert "applied once" in report["quantum_correction"]
    assert sorted(round(peak) for peak in report["peaks_cm-1"][:2]) == pytest.approx(sorted(LINES), abs=3)
    expected = sum(line_integral_cm2(q, m, CELL ** 3) for q, m in zip(CHARGES, MASSES))
    assert report["integrated_absorption_cm-2"] == pytest.approx(expected, rel=0.03)
    assert (tmp_path / "ir.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["analyze", "dielectric", str(path), "--output", str(tmp_path / "eps")]) == 0
    report = json.loads((tmp_path / "eps.json").read_text())
    expected = 1.0 + sum(q * q for q in CHARGES) / (EPSILON0_E_PER_V_ANGSTROM * CELL ** 3 * SPRING)
    assert report["epsilon_static_isotropic"] == pytest.approx(expected, rel=0.02)
    assert report["epsilon_static_isotropic_error"] > 0


def ar1_series(phi, length, replicas, seed=0):
    """`replicas` independent stationary AR(1) series x_t = φ x_{t-1} + η_t with unit-variance x (columns)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((length, replicas)) * np.sqrt(1.0 - phi * phi)
    series = np.empty((length, replicas))
    series[0] = rng.standard_normal(replicas)
    for t in range(1, length):
        series[t] = phi * series[t - 1] + noise[t]
    return series


def test_blocking_finds_the_ar1_variance_of_the_mean_or_says_the_run_is_too_short():
    """AR(1) series with a known variance of the mean, (1/T)(1 + 2 Σ_t (1 − t/T) φ^t), 400 independent runs each:
    - φ = 0.9 (τ_int 9.5 samples), 16,384 samples: the blocking analysis reaches its plateau (in ≥ 90 % of the runs)
      and its variance of the mean, averaged over the runs, is within 6 % of the exact one;
    - φ = 0.99 (τ_int 99.5), 4,000 samples: no plateau (the run is 40 τ_int), which it says for ≥ 95 % of the runs;
      eight blocks (the old error bar) are then low by ~17 %, and nothing said so."""
    for phi, length, replicas in ((0.9, 16_384, 400), (0.99, 4000, 400)):
        series = ar1_series(phi, length, replicas)
        lags = np.arange(1, length)
        exact = (1.0 + 2.0 * np.sum((1.0 - lags / length) * phi ** lags)) / length     # Var(mean), exactly
        assert np.var(series.mean(axis=0)) == pytest.approx(exact, rel=0.25)   # the replicas agree with it
        errors, plateaus = spectra.blocked_mean_error(series)                  # one component per run
        if phi == 0.9:
            assert plateaus.mean() >= 0.9
            assert np.mean(errors ** 2) == pytest.approx(exact, rel=0.06)
        else:
            assert plateaus.mean() <= 0.05
            old = np.mean([float(spectra.block_error(column, 8)) ** 2 for column in series.T])
            assert old < 0.9 * exact
