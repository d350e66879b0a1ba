"""Observables from MD under field: IR spectrum, dielectric constants, P–E hysteresis.

Units (ASE's, as everywhere in the project): dipole e·Å, polarization e/Å², field V/Å, volume Å³, time fs,
temperature K, k_B T in eV. Spectra are reported against wavenumber in cm⁻¹. Plots convert to the customary
µC/cm² and MV/cm (1 V/Å = 100 MV/cm).
"""
import numpy as np
from ase import units as ase_units
from scipy import signal

from polmodel.units import E_PER_ANGSTROM2_IN_UC_PER_CM2, EPSILON0_E_PER_V_ANGSTROM

# 1/fs -> cm⁻¹: ν̃ = f / c, with f = 1e15 Hz per 1/fs and c = 2.99792458e10 cm/s.
INVERSE_FS_IN_WAVENUMBER = 1.0e15 / 2.99792458e10
V_PER_ANGSTROM_IN_MV_PER_CM = 100.0


# --- IR spectrum ---------------------------------------------------------------------------------------------
def autocorrelation(series):
    """Unbiased autocorrelation C(τ) = <x(t)·x(t+τ)> of an (T,) or (T, k) series for τ = 0..T-1 (sum over k)."""
    series = np.asarray(series, dtype=float)
    if series.ndim == 1:
        series = series[:, None]
    count = series.shape[0]
    total = np.zeros(count)
    for column in series.T:
        total += signal.correlate(column, column, mode="full", method="fft")[count - 1:]
    return total / np.arange(count, 0, -1)


def ir_spectrum(dipoles, timestep_fs, *, window="hann", max_lag_fraction=0.5, zero_padding=4,
                use_derivative=True):
    """Classical IR absorption line shape from a dipole time series.

    I(ν̃) ∝ ∫ <Ṁ(0)·Ṁ(t)> w(t) cos(2πνt) dt, with Ṁ from central differences (or, with use_derivative=False,
    ω² times the transform of the dipole autocorrelation, which is the same in the continuum limit).
    The autocorrelation is cut at `max_lag_fraction` of the run (the statistics of longer lags are poor),
    multiplied by the decaying half of `window` (any scipy.signal window name) and zero padded.

    dipoles: (T, 3) e·Å sampled every `timestep_fs` fs. Returns (wavenumber cm⁻¹, intensity normalized to a
    maximum of 1).
    """
    dipoles = np.asarray(dipoles, dtype=float)
    if dipoles.ndim != 2 or dipoles.shape[1] != 3 or dipoles.shape[0] < 8:
        raise ValueError(f"dipoles must be a (T, 3) series with T >= 8, got shape {dipoles.shape}")
    if not timestep_fs > 0:
        raise ValueError(f"timestep_fs must be positive, got {timestep_fs}")
    series = np.gradient(dipoles, timestep_fs, axis=0) if use_derivative else dipoles - dipoles.mean(axis=0)
    correlation = autocorrelation(series)
    lags = max(int(len(correlation) * max_lag_fraction), 4)
    correlation = correlation[:lags] * signal.get_window(window, 2 * lags, fftbins=False)[lags:]
    length = zero_padding * 2 * lags
    # The autocorrelation is even in time: its cosine transform is the real part of the rFFT of the
    # symmetric extension, which doubling the one-sided sum (minus the τ = 0 term) gives.
    spectrum = 2.0 * np.fft.rfft(correlation, n=length).real - correlation[0]
    frequency = np.fft.rfftfreq(length, d=timestep_fs)  # 1/fs
    if not use_derivative:
        spectrum = spectrum * (2.0 * np.pi * frequency) ** 2
    spectrum = np.clip(spectrum, 0.0, None)
    peak = spectrum.max()
    if peak > 0:
        spectrum = spectrum / peak
    return frequency * INVERSE_FS_IN_WAVENUMBER, spectrum


