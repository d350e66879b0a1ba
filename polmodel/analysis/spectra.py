"""Spectra and static response (docs/design.md "Spectra and static response"): ε∞ from α, the IR
absorption coefficient from an NVE dipole time series or from harmonic modes, and ε0 from dipole fluctuations,
from the mean response to a small static field, or harmonically (polmodel.analysis.phonons).

Absolute units. The IR result is the absorption coefficient times the refractive index, α(ω)n(ω), in cm⁻¹,
orientationally averaged (a powder / unpolarized value: one third of the trace):
  from MD      α n(ω) = ω (1 − e^{−βħω}) / (6 ħ ε_vac c V) · Q(ω) · C̃_cl(ω),  C̃(ω) = ∫ dt e^{iωt} ⟨δM(0)·δM(t)⟩,
               Q(ω) = βħω / (1 − e^{−βħω}), the harmonic quantum correction, applied once, to the classical
               correlation; the product is βω²/(6 ε_vac c V) · C̃_cl(ω), exact for a harmonic crystal;
  harmonic     ∫ α n dω = π |Z̃_m|² / (6 ε_vac c V) per mode (Z̃_m the mode effective charge), temperature
               independent, spread over a Lorentzian of chosen width.
The two agree for a harmonic crystal at any temperature (tests/test_spectra.py checks it on a charged harmonic
toy crystal run through `polmodel.dynamics.md.run_md`).

Internal units are ASE's (e·Å, Å³, fs, K, e/√amu); the conversion to SI happens in the two spectrum functions.
"""
import math

import numpy as np

from polmodel.analysis.phonons import as_dielectric_tensor
# ε∞ from α lives below the model (polmodel/data/dielectric.py, which nn.response uses too); it is part of this API
from polmodel.data.dielectric import dielectric_from_polarizability  # noqa: F401
from polmodel.data.units import AMU_KG as _AMU
from polmodel.data.units import BOLTZMANN_EV_PER_K, EPSILON0_E_PER_V_ANGSTROM, INVERSE_FS_IN_WAVENUMBER
from polmodel.data.units import BOLTZMANN_J_PER_K as _KB
from polmodel.data.units import E_ANGSTROM_IN_C_M as _E_ANGSTROM
from polmodel.data.units import ELEMENTARY_CHARGE_C as _E
from polmodel.data.units import HBAR_J_S as _HBAR
from polmodel.data.units import SPEED_OF_LIGHT_M_PER_S as _C
from polmodel.data.units import VACUUM_PERMITTIVITY_F_PER_M as _EPS0
QUANTUM_CORRECTION_STATEMENT = (
    "harmonic quantum correction Q = βħω/(1−exp(−βħω)) applied once, to the classical dipole correlation in "
    "α n = ω(1−exp(−βħω))/(6ħ ε_vac c V) · Q · C̃_cl (net: βω²/(6 ε_vac c V) · C̃_cl, exact for a harmonic crystal)"
)


# --- quantum correction ----------------------------------------------------------------------------------------
def harmonic_quantum_correction(wavenumber, temperature_K):
    """Q(ν̃) = x / (1 − e^{−x}), x = βħω = hcν̃/(k_B T); Q(0) = 1."""
    x = np.asarray(wavenumber, dtype=float) * 100.0 * 2.0 * math.pi * _C * _HBAR / (_KB * temperature_K)
    safe = np.where(x == 0.0, 1.0, x)
    return np.where(x == 0.0, 1.0, safe / -np.expm1(-safe))


# --- IR from MD ------------------------------------------------------------------------------------------------
def dipole_autocorrelation(dipoles):
    """C(τ) = ⟨δM(0)·δM(τ)⟩ (e·Å)², τ = 0..T−1 frames, with the mean removed, the three components summed and
    the unbiased normalization 1/(T − τ)."""
    from scipy import signal

    fluctuation = np.asarray(dipoles, dtype=float)
    fluctuation = fluctuation - fluctuation.mean(axis=0)
    count = len(fluctuation)
    total = np.zeros(count)
    for column in fluctuation.T:
        total += signal.correlate(column, column, mode="full", method="fft")[count - 1:]
    return total / np.arange(count, 0, -1)


