"""Run molecular dynamics under an electric field with a polmodel model or ensemble.

Example:
    polmodel md --model ensemble.pt --structure start.xyz --output traj.xyz --steps 2000 --timestep 1
        --temperature 300 --thermostat langevin --field '{"kind": "cosine", "amplitude": 0.02,
        "period_fs": 1000, "axis": [0, 0, 1]}' --interval 10
"""
import json
import math
import sys
import warnings

from polmodel.cli import EXIT_INTERRUPTED, InputError, check_input_file, check_output_file, check_structure, load_model_file
from polmodel.dynamics.md import DEFAULT_SPREAD_THRESHOLD, SPREAD_THRESHOLD_PER_VALIDATION_RMSE, THERMOSTATS

#: the exit status of a run stopped on the ensemble's spread (--stop-on-spread)
EXIT_STOPPED_ON_SPREAD = 3


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model or ensemble file written by `polmodel train`")
    parser.add_argument("--structure", required=True, help="starting structure (any ASE-readable file; last frame)")
    parser.add_argument("--output", required=True,
                        help="extended-XYZ trajectory to write (continued if present, with the same settings)")
    parser.add_argument("--steps", type=int, required=True, help="total number of MD steps")
    parser.add_argument("--timestep", type=float, default=1.0, help="timestep in fs (default 1)")
    parser.add_argument("--temperature", type=float, default=300.0, help="temperature in K (default 300)")
    parser.add_argument("--thermostat", choices=THERMOSTATS, default="langevin")
    parser.add_argument("--friction", type=float, default=0.01,
                        help="1/fs: Langevin friction or inverse thermostat relaxation time (default 0.01)")
    parser.add_argument("--pressure", type=float, default=0.0, help="GPa, for --thermostat npt (default 0)")
    parser.add_argument("--field", default='{"kind": "static", "vector": [0, 0, 0]}',
                        help="field protocol as a JSON object or a JSON file (fields in V/Å; default zero field)")
    parser.add_argument("--interval", type=int, default=10, help="write a frame every K steps (default 10)")
    parser.add_argument("--polarization-interval", type=int, default=1, metavar="K",
                        help="write a row of OUTPUT.polarization.csv (time, field, dipole, polarization, energy, "
                             "temperature) every K steps (default 1: every step)")
    parser.add_argument("--memory-limit-gb", type=float, default=None, metavar="GB",
                        help="memory one model call may use; a larger cell is evaluated in spatial chunks, exactly "
                             "(default: half of the memory available at the start)")
    parser.add_argument("--born-spread", action="store_true",
                        help="record the ensemble spread of the Born charges in every frame")
    parser.add_argument("--spread-threshold", type=float, default=None, metavar="EV_PER_A",
                        help="ensembles: warn once and record it in the trajectory when the largest atomic force "
                             f"spread passes this (eV/Å; default {SPREAD_THRESHOLD_PER_VALIDATION_RMSE:g} x the "
                             "validation force RMSE the model file records, or "
                             f"{DEFAULT_SPREAD_THRESHOLD} for files without one)")
    parser.add_argument("--stop-on-spread", action="store_true",
                        help="stop the run at the first step whose force spread passes --spread-threshold "
                             f"(exit status {EXIT_STOPPED_ON_SPREAD})")
    parser.add_argument("--outside-domain", choices=("warn", "refuse"), default="warn",
                        help="when the structure, the field or the temperature lies outside what the model was "
                             "trained on (distances, density, field, the temperature its frames were sampled at; "
                             "models saved with their training domain): warn at the start (default) or refuse to run")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="run the model in this precision (default: as saved)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--no-restart", action="store_true", help="overwrite --output instead of continuing it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_inputs(args):
    """Everything `run` needs, checked before MD starts: (model, atoms, protocol, device, MD settings); InputError
    if bad. The settings' spread_threshold is --spread-threshold, None where the model's is to be taken (`run`).

    The checks that need no heavy import (numbers, files, the field protocol) come first."""
    from polmodel.dynamics.md import MDSettings

    try:
        settings = MDSettings(steps=args.steps, timestep_fs=args.timestep, temperature_K=args.temperature,
                              thermostat=args.thermostat, friction=args.friction, pressure_GPa=args.pressure,
                              seed=args.seed, interval=args.interval, polarization_interval=args.polarization_interval,
                              born_spread=args.born_spread, spread_threshold=args.spread_threshold,
                              stop_on_spread=args.stop_on_spread)
    except ValueError as error:
        raise InputError(str(error)) from error
    if args.memory_limit_gb is not None and not (math.isfinite(args.memory_limit_gb) and args.memory_limit_gb > 0):
        raise InputError(f"--memory-limit-gb must be a positive number of GB, got {args.memory_limit_gb}")
    from polmodel.dynamics.fields import field_protocol_from_json
    try:
        protocol = field_protocol_from_json(args.field)
    except ValueError as error:
        raise InputError(f"bad --field: {error}") from error
    check_output_file(args.output, "--output")
    check_input_file(args.model, "--model")
    check_input_file(args.structure, "--structure")
    atoms = _read_structure(args.structure)
    from polmodel.runtime.devices import resolve_device
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise InputError(str(error)) from error
    model = load_model_file(args.model)
    check_structure(atoms, f"--structure {args.structure}", model)
    from polmodel.dynamics.md import check_timestep
    try:
        check_timestep(args.timestep, atoms.get_masses())
    except ValueError as error:
        raise InputError(f"--timestep: {error}") from error
    if args.thermostat == "npt" and not all(atoms.pbc):
        raise InputError(f"--thermostat npt needs a periodic cell; --structure {args.structure} has none")
    if args.memory_limit_gb is not None and hasattr(model, "members"):
        raise InputError("--memory-limit-gb applies to a single model: an ensemble is evaluated whole")
    if args.born_spread and not hasattr(model, "members"):
        raise InputError("--born-spread needs an ensemble (it is the spread over members); --model is one model")
    return model, atoms, protocol, device, settings