def spectrum_peaks(wavenumber, intensity, *, prominence=0.05, min_wavenumber=1.0):
    """Wavenumbers (cm⁻¹) of the spectrum's peaks, strongest first."""
    indices, properties = signal.find_peaks(intensity, prominence=prominence)
    keep = wavenumber[indices] >= min_wavenumber
    indices, prominences = indices[keep], properties["prominences"][keep]
    order = np.argsort(prominences)[::-1]
    return wavenumber[indices[order]]


# --- dielectric constants ------------------------------------------------------------------------------------
def dielectric_from_polarizability(polarizability, volume):
    """ε∞ = 1 + α/(ε0 Ω): α (3,3) e·Å²/V, Ω Å³."""
    polarizability = np.asarray(polarizability, dtype=float)
    if polarizability.shape[-2:] != (3, 3):
        raise ValueError(f"polarizability must be (..., 3, 3), got {polarizability.shape}")
    if not volume > 0:
        raise ValueError(f"volume must be positive, got {volume}")
    return np.eye(3) + polarizability / (EPSILON0_E_PER_V_ANGSTROM * volume)


def static_dielectric_from_fluctuations(dipoles, volume, temperature_K, epsilon_inf=None):
    """Static dielectric tensor from cell-dipole fluctuations (conducting, "tin-foil" boundary conditions):

        ε0[a,b] = ε∞[a,b] + (<M_a M_b> - <M_a><M_b>) / (ε_vac Ω k_B T)

    M (T,3) e·Å, Ω Å³, ε_vac = 5.526e-3 e/(V·Å), k_B T in eV: e²Å²/(e/(V·Å)·Å³·eV) = 1. The dipole series
    must be continuous (the model's dipole is; a Berry-phase series must be unwrapped first).
    `epsilon_inf`: scalar or (3,3), default 1 (vacuum: then the result is the ionic + vacuum part only).
    Returns the (3,3) tensor.
    """
    dipoles = np.asarray(dipoles, dtype=float)
    if dipoles.ndim != 2 or dipoles.shape[1] != 3 or len(dipoles) < 2:
        raise ValueError(f"dipoles must be a (T, 3) series with T >= 2, got shape {dipoles.shape}")
    if not volume > 0 or not temperature_K > 0:
        raise ValueError(f"volume and temperature must be positive, got {volume}, {temperature_K}")
    covariance = np.cov(dipoles, rowvar=False, bias=True)
    kT = ase_units.kB * temperature_K
    base = np.asarray(1.0 if epsilon_inf is None else epsilon_inf, dtype=float)
    if base.ndim == 0:
        base = base * np.eye(3)
    if base.shape != (3, 3):
        raise ValueError(f"epsilon_inf must be a scalar or (3, 3), got shape {base.shape}")
    return base + covariance / (EPSILON0_E_PER_V_ANGSTROM * volume * kT)


# --- hysteresis ----------------------------------------------------------------------------------------------
def _zero_crossings(x, y):
    """x values where y changes sign, by linear interpolation between neighbouring samples."""
    crossings = []
    for k in range(len(y) - 1):
        y0, y1 = y[k], y[k + 1]
        if y0 == 0.0:
            crossings.append(x[k])
        elif y0 * y1 < 0.0:
            crossings.append(x[k] - y0 * (x[k + 1] - x[k]) / (y1 - y0))
    return np.array(crossings)


