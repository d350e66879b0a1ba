"""Analyse a `polmodel md` trajectory or a model at a structure (PNG + JSON): IR spectrum, static dielectric
constant, P–E hysteresis, Γ phonons.

    polmodel analyze ir TRAJ [--output PREFIX] [--skip-fs T] [--max-wavenumber W] [--window NAME] [--allow-driven]
    polmodel analyze dielectric TRAJ [--model M | --epsilon-inf X [Y Z | 9 values]] [--temperature K] [--blocks N]
                                     [--zero-field-trajectory REF] [--allow-driven]
    polmodel analyze hysteresis TRAJ [--discard-cycles N]
    polmodel analyze modes STRUCTURE --model M [--fwhm W] [--max-wavenumber W]

`ir` wants an NVE run at zero field; `dielectric` a canonical run at zero field (fluctuations, T = the
thermostat's target), or, with --zero-field-trajectory, a run at a small static field beside a zero-field one;
`modes` gives ε∞ (from the model's α), Γ frequencies, mode charges, IR intensities, the harmonic IR spectrum and
the harmonic ε0 from the model's Hessian and Born charges.
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from polmodel.cli import InputError, check_input_file, check_output_file, check_structure

ANALYSES = ("ir", "dielectric", "hysteresis", "modes")


def add_arguments(parser):
    parser.add_argument("analysis", choices=ANALYSES)
    parser.add_argument("trajectory", help="extended-XYZ trajectory written by `polmodel md`, or its P(t) file "
                                           "OUTPUT.polarization.csv (every step; for `modes`: a structure, any "
                                           "ASE-readable file)")
    parser.add_argument("--output", default=None,
                        help="prefix of the PNG and JSON outputs (default: input stem + _<analysis>)")
    parser.add_argument("--skip-fs", type=float, default=0.0, help="discard frames before this time (equilibration)")
    parser.add_argument("--max-wavenumber", type=float, default=1400.0, help="spectrum range in cm⁻¹ (default 1400)")
    parser.add_argument("--window", default="hann", help="ir: autocorrelation window (a scipy.signal window name)")
    parser.add_argument("--allow-driven", action="store_true",
                        help="ir, dielectric: analyse a thermostatted or field-driven run anyway (the result is "
                             "then not the equilibrium quantity)")
    parser.add_argument("--model", default=None,
                        help="dielectric: model/ensemble file for ε∞ from its polarizability; modes: the model")
    parser.add_argument("--epsilon-inf", type=float, nargs="+", default=None, metavar="X",
                        help="dielectric: ε∞ to add to the ionic part when no --model is given: one value "
                             "(isotropic), three (principal values along x, y, z: a uniaxial crystal's ⊥ ⊥ ∥) or "
                             "nine (the tensor, row by row)")
    parser.add_argument("--alpha-frames", type=int, default=5,
                        help="dielectric: number of frames (evenly spaced) on which to average α (default 5)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="dielectric: temperature in K (default: the thermostat's recorded target)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="dielectric: the error bar from N block means (default: a blocking analysis that "
                             "finds the plateau of the block-mean error, and says where there is none)")
    parser.add_argument("--zero-field-trajectory", default=None,
                        help="dielectric: a zero-field run of the same cell; TRAJ is then a run at a small static "
                             "field and ε0 comes from the mean polarization change")
    parser.add_argument("--discard-cycles", type=int, default=1,
                        help="hysteresis: field cycles discarded as the virgin curve (default 1)")
    parser.add_argument("--fwhm", type=float, default=10.0, help="modes: Lorentzian line width in cm⁻¹ (default 10)")


# --- input checks (before any work) ----------------------------------------------------------------------------
def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def output_paths(prefix):
    """(PNG, JSON) paths: the prefix with .png and .json appended (never replacing a dot in the prefix, so that
    X.polarization_ir and X.polarization_dielectric stay two outputs); InputError when either cannot be written."""
    paths = tuple(prefix.with_name(prefix.name + suffix) for suffix in (".png", ".json"))
    for path in paths:
        check_output_file(path, "output")
    return paths


def read_md_trajectory(path, required=("time_fs", "dipole")):
    """The frames of a `polmodel md` trajectory, or of its P(t) file (atom-less frames with the same per-frame
    info, polmodel/dynamics/polarization_log.py), or InputError saying what the file is instead."""
    from polmodel.dynamics.md import read_trajectory
    from polmodel.dynamics.polarization_log import polarization_frames

    check_input_file(path, "trajectory")
    path = Path(path)
    if path.suffix.lower() == ".cif":
        raise InputError(f"{path} is a CIF structure, not a `polmodel md` trajectory (extended XYZ)")
    try:
        is_log = path.name.lower().endswith((".csv", ".csv.gz"))
        frames = polarization_frames(path) if is_log else read_trajectory(path)
    except Exception as error:  # ASE raises many kinds on a file it cannot parse
        raise InputError(f"{path} is not an extended-XYZ trajectory ({_first_line(error)})") from None
    if not frames:
        raise InputError(f"{path} holds no frames")
    for key in required:
        missing = [index for index, frame in enumerate(frames) if key not in frame.info]
        if missing:
            raise InputError(f"{path} is not a `polmodel md` trajectory: frame {missing[0]} has no {key!r}")
    return frames


def _after_skip(args, frames, minimum=8):
    from polmodel.analysis import observables

    if not args.skip_fs >= 0:
        raise InputError(f"--skip-fs must be >= 0, got {args.skip_fs}")
    times = observables.trajectory_series(frames, "time_fs")
    kept = [frame for frame, time in zip(frames, times) if time >= args.skip_fs]
    if kept and kept[0] is not frames[0]:
        # the run's settings (thermostat, field) live on its first frame: skipping it must not hide them
        settings = {key: value for key, value in frames[0].info.items() if key.startswith(observables.SETTINGS_PREFIX)}
        kept[0] = kept[0].copy()
        kept[0].info = {**settings, **kept[0].info}
    if len(kept) < minimum:
        raise InputError(f"only {len(kept)} frames after --skip-fs {args.skip_fs} (need {minimum})")
    if not all(frame.pbc.all() for frame in kept):
        raise InputError("the trajectory's cell is not periodic: a dielectric response needs a volume")
    try:
        timestep = observables.uniform_timestep(times[times >= args.skip_fs])
    except ValueError as error:
        raise InputError(str(error)) from None
    return kept, times[times >= args.skip_fs], timestep


def _equilibrium_notes(frames, *, allow_thermostat, allow_driven):
    from polmodel.analysis import observables

    conditions = observables.trajectory_conditions(frames)
    try:
        with warnings.catch_warnings():  # the notes go into the JSON report instead
            warnings.simplefilter("ignore")
            notes = observables.check_equilibrium_run(conditions, allow_thermostat=allow_thermostat,
                                                   allow_driven=allow_driven)
    except observables.DrivenTrajectoryError as error:
        raise InputError(str(error)) from None
    return conditions, notes


def _check_common(args):
    if not args.max_wavenumber > 0:
        raise InputError(f"--max-wavenumber must be positive, got {args.max_wavenumber}")
    if args.analysis == "ir":
        from scipy import signal
        try:
            signal.get_window(args.window, 16, fftbins=False)
        except (ValueError, TypeError) as error:
            raise InputError(f"--window {args.window!r} is not a scipy.signal window ({error})") from None
    if args.analysis == "dielectric":
        if args.blocks is not None and args.blocks < 2:
            raise InputError(f"--blocks must be at least 2, got {args.blocks}")
        if args.temperature is not None and not args.temperature > 0:
            raise InputError(f"--temperature must be positive, got {args.temperature}")
        if args.alpha_frames < 1:
            raise InputError(f"--alpha-frames must be at least 1, got {args.alpha_frames}")
    if args.analysis == "hysteresis" and args.discard_cycles < 0:
        raise InputError(f"--discard-cycles must be >= 0, got {args.discard_cycles}")
    if args.analysis == "modes":
        if args.model is None:
            raise InputError("modes needs --model")
        if not args.fwhm > 0:
            raise InputError(f"--fwhm must be positive, got {args.fwhm}")
    if args.model is not None:
        check_input_file(args.model, "model")


def _load_calculator(path):
    from polmodel.dynamics.calculator import PolCalculator

    try:
        return PolCalculator(str(path))
    except Exception as error:  # a corrupt or foreign file: torch, pickle and our own loader raise many kinds
        raise InputError(f"cannot load the model {path}: {_first_line(error)}") from None


# --- analyses --------------------------------------------------------------------------------------------------
def _epsilon_inf(args, frames, calculator):
    if calculator is not None:
        from polmodel.data.frames import frame_efield
        if len(frames[0]) == 0:
            raise InputError("--model computes ε∞ at the trajectory's positions, which a P(t) file does not hold: "
                             "give the extended-XYZ trajectory, or --epsilon-inf")
        chosen = np.unique(np.linspace(0, len(frames) - 1, max(args.alpha_frames, 1)).astype(int))
        tensors = []
        for index in chosen:
            atoms = frames[index].copy()
            calculator.set(efield=frame_efield(atoms))
            atoms.calc = calculator
            tensors.append(calculator.get_property("dielectric_tensor", atoms))
        return np.mean(tensors, axis=0), f"model polarizability averaged over {len(chosen)} frames"
    if args.epsilon_inf is not None:
        from polmodel.analysis.phonons import as_dielectric_tensor
        return as_dielectric_tensor(np.reshape(args.epsilon_inf, (3, 3)) if len(args.epsilon_inf) == 9
                                    else args.epsilon_inf if len(args.epsilon_inf) == 3
                                    else args.epsilon_inf[0]), "given"
    return np.eye(3), "none (vacuum): the result is the ionic part + 1"


def _mean_kinetic_temperature(frames):
    from polmodel.analysis import observables
    return float(observables.trajectory_series(frames, "temperature").mean())


#: cm⁻¹: a spectrum whose resolution (1 / run length) is coarser than this cannot separate vibrational peaks
MAX_USEFUL_RESOLUTION_CM = 20


def run_ir(args, frames):
    from polmodel.analysis import observables, spectra

    frames, times, timestep = _after_skip(args, frames)
    _, notes = _equilibrium_notes(frames, allow_thermostat=False, allow_driven=args.allow_driven)
    temperature = _mean_kinetic_temperature(frames)
    volume = float(np.mean([frame.get_volume() for frame in frames]))
    dipoles = observables.trajectory_series(frames, "dipole")
    result = spectra.ir_absorption_from_dipoles(dipoles, timestep, volume, temperature, window=args.window)
    keep = result["wavenumber"] <= min(args.max_wavenumber, result["nyquist_cm-1"])
    wavenumber, absorption = result["wavenumber"][keep], result["absorption"][keep]
    peaks = observables.spectrum_peaks(wavenumber, absorption, prominence=0.05)
    if args.max_wavenumber > result["nyquist_cm-1"]:
        notes.append(f"frames {timestep:g} fs apart resolve only up to {result['nyquist_cm-1']:.0f} cm⁻¹ (Nyquist); "
                     "write frames more often for a wider spectrum")
    if result["resolution_cm-1"] > MAX_USEFUL_RESOLUTION_CM:
        duration = timestep * (len(frames) - 1)
        notes.append(f"the analysed run is {duration:g} fs long: its spectral resolution is "
                     f"{result['resolution_cm-1']:.0f} cm⁻¹, too coarse to tell peaks apart; a run "
                     f"{result['resolution_cm-1'] / MAX_USEFUL_RESOLUTION_CM:.0f}x longer resolves "
                     f"{MAX_USEFUL_RESOLUTION_CM} cm⁻¹")
        print(f"polmodel analyze: warning: {notes[-1]}", file=sys.stderr)
    return {"sampling_fs": timestep, "temperature_K": temperature,
            "temperature_source": "mean kinetic temperature of the NVE run", "volume_A3": volume,
            "nyquist_cm-1": result["nyquist_cm-1"], "resolution_cm-1": result["resolution_cm-1"],
            "quantum_correction": result["statement"], "absorption_unit": "cm^-1 (α n, orientationally averaged)",
            "integrated_absorption_cm-2": float(np.trapezoid(absorption, wavenumber)),
            "peaks_cm-1": peaks.tolist(), "wavenumber_cm-1": wavenumber.tolist(), "absorption": absorption.tolist(),
            "notes": notes}, lambda png: observables.plot_ir_spectrum(
                wavenumber, absorption, png, max_wavenumber=wavenumber.max(), peaks=peaks[:6],
                title=f"NVE MD at {temperature:.0f} K; harmonic quantum correction applied once")


def _dielectric_temperature(args, conditions, frames, notes):
    if args.temperature is not None:
        return args.temperature, "given (--temperature)"
    if conditions["target_temperature_K"] is not None:
        return conditions["target_temperature_K"], f"the {conditions['thermostat']} thermostat's target"
    temperature = _mean_kinetic_temperature(frames)
    if conditions["thermostat"] != "nve":
        notes.append("no thermostat target recorded: using the run's mean kinetic temperature")
    return temperature, "mean kinetic temperature of the run"


def run_dielectric(args, frames):
    from polmodel.analysis import observables, spectra

    frames, times, _ = _after_skip(args, frames)
    calculator = _load_calculator(args.model) if args.model else None
    if args.zero_field_trajectory is not None:
        return _run_dielectric_from_field(args, frames, times, calculator)
    conditions, notes = _equilibrium_notes(frames, allow_thermostat=True, allow_driven=args.allow_driven)
    if args.blocks is not None and len(frames) < 2 * args.blocks:
        raise InputError(f"{len(frames)} frames cannot make {args.blocks} blocks of at least two")
    temperature, temperature_source = _dielectric_temperature(args, conditions, frames, notes)
    dipoles = observables.trajectory_series(frames, "dipole")
    volume = float(np.mean([frame.get_volume() for frame in frames]))
    epsilon_inf, source = _epsilon_inf(args, frames, calculator)
    epsilon_static, error = spectra.static_dielectric_from_fluctuations(dipoles, volume, temperature, epsilon_inf,
                                                                        blocks=args.blocks)
    _, plateau = spectra.blocked_mean_error(spectra.dipole_fluctuation_products(dipoles))
    if args.blocks is None:
        error_method = "blocking analysis of δM_a δM_b (the plateau of the block-mean error)"
        missing = [f"{'xyz'[a]}{'xyz'[b]}" for a in range(3) for b in range(a, 3) if not plateau[a, b]]
        if missing:
            notes.append(f"no plateau in the blocking analysis of {', '.join(missing)}: the run is too short for the "
                         "dipole's correlation time, and those error bars are lower bounds")
    else:
        error_method = f"{args.blocks} block means"
    return {"method": "dipole fluctuations, tin-foil boundary", "temperature_K": temperature,
            "temperature_source": temperature_source, "volume_A3": volume, "epsilon_inf": epsilon_inf.tolist(),
            "epsilon_inf_source": source, "epsilon_static": epsilon_static.tolist(),
            "epsilon_static_error": error.tolist(), "error_method": error_method,
            "error_plateau": plateau.tolist(),
            "epsilon_static_isotropic": float(np.trace(epsilon_static) / 3.0),
            "epsilon_static_isotropic_error": float(np.sqrt(np.sum(np.diag(error) ** 2)) / 3.0),
            "notes": notes}, \
        lambda png: observables.plot_dielectric(dipoles, times, png)


def _run_dielectric_from_field(args, frames, times, calculator):
    from polmodel.analysis import observables, spectra

    reference = read_md_trajectory(args.zero_field_trajectory)
    reference, _, _ = _after_skip(args, reference)
    _, notes = _equilibrium_notes(reference, allow_thermostat=True, allow_driven=False)
    fields = observables.trajectory_series(frames, "efield")
    if np.ptp(fields, axis=0).max() > 1e-12 or not np.any(fields[0]):
        raise InputError("with --zero-field-trajectory, TRAJ must be a run at one nonzero static field")
    if not _same_atoms(reference[0], frames[0]):
        raise InputError("the zero-field trajectory is not of the same atoms as TRAJ")
    volume = float(np.mean([frame.get_volume() for frame in frames]))
    column, error = spectra.static_dielectric_from_field(
        observables.trajectory_series(frames, "dipole"), observables.trajectory_series(reference, "dipole"),
        fields[0], volume, blocks=args.blocks)
    field = fields[0]
    return {"method": "mean dipole change under a small static field", "field_V_per_A": field.tolist(),
            "volume_A3": volume, "epsilon_static_along_field": float(column @ field / np.linalg.norm(field)),
            "epsilon_static_column": column.tolist(), "epsilon_static_column_error": error.tolist(),
            "notes": notes + ["electronic and ionic response both come from the mean dipole change; check that "
                              "half the field gives the same number (linear response)"]}, \
        lambda png: observables.plot_dielectric(observables.trajectory_series(frames, "dipole"), times, png)


def _same_atoms(first, second):
    """Whether two trajectories' frames are of the same atoms: the same numbers in the same order, or, where one
    is a P(t) file's atom-less frame, the same formula (which that file records)."""
    if len(first) and len(second):
        return len(first) == len(second) and bool(np.all(first.numbers == second.numbers))
    formulas = [frame.info.get("formula") or frame.get_chemical_formula() for frame in (first, second)]
    return formulas[0] == formulas[1]