def _read_structure(path):
    import ase.io
    try:
        atoms = ase.io.read(path, index=-1)
    except Exception as error:  # ASE raises many types for a file it cannot parse
        raise InputError(f"--structure {path} is not a structure file ASE can read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'})") from error
    if len(atoms) == 0:
        raise InputError(f"--structure {path} has no atoms")
    return atoms


def _show_warning_as_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"polmodel md: {category.__name__}: {message}", file=file or sys.stderr)


def run(args):
    from polmodel.runtime.allocator import keep_freed_memory_in_heap
    keep_freed_memory_in_heap()   # this process is ours: the measured speed-up on large cells (runtime/allocator.py)
    model, atoms, protocol, device, settings = _check_inputs(args)

    import dataclasses

    import torch

    from polmodel.dynamics.calculator import OverlappingAtomsError, PolCalculator
    from polmodel.dynamics.md import RestartMismatchError, RunInProgressError, run_md, spread_threshold_of

    if settings.spread_threshold is None and hasattr(model, "members"):
        spread_threshold, source = spread_threshold_of(model)
        settings = dataclasses.replace(settings, spread_threshold=spread_threshold)
        if not args.quiet:
            print(f"force-spread threshold {spread_threshold:.3g} eV/Å: {source}", file=sys.stderr)
    dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[args.dtype]
    calculator = PolCalculator(model, efield=protocol(0.0), dtype=dtype, device=device,
                               memory_limit_gb=args.memory_limit_gb, outside_domain="ignore")
    _check_domain(calculator, atoms, protocol, args)
    try:
        calculator.check_atoms(atoms)   # overlapping atoms fail here, before the trajectory is touched
    except OverlappingAtomsError as error:
        raise InputError(f"--structure {args.structure}: {error}") from error
    _check_memory_budget(calculator, atoms)
    if not any(atoms.pbc):
        print(f"polmodel md: --structure {args.structure} has no periodic cell: running it as an open cluster "
              "(a dipole, no polarization or stress)", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning_as_one_line
            final = run_md(atoms, calculator, protocol, settings, trajectory_path=args.output,
                           restart=not args.no_restart, progress=not args.quiet)
    except RestartMismatchError as error:  # run_md checks a restart before it touches anything
        raise InputError(f"{error} (--no-restart)") from error
    except RunInProgressError as error:
        raise InputError(str(error)) from error
    except OverlappingAtomsError as error:   # the model let two atoms run into each other during the run
        from polmodel.dynamics.md import saved_step
        print(f"polmodel md: stopped: {error}; the last saved step is {saved_step(args.output)} (the trajectory up "
              "to there is intact)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from polmodel.dynamics.md import saved_step
        print(f"polmodel md: stopped at step {saved_step(args.output)} (the last saved one) of {args.steps}; rerun "
              "the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        from polmodel.dynamics.polarization_log import polarization_log_path
        print(json.dumps({"trajectory": args.output, "polarization": str(polarization_log_path(args.output)),
                          "final_temperature_K": final.get_temperature(),
                          **{key: final.info[key] for key in ("force_spread_exceeded_step", "stopped_on_spread")
                             if key in final.info}}))
    if final.info.get("stopped_on_spread"):
        print(f"polmodel md: stopped at step {final.info['force_spread_exceeded_step']}: the ensemble's force spread "
              "passed --spread-threshold", file=sys.stderr)
        return EXIT_STOPPED_ON_SPREAD
    return 0


def _check_domain(calculator, atoms, protocol, args):
    """One line per way the structure, the run's largest field or its temperature lies outside the model's training
    domain; with --outside-domain refuse, an InputError instead."""
    import numpy as np

    times = np.linspace(0.0, args.steps * args.timestep, 1001)
    field_max = max(float(np.linalg.norm(protocol(time))) for time in times)
    notes = calculator.check_domain(atoms, field_max, args.temperature)
    if notes and args.outside_domain == "refuse":
        raise InputError(f"this run (--structure {args.structure}, --field, --temperature) lies outside what the "
                         "model was trained on: " + "; ".join(notes) + " (--outside-domain warn runs anyway)")
    for note in notes:
        print(f"polmodel md: outside the training domain: {note}", file=sys.stderr)


def _check_memory_budget(calculator, atoms):
    """InputError when no chunk of the cell fits the calculator's memory budget (before any step)."""
    if calculator.is_ensemble:
        return
    from polmodel.nn.chunked import MemoryBudgetError, plan_for_cell
    try:
        plan_for_cell(calculator.model, atoms.positions, atoms.cell[:], atoms.pbc, calculator.memory_limit_gb,
                      dtype=calculator.dtype, device=calculator.device)
    except MemoryBudgetError as error:
        raise InputError(f"--memory-limit-gb: {error}") from error
