"""Observables of MD trajectories: what kind of run a trajectory is, P–E hysteresis, spectrum peaks, plots.

The spectra and static dielectric constants themselves are in polmodel.analysis.spectra, Γ phonons in
polmodel.analysis.phonons. Units (ASE's, as everywhere in the project): dipole e·Å, polarization e/Å², field V/Å, volume
Å³, time fs, temperature K. Spectra are reported against wavenumber in cm⁻¹. Plots convert to the customary µC/cm² and
MV/cm (1 V/Å = 100 MV/cm).
"""
import json
import warnings

import numpy as np

from polmodel.data.frames import frame_efield
from polmodel.data.units import E_PER_ANGSTROM2_IN_UC_PER_CM2, V_PER_ANGSTROM_IN_MV_PER_CM

# Trajectory settings that `polmodel md` writes into the first frame's info (polmodel/dynamics/md.py, `run_settings`).
SETTINGS_PREFIX = "md_"


class DrivenTrajectoryError(ValueError):
    """An equilibrium analysis was given a thermostatted or field-driven trajectory."""


class NoSwitchingError(ValueError):
    """A P–E series whose polarization does not switch: there is no hysteresis loop to analyse."""


# --- what kind of run a trajectory is ---------------------------------------------------------------------------
def trajectory_conditions(frames):
    """The run's conditions, from the settings `polmodel md` records in the first frame (`md_thermostat`,
    `md_field`, `md_temperature_K`, `md_timestep_fs`, `md_interval`) and from the per-frame fields.

    Returns a dict: thermostat (str or None when not recorded), target_temperature_K (None for NVE or when not
    recorded), field_protocol (dict or None), max_field (V/Å, the largest |efield| over the frames),
    recorded (whether the settings were found).
    """
    info = frames[0].info
    protocol = info.get(SETTINGS_PREFIX + "field")
    if isinstance(protocol, str):
        try:
            protocol = json.loads(protocol)
        except json.JSONDecodeError:
            protocol = {"kind": protocol}
    fields = [frame_efield(frame) for frame in frames]
    target = info.get(SETTINGS_PREFIX + "temperature_K")
    return {
        "thermostat": info.get(SETTINGS_PREFIX + "thermostat"),
        "target_temperature_K": None if target is None else float(target),
        "field_protocol": protocol,
        "max_field": float(max(np.linalg.norm(field) for field in fields)),
        "recorded": SETTINGS_PREFIX + "thermostat" in info,
    }


def check_equilibrium_run(conditions, *, allow_thermostat, allow_driven=False):
    """Refuse a run that the analysis would silently get wrong; returns the warnings to report.

    A field-driven run (any nonzero field, or a protocol other than a zero static field) is refused unless
    `allow_driven`. A thermostatted run is refused unless `allow_thermostat` (the fluctuation formula needs a
    canonical run; a spectrum needs undisturbed NVE dynamics) or `allow_driven`. When the trajectory does not
    record its thermostat, a warning says so and the analysis goes on.
    """
    notes = []
    protocol = conditions["field_protocol"] or {}
    static_zero = protocol.get("kind", "static") == "static" and not np.any(protocol.get("vector", [0, 0, 0]))
    if conditions["max_field"] > 0 or not static_zero:
        message = (f"the trajectory is field-driven (protocol {json.dumps(protocol) if protocol else 'unrecorded'}, "
                   f"largest field {conditions['max_field']:.3g} V/Å); this analysis assumes zero field")
        if not allow_driven:
            raise DrivenTrajectoryError(message + " (pass allow_driven / --allow-driven to analyse it anyway)")
        notes.append(message)
    thermostat = conditions["thermostat"]
    if thermostat is None:
        notes.append("the trajectory records no thermostat or field protocol (written before `polmodel md` kept "
                     "its settings): it is taken as an equilibrium run at zero field, unchecked")
    elif thermostat != "nve" and not allow_thermostat:
        message = f"the trajectory is thermostatted ({thermostat}): its dynamics are not the crystal's own"
        if not allow_driven:
            raise DrivenTrajectoryError(message + " (run NVE, or pass allow_driven / --allow-driven)")
        notes.append(message)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


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


