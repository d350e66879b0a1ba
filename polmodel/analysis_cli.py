"""Analyse a `polmodel md` trajectory: IR spectrum, dielectric constants or P–E hysteresis (PNG + JSON).

    polmodel analyze ir TRAJ [--output PREFIX] [--skip-fs T] [--max-wavenumber W]
    polmodel analyze dielectric TRAJ [--model M | --epsilon-inf X] [--temperature K] [--skip-fs T]
    polmodel analyze hysteresis TRAJ [--skip-fs T]
"""
import json
from pathlib import Path

import numpy as np


def add_arguments(parser):
    parser.add_argument("analysis", choices=("ir", "dielectric", "hysteresis"))
    parser.add_argument("trajectory", help="extended-XYZ trajectory written by `polmodel md`")
    parser.add_argument("--output", default=None,
                        help="prefix of the PNG and JSON outputs (default: TRAJ stem + _<analysis>)")
    parser.add_argument("--skip-fs", type=float, default=0.0, help="discard frames before this time (equilibration)")
    parser.add_argument("--max-wavenumber", type=float, default=1200.0, help="IR plot range in cm⁻¹")
    parser.add_argument("--window", default="hann", help="IR autocorrelation window (scipy.signal name)")
    parser.add_argument("--model", default=None,
                        help="dielectric: model/ensemble file to compute ε∞ from its polarizability")
    parser.add_argument("--epsilon-inf", type=float, default=None,
                        help="dielectric: ε∞ to add to the ionic part when no --model is given")
    parser.add_argument("--alpha-frames", type=int, default=5,
                        help="dielectric: number of frames (evenly spaced) on which to average α (default 5)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="dielectric: temperature in K (default: the trajectory's mean)")


def _epsilon_inf(args, frames):
    if args.model is not None:
        from polmodel.analysis import dielectric_from_polarizability
        from polmodel.calculator import PolCalculator
        calculator = PolCalculator(args.model)
        chosen = np.unique(np.linspace(0, len(frames) - 1, max(args.alpha_frames, 1)).astype(int))
        tensors = []
        for index in chosen:
            atoms = frames[index].copy()
            calculator.set(efield=np.asarray(atoms.info.get("efield", np.zeros(3)), dtype=float))
            atoms.calc = calculator
            alpha = calculator.get_property("polarizability", atoms)
            tensors.append(dielectric_from_polarizability(alpha, atoms.get_volume()))
        return np.mean(tensors, axis=0), f"model polarizability averaged over {len(chosen)} frames"
    if args.epsilon_inf is not None:
        return args.epsilon_inf * np.eye(3), "given"
    return np.eye(3), "none (vacuum): the result is the ionic part + 1"


def run(args):
    from polmodel import analysis
    from polmodel.md import read_trajectory

    frames = read_trajectory(args.trajectory)
    times = analysis.trajectory_series(frames, "time_fs")
    frames = [frame for frame, time in zip(frames, times) if time >= args.skip_fs]
    times = times[times >= args.skip_fs]
    if len(frames) < 4:
        raise SystemExit(f"polmodel analyze: only {len(frames)} frames after --skip-fs {args.skip_fs}")
    prefix = Path(args.output) if args.output else Path(args.trajectory).with_name(
        f"{Path(args.trajectory).stem}_{args.analysis}")
    png, report_path = prefix.with_suffix(".png"), prefix.with_suffix(".json")
    report = {"trajectory": str(args.trajectory), "frames": len(frames), "analysis": args.analysis}

    if args.analysis == "ir":
        dipoles = analysis.trajectory_series(frames, "dipole")
        timestep = analysis.uniform_timestep(times)
        wavenumber, intensity = analysis.ir_spectrum(dipoles, timestep, window=args.window)
        peaks = analysis.spectrum_peaks(wavenumber, intensity, prominence=0.05)
        peaks = peaks[peaks <= args.max_wavenumber]
        analysis.plot_ir_spectrum(wavenumber, intensity, png, max_wavenumber=args.max_wavenumber, peaks=peaks[:5])
        keep = wavenumber <= args.max_wavenumber
        report.update({"sampling_fs": timestep, "resolution_cm-1": float(wavenumber[1]),
                       "peaks_cm-1": peaks.tolist(), "wavenumber_cm-1": wavenumber[keep].tolist(),
                       "intensity": intensity[keep].tolist()})
    elif args.analysis == "dielectric":
        dipoles = analysis.trajectory_series(frames, "dipole")
        temperature = args.temperature or float(analysis.trajectory_series(frames, "temperature").mean())
        volume = float(np.mean([frame.get_volume() for frame in frames]))
        epsilon_inf, source = _epsilon_inf(args, frames)
        epsilon_static = analysis.static_dielectric_from_fluctuations(dipoles, volume, temperature, epsilon_inf)
        analysis.plot_dielectric(dipoles, times, png)
        report.update({"temperature_K": temperature, "volume_A3": volume, "epsilon_inf": epsilon_inf.tolist(),
                       "epsilon_inf_source": source, "epsilon_static": epsilon_static.tolist(),
                       "epsilon_static_isotropic": float(np.trace(epsilon_static) / 3.0),
                       "note": "fluctuation formula with conducting boundary conditions; converge with run length"})
    else:
        fields = analysis.trajectory_series(frames, "efield")
        polarizations = analysis.trajectory_series(frames, "polarization")
        loop = analysis.hysteresis_loop(fields, polarizations)
        analysis.plot_hysteresis(loop, png)
        report.update({key: value for key, value in loop.items() if key not in ("field", "polarization")})
        report["units"] = {"field": "V/Å", "polarization": "e/Å²"}
    report["plot"] = str(png)
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps({key: value for key, value in report.items()
                      if key not in ("wavenumber_cm-1", "intensity")}, indent=1))
    return 0