def hysteresis_loop(fields, polarizations, axis=None):
    """Project the field and polarization series on the field axis and find the loop's landmarks.

    fields (T,3) V/Å, polarizations (T,3) e/Å², in time order. The axis defaults to the principal direction of
    the field series. The loop is split into the rising-field and falling-field branches (sign of dε/dt); on each
    the coercive field is where P crosses zero and the remanent polarization where ε crosses zero (linear
    interpolation, averaged over cycles). Returns a dict:
      axis, field (T,), polarization (T,) projected; coercive_field_rising / _falling (V/Å),
      coercive_field = (rising - falling)/2; remanent_polarization_rising / _falling (e/Å²) and their half
      difference `remanent_polarization`; NaN where a branch never crosses.
    """
    fields = np.asarray(fields, dtype=float)
    polarizations = np.asarray(polarizations, dtype=float)
    if fields.shape != polarizations.shape or fields.ndim != 2 or fields.shape[1] != 3 or len(fields) < 4:
        raise ValueError("fields and polarizations must both be (T, 3) series with T >= 4, got "
                         f"{fields.shape} and {polarizations.shape}")
    if axis is None:
        _, _, vt = np.linalg.svd(fields, full_matrices=False)
        axis = vt[0]
        if axis[np.argmax(np.abs(axis))] < 0:
            axis = -axis
    axis = np.asarray(axis, dtype=float)
    if np.linalg.norm(axis) == 0:
        raise ValueError("the field series is zero: there is no loop to analyse")
    axis = axis / np.linalg.norm(axis)
    field = fields @ axis
    polarization = polarizations @ axis
    rate = np.gradient(field)

    result = {"axis": axis.tolist(), "field": field, "polarization": polarization}
    for name, mask in (("rising", rate > 0), ("falling", rate < 0)):
        coercive, remanent = [], []
        # contiguous segments of one branch
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start < 2:
                continue
            segment_field, segment_polarization = field[start:stop], polarization[start:stop]
            coercive.extend(_zero_crossings(segment_field, segment_polarization))
            remanent.extend(_zero_crossings(segment_polarization, segment_field))
        result[f"coercive_field_{name}"] = float(np.mean(coercive)) if coercive else float("nan")
        result[f"remanent_polarization_{name}"] = float(np.mean(remanent)) if remanent else float("nan")
    result["coercive_field"] = 0.5 * (result["coercive_field_rising"] - result["coercive_field_falling"])
    result["remanent_polarization"] = 0.5 * (result["remanent_polarization_falling"]
                                             - result["remanent_polarization_rising"])
    return result


# --- trajectory helpers --------------------------------------------------------------------------------------
def trajectory_series(frames, key):
    """(T, ...) array of `frames[i].info[key]`; a clear error if a frame lacks it."""
    values = []
    for index, atoms in enumerate(frames):
        if key not in atoms.info:
            raise ValueError(f"frame {index} has no info[{key!r}]: is this a `polmodel md` trajectory?")
        values.append(np.asarray(atoms.info[key], dtype=float))
    return np.array(values)


def uniform_timestep(times_fs):
    """The sampling interval of a trajectory; errors if the frames are not evenly spaced in time."""
    times_fs = np.asarray(times_fs, dtype=float)
    if len(times_fs) < 2:
        raise ValueError("need at least two frames")
    steps = np.diff(times_fs)
    if np.any(steps <= 0) or np.ptp(steps) > 1e-6 * abs(steps.mean()) + 1e-9:
        raise ValueError("frames are not evenly spaced in time (was the trajectory restarted with another "
                         "interval?)")
    return float(steps.mean())


# --- plots ---------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ir_spectrum(wavenumber, intensity, path, *, max_wavenumber=None, peaks=()):
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(wavenumber, intensity, lw=1.2)
    for peak in peaks:
        ax.axvline(peak, color="grey", ls=":", lw=0.8)
    ax.set_xlim(0, max_wavenumber or wavenumber.max())
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("IR intensity (normalized)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_dielectric(dipoles, times_fs, path):
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.5))
    for index, label in enumerate("xyz"):
        ax.plot(times_fs, dipoles[:, index], lw=1.0, label=f"$M_{label}$")
    ax.set_xlabel("time (fs)")
    ax.set_ylabel("cell dipole (e·Å)")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_hysteresis(loop, path):
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5, 4))
    ax.plot(loop["field"] * V_PER_ANGSTROM_IN_MV_PER_CM, loop["polarization"] * E_PER_ANGSTROM2_IN_UC_PER_CM2,
            lw=1.2)
    for key in ("coercive_field_rising", "coercive_field_falling"):
        if np.isfinite(loop[key]):
            ax.axvline(loop[key] * V_PER_ANGSTROM_IN_MV_PER_CM, color="grey", ls=":", lw=0.8)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("field (MV/cm)")
    ax.set_ylabel("polarization (µC/cm$^2$)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