def _project_on_field_axis(fields, polarizations, axis):
    if axis is None:
        _, _, vt = np.linalg.svd(fields, full_matrices=False)
        axis = vt[0]
        if axis[np.argmax(np.abs(axis))] < 0:
            axis = -axis
    axis = np.asarray(axis, dtype=float)
    if np.linalg.norm(axis) == 0 or not np.any(fields):
        raise NoSwitchingError("the field series is zero: there is no loop to analyse")
    axis = axis / np.linalg.norm(axis)
    return axis, fields @ axis, polarizations @ axis


def _samples_per_cycle(field):
    """The field's period in samples, from the spacing of its upward zero crossings, or None when it rises
    through zero fewer than twice."""
    rising = np.flatnonzero((field[:-1] < 0.0) & (field[1:] >= 0.0))
    return int(round(np.mean(np.diff(rising)))) if len(rising) > 1 else None


#: a sample whose field is within this fraction of the field's extreme counts as "at the field's maximum"
_EXTREME_FIELD_FRACTION = 0.95


def _polarization_at_field_extremes(field, polarization):
    """(P at the positive field extreme, its standard error, the same at the negative extreme): means over the
    samples within _EXTREME_FIELD_FRACTION of each extreme (the error is that of independent samples)."""
    values = []
    for extreme in (field.max(), field.min()):
        near = polarization[field >= _EXTREME_FIELD_FRACTION * extreme] if extreme > 0 else \
            polarization[field <= _EXTREME_FIELD_FRACTION * extreme]
        if extreme == 0 or len(near) == 0:
            raise NoSwitchingError("the field does not reach both signs: there is no loop to analyse")
        error = float(near.std(ddof=1) / np.sqrt(len(near))) if len(near) > 1 else float("nan")
        values.extend([float(near.mean()), error])
    return values


def hysteresis_loop(fields, polarizations, axis=None, *, times_fs=None, period_fs=None, discard_cycles=1,
                    min_remanent_fraction=0.1):
    """The P–E loop's landmarks per branch, after the first cycle(s) are discarded, about the loop's centre.

    fields (T,3) V/Å, polarizations (T,3) e/Å², in time order. The axis defaults to the principal direction of
    the field series. The first `discard_cycles` cycles (the virgin curve) are dropped: by time when `times_fs`
    and the protocol's `period_fs` are given, else by the period the field's zero crossings show. The rest
    is split into rising-field and falling-field branches (sign of dε/dt).

    The centre is taken from the data, not assumed at P = 0 (a model's polarization carries an arbitrary
    offset, a lattice quantum or a reference): P_c is the mean of P at the positive and at the negative field
    extreme (samples within 95 % of each). On each branch the coercive field is where P - P_c crosses zero and
    the remanent polarization is P - P_c where ε crosses zero (linear interpolation, averaged over cycles).

    Refuses (NoSwitchingError) a series that does not switch: a branch without a crossing, or remanent
    polarizations that are not of opposite signs (falling branch positive) and apart by at least
    `min_remanent_fraction` of the polarization range — a linear or merely lossy dielectric has no coercive
    field to report.

    Returns a dict: axis, field (T',), polarization (T',) projected (kept part, not centred); polarization_centre
    (e/Å²); coercive_field_rising / _falling (V/Å), their half difference coercive_field and half sum
    field_bias; remanent_polarization_rising / _falling (e/Å², from the centre) and their half difference
    remanent_polarization; polarization_at_max_field (half the difference of P at the two field extremes, e/Å²)
    with polarization_at_max_field_error (standard error); discarded_frames.
    """
    fields = np.asarray(fields, dtype=float)
    polarizations = np.asarray(polarizations, dtype=float)
    if fields.shape != polarizations.shape or fields.ndim != 2 or fields.shape[1] != 3 or len(fields) < 4:
        raise ValueError("fields and polarizations must both be (T, 3) series with T >= 4, got "
                         f"{fields.shape} and {polarizations.shape}")
    axis, field, polarization = _project_on_field_axis(fields, polarizations, axis)
    if discard_cycles:
        if times_fs is not None and period_fs is not None:
            times_fs = np.asarray(times_fs, dtype=float)
            start = int(np.searchsorted(times_fs, times_fs[0] + discard_cycles * period_fs))
        else:
            period = _samples_per_cycle(field)
            start = len(field) if period is None else discard_cycles * period
        if len(field) - start < 4:
            raise NoSwitchingError(f"the run holds no full field cycle after the first {discard_cycles} "
                                   "(discarded as the virgin curve): run longer")
        field, polarization = field[start:], polarization[start:]
    else:
        start = 0
    rate = np.gradient(field)
    at_positive, positive_error, at_negative, negative_error = _polarization_at_field_extremes(field, polarization)
    centre = 0.5 * (at_positive + at_negative)
    centred = polarization - centre

    result = {"axis": axis.tolist(), "field": field, "polarization": polarization, "discarded_frames": start,
              "polarization_centre": centre, "polarization_at_max_field": 0.5 * (at_positive - at_negative),
              "polarization_at_max_field_error": 0.5 * float(np.hypot(positive_error, negative_error))}
    for name, mask in (("rising", rate > 0), ("falling", rate < 0)):
        coercive, remanent = [], []
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        for segment_start, stop in zip(edges[::2], edges[1::2]):
            if stop - segment_start < 2:
                continue
            segment_field, segment_polarization = field[segment_start:stop], centred[segment_start:stop]
            coercive.extend(_zero_crossings(segment_field, segment_polarization))
            remanent.extend(_zero_crossings(segment_polarization, segment_field))
        if not coercive or not remanent:
            raise NoSwitchingError(f"the polarization does not switch on the {name}-field branch "
                                   "(no crossing of the loop's centre or of zero field on it)")
        result[f"coercive_field_{name}"] = float(np.mean(coercive))
        result[f"remanent_polarization_{name}"] = float(np.mean(remanent))
    spread = float(np.ptp(polarization))
    rising, falling = result["remanent_polarization_rising"], result["remanent_polarization_falling"]
    if not (falling > 0 > rising and falling - rising >= min_remanent_fraction * spread):
        raise NoSwitchingError(
            f"the loop does not switch: remanent polarization {falling:.3g} e/Å² on the falling branch and "
            f"{rising:.3g} on the rising one (from the loop's centre), for a polarization range of {spread:.3g} e/Å²")
    result["coercive_field"] = 0.5 * (result["coercive_field_rising"] - result["coercive_field_falling"])
    result["field_bias"] = 0.5 * (result["coercive_field_rising"] + result["coercive_field_falling"])
    result["remanent_polarization"] = 0.5 * (falling - rising)
    return result


