"""Ferroelectric switching runs: one field cycle's P–E loop sampled as Allegro-pol's LAMMPS runs sample it, and the
statistics over runs.

Allegro-pol's coercive-field runs print, every `every_fs`, the instantaneous field and P averaged over the
preceding `window_fs` (LAMMPS `fix ave/time`; 1 ps every 2 ps for a 200 ps cycle). `sampled_like_lammps` makes
that series from a `polmodel md` P(t) file, and `switching_cycle` analyses the cycle after the poling hold with
`hysteresis_loop` (the loop's centre taken from the data). Values are reported in MV/cm and µC/cm².
"""
import numpy as np

from polmodel.analysis.observables import NoSwitchingError, _pyplot, hysteresis_loop
from polmodel.data.units import E_PER_ANGSTROM2_IN_UC_PER_CM2, V_PER_ANGSTROM_IN_MV_PER_CM

#: the loop's landmarks (keys of `hysteresis_loop`) and the unit each is reported in
_FIELDS = ("coercive_field_rising", "coercive_field_falling", "coercive_field", "field_bias")
_POLARIZATIONS = ("remanent_polarization_rising", "remanent_polarization_falling", "remanent_polarization",
                  "polarization_at_max_field", "polarization_at_max_field_error", "polarization_centre")


def sampled_like_lammps(times_fs, fields, polarizations, *, window_fs, every_fs):
    """(times (K,), fields (K, 3), polarizations (K, 3)) at t_k = k·every_fs: the field at t_k (the last row at
    or before it) and P averaged over the rows with t_k - window_fs < t <= t_k; only complete windows."""
    times_fs = np.asarray(times_fs, dtype=float)
    fields, polarizations = np.asarray(fields, dtype=float), np.asarray(polarizations, dtype=float)
    if not (0 < window_fs <= every_fs):
        raise ValueError(f"the averaging window must be positive and at most the sampling interval, got "
                         f"{window_fs} fs every {every_fs} fs")
    first = np.ceil((times_fs[0] + window_fs) / every_fs)
    sample_times = np.arange(first, np.floor(times_fs[-1] / every_fs + 1e-9) + 1) * every_fs
    out_times, out_fields, out_polarizations = [], [], []
    for time in sample_times:
        inside = (times_fs > time - window_fs + 1e-9) & (times_fs <= time + 1e-9)
        if not inside.any():
            continue
        last = int(np.flatnonzero(times_fs <= time + 1e-9)[-1])
        out_times.append(time)
        out_fields.append(fields[last])
        out_polarizations.append(polarizations[inside].mean(axis=0))
    return np.array(out_times), np.array(out_fields).reshape(-1, 3), np.array(out_polarizations).reshape(-1, 3)


def switching_cycle(times_fs, fields, polarizations, *, hold_fs, period_fs, axis, window_fs, every_fs):
    """The P–E loop of the first field cycle after the hold [hold_fs, hold_fs + period_fs], from the P(t) rows
    sampled with `sampled_like_lammps`: `hysteresis_loop`'s dict (V/Å, e/Å²) plus its `times_fs`. Raises
    polmodel.analysis.observables.NoSwitchingError when the run does not switch or is not a full cycle yet."""
    times, sampled_fields, sampled_polarizations = sampled_like_lammps(times_fs, fields, polarizations,
                                                                       window_fs=window_fs, every_fs=every_fs)
    end = hold_fs + period_fs
    if len(times) == 0 or times[-1] < end - 1e-6:
        reached = float(np.asarray(times_fs)[-1]) if len(times_fs) else 0.0
        raise NoSwitchingError(f"the run has reached {reached / 1000:g} ps of the {end / 1000:g} ps the cycle "
                               "needs: continue it")
    cycle = (times >= hold_fs - 1e-6) & (times <= end + 1e-6)
    loop = hysteresis_loop(sampled_fields[cycle], sampled_polarizations[cycle], axis=axis, discard_cycles=0)
    loop["times_fs"] = times[cycle]
    return loop


def loop_in_reporting_units(loop):
    """The landmarks of a `hysteresis_loop` dict in MV/cm and µC/cm² (keys suffixed _MV_per_cm, _uC_per_cm2)."""
    report = {f"{key}_MV_per_cm": loop[key] * V_PER_ANGSTROM_IN_MV_PER_CM for key in _FIELDS}
    report.update({f"{key}_uC_per_cm2": loop[key] * E_PER_ANGSTROM2_IN_UC_PER_CM2 for key in _POLARIZATIONS})
    return report


def statistics_over_runs(reports):
    """Per quantity of `loop_in_reporting_units` reports: mean, standard error of the mean (std with ddof 1 over
    √n; NaN for one run) and the spread (std over runs), with n."""
    if not reports:
        return {"runs": 0}
    statistics = {"runs": len(reports)}
    for key in reports[0]:
        if key.startswith("polarization_at_max_field_error"):
            continue
        values = np.array([report[key] for report in reports], dtype=float)
        spread = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        statistics[key] = {"mean": float(values.mean()), "error": spread / np.sqrt(len(values)), "spread": spread}
    return statistics


def plot_switching_loops(loops, coercive, path):
    """Each run's loop (P about its centre against the field) and the mean coercive field of
    `statistics_over_runs` (`coercive`: its coercive_field_MV_per_cm entry) as dotted lines."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, loop in loops.items():
        ax.plot(loop["field"] * V_PER_ANGSTROM_IN_MV_PER_CM,
                (loop["polarization"] - loop["polarization_centre"]) * E_PER_ANGSTROM2_IN_UC_PER_CM2, lw=1.0,
                label=name)
    for sign in (-1, 1):
        ax.axvline(sign * coercive["mean"], color="grey", ls=":", lw=0.8)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    error = "" if np.isnan(coercive["error"]) else f" ± {coercive['error']:.2f}"
    ax.set_title(f"E_c {coercive['mean']:.2f}{error} MV/cm ({len(loops)} runs)", fontsize=10)
    ax.set_xlabel("field (MV/cm)")
    ax.set_ylabel("P − P_centre (µC/cm²)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