def run_hysteresis(args, frames):
    from polmodel.analysis import observables

    frames, times, _ = _after_skip(args, frames, minimum=4)
    conditions = observables.trajectory_conditions(frames)
    protocol = conditions["field_protocol"] or {}
    period = protocol.get("period_fs") if protocol.get("kind") == "cosine" else None
    try:
        loop = observables.hysteresis_loop(observables.trajectory_series(frames, "efield"),
                                        observables.trajectory_series(frames, "polarization"),
                                        times_fs=times, period_fs=period, discard_cycles=args.discard_cycles)
    except ValueError as error:
        raise InputError(str(error)) from None
    summary = {key: value for key, value in loop.items() if key not in ("field", "polarization")}
    summary["discarded"] = (f"the first {args.discard_cycles} cycle(s): "
                            + (f"{args.discard_cycles * period} fs of a {period} fs period" if period
                               else "the period read off the field's zero crossings"))
    summary["units"] = {"field": "V/Å", "polarization": "e/Å²"}
    return summary, lambda png: observables.plot_hysteresis(loop, png)


def run_modes(args):
    import ase.io

    from polmodel.analysis import observables, phonons, spectra

    check_input_file(args.trajectory, "structure")
    path = Path(args.trajectory)
    try:
        atoms = ase.io.read(path, index=-1)
    except Exception as error:
        raise InputError(f"cannot read a structure from {path} ({_first_line(error)})") from None
    check_structure(atoms, f"structure {path}")
    if not atoms.pbc.all():
        raise InputError(f"{path} is not a periodic crystal: Γ phonons and ε need a cell")
    calculator = _load_calculator(args.model)
    from polmodel.dynamics.calculator import OverlappingAtomsError
    check_structure(atoms, f"structure {path}", calculator.model)
    try:
        calculator.check_atoms(atoms)
    except OverlappingAtomsError as error:
        raise InputError(f"structure {path}: {error}") from None
    atoms.calc = calculator
    forces = atoms.get_forces()
    born = calculator.get_property("born_effective_charges", atoms)
    epsilon_inf = calculator.get_property("dielectric_tensor", atoms)
    force_constants = phonons.model_force_constants(calculator, atoms)
    volume = atoms.get_volume()
    result = phonons.gamma_response(force_constants, atoms.get_masses(), born, epsilon_inf, volume)
    optical = ~result["acoustic"]
    grid = np.linspace(0.0, args.max_wavenumber, 2801)
    absorption = spectra.harmonic_ir_absorption(result["wavenumbers"][optical], result["mode_charges"][optical],
                                                volume, grid, fwhm=args.fwhm)
    integrated = spectra.harmonic_integrated_absorption(result["mode_charges"], volume)
    notes = []
    max_force = float(np.linalg.norm(forces, axis=1).max())
    if max_force > 0.01:
        notes.append(f"the structure is not at the model's minimum (largest force {max_force:.3g} eV/Å): relax it "
                     "with the model first for meaningful harmonic modes")
    unstable = int(np.sum(result["eigenvalues"][optical] < 0))
    if unstable:
        notes.append(f"{unstable} optical mode(s) are unstable (imaginary, listed as negative wavenumbers); "
                     "they are left out of ε0 — which then is not defined, see epsilon_static")
    epsilon_static = None if result["epsilon_static"] is None else result["epsilon_static"].tolist()
    summary = {
        "structure": str(path), "model": str(args.model), "volume_A3": volume, "max_force_eV_per_A": max_force,
        "epsilon_inf": np.asarray(epsilon_inf).tolist(), "epsilon_static_harmonic": epsilon_static,
        "born_charges_asr_residual_e": float(np.abs(np.asarray(born).sum(axis=0)).max()),
        "born_effective_charges": np.asarray(born).tolist(),
        "wavenumbers_cm-1": result["wavenumbers"].tolist(), "acoustic": result["acoustic"].tolist(),
        "ir_intensity_D2_per_A2_amu": result["ir_intensities"]["debye2_per_angstrom2_amu"].tolist(),
        "ir_intensity_km_per_mol": result["ir_intensities"]["km_per_mol"].tolist(),
        "integrated_absorption_cm-2": integrated.tolist(), "fwhm_cm-1": args.fwhm, "notes": notes,
        "wavenumber_cm-1": grid.tolist(), "absorption": absorption.tolist(),
    }
    return summary, lambda png: observables.plot_ir_spectrum(
        grid, absorption, png, max_wavenumber=args.max_wavenumber, label=f"harmonic, FWHM {args.fwhm:g} cm⁻¹",
        sticks=(result["wavenumbers"][optical], integrated[optical]), title="model Γ modes (Hessian and Z*)")


def run(args):
    _check_common(args)
    prefix = Path(args.output) if args.output else Path(args.trajectory).with_name(
        f"{Path(args.trajectory).stem}_{args.analysis}")
    png, report_path = output_paths(prefix)
    report = {"input": str(args.trajectory), "analysis": args.analysis}
    if args.analysis == "modes":
        summary, plot = run_modes(args)
    else:
        frames = read_md_trajectory(args.trajectory, required=("time_fs", "dipole", "efield")
                                    + (("polarization",) if args.analysis == "hysteresis" else ()))
        report["frames"] = len(frames)
        runner = {"ir": run_ir, "dielectric": run_dielectric, "hysteresis": run_hysteresis}[args.analysis]
        summary, plot = runner(args, frames)
    report.update(summary)
    plot(png)
    report["plot"] = str(png)
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps({key: value for key, value in report.items()
                      if key not in ("wavenumber_cm-1", "absorption", "born_effective_charges")}, indent=1))
    return 0