def ir_absorption_from_dipoles(dipoles, timestep_fs, volume, temperature_K, *, window="hann",
                               max_lag_fraction=0.5, zero_padding=4):
    """IR absorption α(ν̃)n(ν̃) in cm⁻¹ from the cell dipole of an NVE run at zero field.

    dipoles (T, 3) e·Å, one sample every `timestep_fs` fs (the frame interval: ω²·FT M is exact up to the
    Nyquist wavenumber 1/(2 Δt c), unlike a finite-difference Ṁ, which attenuates a band at ν̃ by
    sinc²(2πcν̃Δt)); volume Å³; temperature_K the run's temperature (for NVE, its mean kinetic temperature).
    The correlation is cut at `max_lag_fraction` of the run, multiplied by the decaying half of `window` (a
    scipy.signal window name; the window keeps each band's integrated intensity) and zero padded.

    Returns a dict: wavenumber (cm⁻¹), absorption (cm⁻¹), quantum_correction (Q(ν̃) applied), nyquist_cm-1,
    resolution_cm-1 (the window's lag range), statement (how the correction entered).
    """
    from scipy import signal

    dipoles = np.asarray(dipoles, dtype=float)
    if dipoles.ndim != 2 or dipoles.shape[1] != 3 or dipoles.shape[0] < 8:
        raise ValueError(f"dipoles must be a (T, 3) series with T >= 8, got shape {dipoles.shape}")
    if not timestep_fs > 0:
        raise ValueError(f"timestep_fs must be positive, got {timestep_fs}")
    if not (volume > 0 and temperature_K > 0):
        raise ValueError(f"volume and temperature must be positive, got {volume}, {temperature_K}")
    if not 0 < max_lag_fraction <= 1:
        raise ValueError(f"max_lag_fraction must be in (0, 1], got {max_lag_fraction}")
    lags = max(int(len(dipoles) * max_lag_fraction), 4)
    try:
        taper = signal.get_window(window, 2 * lags, fftbins=False)[lags:]
    except ValueError as error:
        raise ValueError(f"unknown window {window!r}: {error}") from None
    correlation = dipole_autocorrelation(dipoles)[:lags] * taper
    length = zero_padding * 2 * lags
    # C(τ) is even: its transform is twice the one-sided cosine sum minus the τ = 0 term.
    timestep_s = timestep_fs * 1e-15
    transform = timestep_s * (2.0 * np.fft.rfft(correlation, n=length).real - correlation[0]) * _E_ANGSTROM ** 2
    frequency = np.fft.rfftfreq(length, d=timestep_fs)  # 1/fs
    omega = 2.0 * math.pi * frequency * 1e15            # rad/s
    wavenumber = frequency * INVERSE_FS_IN_WAVENUMBER
    x = _HBAR * omega / (_KB * temperature_K)
    correction = harmonic_quantum_correction(wavenumber, temperature_K)
    quantum_prefactor = omega * -np.expm1(-x) / (6.0 * _HBAR * _EPS0 * _C * volume * 1e-30)
    absorption = quantum_prefactor * correction * transform / 100.0  # 1/m → 1/cm
    return {"wavenumber": wavenumber, "absorption": absorption, "quantum_correction": correction,
            "nyquist_cm-1": 0.5 / timestep_fs * INVERSE_FS_IN_WAVENUMBER,
            "resolution_cm-1": INVERSE_FS_IN_WAVENUMBER / (lags * timestep_fs),
            "statement": QUANTUM_CORRECTION_STATEMENT}


# --- harmonic IR ---------------------------------------------------------------------------------------------
def harmonic_integrated_absorption(mode_charges, volume):
    """∫ α n dν̃ (cm⁻²) of each mode: |Z̃_m|² / (12 ε_vac c² V); mode_charges (M, 3) e/√amu, V Å³."""
    squared = np.sum(np.asarray(mode_charges, dtype=float) ** 2, axis=-1) * _E ** 2 / _AMU
    return squared / (12.0 * _EPS0 * _C ** 2 * volume * 1e-30) * 1e-4


def harmonic_ir_absorption(mode_wavenumbers, mode_charges, volume, wavenumber, *, fwhm=10.0):
    """α n(ν̃) (cm⁻¹) on the grid `wavenumber` (cm⁻¹): each mode's integrated absorption on a Lorentzian of
    full width `fwhm` cm⁻¹ (area-normalized in ν̃). Modes with ν̃ ≤ 0 are left out."""
    mode_wavenumbers = np.asarray(mode_wavenumbers, dtype=float)
    weights = harmonic_integrated_absorption(mode_charges, volume)
    wavenumber = np.asarray(wavenumber, dtype=float)
    half = 0.5 * fwhm
    result = np.zeros_like(wavenumber)
    for center, weight in zip(mode_wavenumbers, weights):
        if center > 0:
            result += weight * half / math.pi / ((wavenumber - center) ** 2 + half ** 2)
    return result


# --- static dielectric constant ------------------------------------------------------------------------------
def block_error(values, blocks):
    """Standard error of the mean of a correlated series (T, ...) from `blocks` contiguous block means."""
    values = np.asarray(values, dtype=float)
    if blocks < 2 or len(values) < blocks:
        raise ValueError(f"need at least 2 blocks and one sample per block, got {blocks} blocks, {len(values)} samples")
    means = np.array([chunk.mean(axis=0) for chunk in np.array_split(values, blocks)])
    return means.std(axis=0, ddof=1) / math.sqrt(blocks)


#: the blocking analysis stops where fewer block means than this remain (their spread is then too uncertain)
MIN_BLOCKS = 16