def spectrum_peaks(wavenumber, intensity, *, prominence=0.05, min_wavenumber=1.0):
    """Wavenumbers (cm⁻¹) of the spectrum's peaks, strongest first; `prominence` relative to the maximum."""
    from scipy import signal

    intensity = np.asarray(intensity, dtype=float)
    scale = intensity.max() if intensity.max() > 0 else 1.0
    indices, properties = signal.find_peaks(intensity / scale, prominence=prominence)
    keep = wavenumber[indices] >= min_wavenumber
    indices, prominences = indices[keep], properties["prominences"][keep]
    order = np.argsort(prominences)[::-1]
    return wavenumber[indices[order]]


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


def plot_ir_spectrum(wavenumber, absorption, path, *, max_wavenumber=None, peaks=(), label=None, reference=None,
                     sticks=None, title=None):
    """α n(ν̃) in cm⁻¹ against ν̃; `reference` (wavenumber, absorption, label) overlays a second spectrum,
    `sticks` (wavenumbers, integrated absorption cm⁻²) marks harmonic modes on a second axis."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(wavenumber, absorption, lw=1.2, label=label)
    if reference is not None:
        ax.plot(reference[0], reference[1], lw=1.0, ls="--", label=reference[2])
    for peak in peaks:
        ax.axvline(peak, color="grey", ls=":", lw=0.8)
    if sticks is not None:
        twin = ax.twinx()
        twin.vlines(sticks[0], 0, sticks[1], color="C3", lw=1.5)
        twin.set_ylabel("mode ∫α n dν̃ (cm$^{-2}$)", color="C3")
        twin.set_ylim(0, None)
    ax.set_xlim(0, max_wavenumber or float(np.max(wavenumber)))
    ax.set_ylim(0, None)
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("absorption α n (cm$^{-1}$)")
    if title:
        ax.set_title(title, fontsize=9)
    if label or reference is not None:
        ax.legend(fontsize=8)
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
    ax.axhline(loop.get("polarization_centre", 0.0) * E_PER_ANGSTROM2_IN_UC_PER_CM2, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("field (MV/cm)")
    ax.set_ylabel("polarization (µC/cm$^2$)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
