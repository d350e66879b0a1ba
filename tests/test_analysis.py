"""Analysis on synthetic signals with known answers: IR peaks, coercive field, static dielectric constant."""
import numpy as np
import pytest
from ase import units as ase_units

from polmodel import analysis
from polmodel.units import EPSILON0_E_PER_V_ANGSTROM


@pytest.mark.parametrize("use_derivative", [True, False])
def test_ir_spectrum_recovers_known_frequencies(use_derivative):
    timestep = 1.0  # fs
    time = np.arange(8000) * timestep
    wavenumbers = (350.0, 720.0)
    frequencies = [w / analysis.INVERSE_FS_IN_WAVENUMBER for w in wavenumbers]  # 1/fs
    rng = np.random.default_rng(0)
    dipoles = np.zeros((len(time), 3))
    dipoles[:, 0] = np.cos(2 * np.pi * frequencies[0] * time + 0.3)
    dipoles[:, 2] = 0.7 * np.cos(2 * np.pi * frequencies[1] * time + 1.1)
    dipoles += 0.01 * rng.standard_normal(dipoles.shape)
    wavenumber, intensity = analysis.ir_spectrum(dipoles, timestep, use_derivative=use_derivative)
    bin_width = wavenumber[1] - wavenumber[0]
    peaks = analysis.spectrum_peaks(wavenumber, intensity, prominence=0.1)
    assert len(peaks) == 2
    for expected in wavenumbers:
        assert np.min(np.abs(peaks - expected)) <= bin_width
    # the dipole-derivative spectrum weighs the higher mode by ω²: 0.7² (720/350)² > 1
    assert abs(peaks[0] - 720.0) <= bin_width
    assert intensity.max() == pytest.approx(1.0)


def test_ir_spectrum_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        analysis.ir_spectrum(np.zeros((100, 2)), 1.0)
    with pytest.raises(ValueError, match="timestep"):
        analysis.ir_spectrum(np.zeros((100, 3)), 0.0)


def test_static_dielectric_recovers_known_fluctuations():
    volume, temperature = 512.0, 300.0
    kT = ase_units.kB * temperature
    target_ionic = np.array([[40.0, 5.0, 0.0], [5.0, 30.0, 0.0], [0.0, 0.0, 80.0]])
    covariance = target_ionic * EPSILON0_E_PER_V_ANGSTROM * volume * kT
    rng = np.random.default_rng(1)
    dipoles = rng.multivariate_normal([0.3, -1.0, 2.0], covariance, size=400_000)
    epsilon_inf = 6.0 * np.eye(3)
    result = analysis.static_dielectric_from_fluctuations(dipoles, volume, temperature, epsilon_inf)
    np.testing.assert_allclose(result, epsilon_inf + target_ionic, atol=1.0)
    # a scalar ε∞ is the isotropic tensor
    np.testing.assert_allclose(analysis.static_dielectric_from_fluctuations(dipoles, volume, temperature, 6.0),
                               result)


def test_dielectric_from_polarizability():
    alpha = np.diag([1.0, 2.0, 3.0])
    volume = 64.0
    expected = np.eye(3) + alpha / (EPSILON0_E_PER_V_ANGSTROM * volume)
    np.testing.assert_allclose(analysis.dielectric_from_polarizability(alpha, volume), expected)
    with pytest.raises(ValueError):
        analysis.dielectric_from_polarizability(alpha, -1.0)


def synthetic_loop(coercive, saturation=0.3, amplitude=0.05, width=0.004, cycles=3, samples=1200):
    time = np.linspace(0.0, cycles, samples * cycles, endpoint=False)
    field_x = amplitude * np.cos(2 * np.pi * time)
    rising = np.gradient(field_x) > 0
    shift = np.where(rising, coercive, -coercive)
    polarization_x = saturation * np.tanh((field_x - shift) / width)
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    return np.outer(field_x, axis), np.outer(polarization_x, axis), saturation * np.tanh(coercive / width)


@pytest.mark.parametrize("coercive", [0.01, 0.025])
def test_hysteresis_recovers_coercive_field(coercive):
    fields, polarizations, remanent = synthetic_loop(coercive)
    loop = analysis.hysteresis_loop(fields, polarizations)
    assert loop["coercive_field_rising"] == pytest.approx(coercive, abs=2e-4)
    assert loop["coercive_field_falling"] == pytest.approx(-coercive, abs=2e-4)
    assert loop["coercive_field"] == pytest.approx(coercive, abs=2e-4)
    assert loop["remanent_polarization"] == pytest.approx(remanent, rel=1e-2)
    np.testing.assert_allclose(np.abs(loop["axis"]), [2 ** -0.5, 2 ** -0.5, 0], atol=1e-12)


def test_hysteresis_without_loop_has_zero_coercive_field():
    """A linear dielectric (P ∝ E, no hysteresis) has no coercive field."""
    time = np.linspace(0, 2, 800, endpoint=False)
    field = np.zeros((800, 3))
    field[:, 2] = 0.05 * np.cos(2 * np.pi * time)
    loop = analysis.hysteresis_loop(field, 2.0 * field)
    assert loop["coercive_field"] == pytest.approx(0.0, abs=1e-6)


def test_plots_are_written(tmp_path):
    fields, polarizations, _ = synthetic_loop(0.01)
    loop = analysis.hysteresis_loop(fields, polarizations)
    analysis.plot_hysteresis(loop, tmp_path / "loop.png")
    wavenumber = np.linspace(0, 1000, 50)
    analysis.plot_ir_spectrum(wavenumber, np.exp(-((wavenumber - 500) / 30) ** 2), tmp_path / "ir.png")
    for name in ("loop.png", "ir.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