def blocked_mean_error(values):
    """The standard error of the mean of a correlated series (T, ...) from a blocking analysis (Flyvbjerg and
    Petersen): per component, the standard error of block means for block lengths 1, 2, 4, ... while at least
    MIN_BLOCKS blocks remain. It grows with the block length until blocks are longer than the correlation time,
    then stays level within its own uncertainty σ = error / √(2 (n − 1)). The plateau is the first block length
    whose error the next two do not exceed by more than their σ.

    Returns (error, plateau) per component: `plateau` False where the error still grows at the longest blocks,
    the error given is then the last (a lower bound: the run is too short for its correlation time)."""
    values = np.asarray(values, dtype=float)
    length = len(values)
    if length < 2 * MIN_BLOCKS:
        raise ValueError(f"need at least {2 * MIN_BLOCKS} samples for a blocking analysis, got {length}")
    flat = values.reshape(length, -1)
    errors, plateaus = np.empty(flat.shape[1]), np.zeros(flat.shape[1], dtype=bool)
    for column in range(flat.shape[1]):
        series, levels = flat[:, column], []
        while len(series) >= MIN_BLOCKS:
            count = len(series)
            error = float(series.std(ddof=1) / math.sqrt(count))
            levels.append((error, error / math.sqrt(2.0 * (count - 1))))
            series = 0.5 * (series[0:count - count % 2:2] + series[1:count - count % 2:2])
        errors[column], plateaus[column] = levels[-1][0], False
        for index in range(len(levels) - 2):
            error = levels[index][0]
            if all(later - error <= sigma for later, sigma in levels[index + 1:index + 3]):
                errors[column], plateaus[column] = error, True
                break
    shape = values.shape[1:]
    return errors.reshape(shape), plateaus.reshape(shape)


def static_dielectric_from_fluctuations(dipoles, volume, temperature_K, epsilon_inf=1.0, *, blocks=None):
    """ε0_ab = ε∞_ab + (⟨M_a M_b⟩ − ⟨M_a⟩⟨M_b⟩) / (ε_vac Ω k_B T) (tin-foil boundary), with its error.

    dipoles (T, 3) e·Å from a canonical run at zero field (continuous: the model's dipole is); volume Å³;
    temperature_K the thermostat's target; epsilon_inf scalar, (3,) diagonal or (3, 3). The error bar is the
    standard error of the mean of δM_a δM_b (δM about the whole run's mean) from a blocking analysis
    (`blocked_mean_error`, whose plateau flags say where the run is too short for one); with `blocks`, from that
    many contiguous block means instead (low whenever a block is not much longer than the correlation time).
    Returns (ε0 (3, 3), error (3, 3)); `blocked_mean_error(dipole_fluctuation_products(dipoles))` gives the flags.
    """
    dipoles = np.asarray(dipoles, dtype=float)
    if dipoles.ndim != 2 or dipoles.shape[1] != 3 or len(dipoles) < 2:
        raise ValueError(f"dipoles must be a (T, 3) series with T >= 2, got shape {dipoles.shape}")
    if not (volume > 0 and temperature_K > 0):
        raise ValueError(f"volume and temperature must be positive, got {volume}, {temperature_K}")
    products = dipole_fluctuation_products(dipoles)
    scale = EPSILON0_E_PER_V_ANGSTROM * volume * BOLTZMANN_EV_PER_K * temperature_K
    epsilon_static = as_dielectric_tensor(epsilon_inf) + products.mean(axis=0) / scale
    if blocks is not None:
        return epsilon_static, block_error(products, blocks) / scale
    return epsilon_static, blocked_mean_error(products)[0] / scale


def dipole_fluctuation_products(dipoles):
    """δM_a δM_b (T, 3, 3) with δM about the run's mean: the series whose mean is the fluctuation term of ε0."""
    fluctuation = np.asarray(dipoles, dtype=float) - np.mean(dipoles, axis=0)
    return np.einsum("ta,tb->tab", fluctuation, fluctuation)


def static_dielectric_from_field(dipoles_at_field, dipoles_at_zero_field, field, volume, *, blocks=None):
    """ε0 · ε̂ = ε̂ + ⟨ΔM⟩ / (ε_vac Ω |ε|): the column of ε0 along a small static field `field` (3,) V/Å, from
    the mean cell dipole (e·Å) of a run at that field and of one at zero field (same cell, same branch).
    Electronic and ionic response both sit in ⟨ΔM⟩. The errors of the two means come from a blocking analysis
    (`blocked_mean_error`), or from `blocks` block means. Returns (column (3,), error (3,))."""
    field = np.asarray(field, dtype=float)
    magnitude = float(np.linalg.norm(field))
    if magnitude == 0.0:
        raise ValueError("the field must be nonzero")
    at_field = np.asarray(dipoles_at_field, dtype=float)
    at_zero = np.asarray(dipoles_at_zero_field, dtype=float)
    scale = EPSILON0_E_PER_V_ANGSTROM * volume * magnitude
    change = at_field.mean(axis=0) - at_zero.mean(axis=0)
    mean_error = (lambda values: block_error(values, blocks)) if blocks else (
        lambda values: blocked_mean_error(values)[0])
    error = np.hypot(mean_error(at_field), mean_error(at_zero)) / scale
    return field / magnitude + change / scale, error
