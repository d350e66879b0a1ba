"""Ferroelectric switching under a cycled field: runs of Allegro-pol's coercive-field protocol and their P–E loops.

Each seed is one run in OUTPUT: seed-N.xyz (frames), seed-N.xyz.polarization.csv (the field and P as they are
made) and seed-N.xyz.restart.npz. A killed run continues exactly when the same command is given again; runs
already finished are only analysed. Two processes may run different --seeds into the same OUTPUT.
When every run is done: OUTPUT/switching.json (per run and over runs: E_c on each branch, P_r, P at the field's
maximum, the loop's centre; MV/cm and µC/cm²) and OUTPUT/switching.png.

Example (Allegro-pol's protocol at 300 K, first-order coupling, 3 runs):
    polmodel switch --model data/allegro_pol/BaTiO3.pt --structure data/allegro_pol/BaTiO3-1080-pbe.xyz
        --output runs/300K-first-order --temperature 300 --coupling first-order --seeds 0 1 2
"""
import hashlib
import json
import sys
from pathlib import Path

from polmodel.cli import (EXIT_INTERRUPTED, InputError, check_input_file, check_output_file, check_structure,
                          load_model_file)

_AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model or ensemble file")
    parser.add_argument("--member", type=int, default=None, metavar="K",
                        help="use only member K of an ensemble (about 1/members of the cost; no spread check)")
    parser.add_argument("--structure", required=True, help="starting structure (periodic; any ASE-readable file)")
    parser.add_argument("--output", required=True, help="directory of the runs and their analysis")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    parser.add_argument("--coupling", choices=("network", "first-order"), default="network",
                        help="network: the field enters the model (default); first-order: F(0) + Z*ᵀε and "
                             "P(0) + αε, as Allegro-pol's runs")
    parser.add_argument("--axis", choices=sorted(_AXES), default="z", help="field direction (default z)")
    parser.add_argument("--amplitude", type=float, default=0.3636, help="V/Å (default 0.3636 = 36.36 MV/cm)")
    parser.add_argument("--period", type=float, default=200.0, help="ps, one cosine cycle (default 200)")
    parser.add_argument("--hold", type=float, default=10.0, help="ps at +amplitude before the cycle (default 10)")
    parser.add_argument("--timestep", type=float, default=2.0, help="fs (default 2)")
    parser.add_argument("--thermostat-time", type=float, default=0.2, help="ps, Nosé–Hoover damping (default 0.2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="velocity seeds, one run each (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto; a run may continue "
                        "on another device (the trajectory stays one run; the last digits differ)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def protocol_from(args):
    from polmodel.dynamics.switching import SwitchingProtocol
    try:
        return SwitchingProtocol(temperature_K=args.temperature, amplitude=args.amplitude,
                                 period_fs=args.period * 1000.0, hold_fs=args.hold * 1000.0, axis=_AXES[args.axis],
                                 timestep_fs=args.timestep, thermostat_time_fs=args.thermostat_time * 1000.0)
    except ValueError as error:
        raise InputError(str(error)) from error


def _check_inputs(args):
    protocol = protocol_from(args)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise InputError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    from pathlib import Path
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    check_output_file(output / "switching.json", "--output")
    check_input_file(args.structure, "--structure")
    import ase.io
    try:
        atoms = ase.io.read(args.structure, index=-1)
    except Exception as error:  # ASE raises many types for a file it cannot parse
        raise InputError(f"--structure {args.structure} is not a structure file ASE can read "
                         f"({type(error).__name__})") from error
    check_structure(atoms, f"--structure {args.structure}")
    if not all(atoms.pbc):
        raise InputError(f"--structure {args.structure} is not a periodic cell: switching needs a polarization")
    from polmodel.dynamics.md import check_timestep
    try:
        check_timestep(protocol.timestep_fs, atoms.get_masses())
    except ValueError as error:
        raise InputError(f"--timestep: {error}") from error
    from polmodel.runtime.devices import resolve_device
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        raise InputError(f"--device: {error}") from error
    model = load_model_file(args.model)
    if args.member is not None:
        members = getattr(model, "members", None)
        if members is None or not 0 <= args.member < len(members):
            count = len(members) if members is not None else "no"
            raise InputError(f"--member {args.member}: the model has {count} members")
        model = members[args.member]
    check_structure(atoms, f"--structure {args.structure}", model)
    _check_settings_file(output, args, protocol)
    return model, atoms, protocol


def _run_settings(args, protocol):
    # the model file's content, not only its path: a retrained model under the same name would otherwise go on
    # with runs another model began
    model_sha256 = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()
    return {"protocol": protocol.as_dict(), "coupling": args.coupling, "model": str(args.model),
            "model_sha256": model_sha256, "member": args.member, "structure": str(args.structure)}


def _check_settings_file(output, args, protocol):
    """OUTPUT/settings.json records what its runs are made with; runs with other settings go elsewhere."""
    path = output / "settings.json"
    settings = _run_settings(args, protocol)
    if path.exists():
        recorded = json.loads(path.read_text())
        differences = [f"{key} was {recorded.get(key)} and is now {value}" for key, value in settings.items()
                       if recorded.get(key) != value]
        if differences:
            raise InputError(f"--output {output} holds runs made with other settings ({'; '.join(differences)}): "
                             "give another --output")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


def run(args):
    model, atoms, protocol = _check_inputs(args)
    import torch

    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.dynamics.md import RestartMismatchError, RunInProgressError, saved_step, spread_threshold_of
    from polmodel.dynamics.switching import run_path, run_switching

    dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[args.dtype]
    calculator = PolCalculator(model, efield=protocol.field(0.0), dtype=dtype, coupling=args.coupling,
                               device=args.device)
    spread_threshold = spread_threshold_of(model)[0] if hasattr(model, "members") else None
    for seed in args.seeds:
        try:
            run_switching(atoms, calculator, protocol, seed=seed, directory=args.output, progress=not args.quiet,
                          spread_threshold=spread_threshold)
        except (RestartMismatchError, RunInProgressError) as error:
            raise InputError(str(error)) from error
        except KeyboardInterrupt:
            step = saved_step(run_path(args.output, seed))
            print(f"polmodel switch: stopped in run seed {seed} at step {step} of {protocol.steps}; rerun the same "
                  "command to continue", file=sys.stderr)
            return EXIT_INTERRUPTED
    summary = write_analysis(args.output, protocol)
    print(json.dumps({key: summary[key] for key in ("complete_runs", "over_runs")}, indent=1))
    return 0


def write_analysis(directory, protocol):
    """switching.json and switching.png from every finished run in `directory`; returns the summary dict."""
    from pathlib import Path

    from polmodel.analysis.observables import NoSwitchingError
    from polmodel.analysis.switching import (loop_in_reporting_units, plot_switching_loops, statistics_over_runs,
                                             switching_cycle)
    from polmodel.dynamics.polarization_log import polarization_log_path, read_polarization_log

    directory = Path(directory)
    runs, loops, unfinished = {}, {}, {}
    for path in sorted(directory.glob("seed-*.xyz"), key=lambda p: int(p.stem.split("-")[1])):
        _, columns = read_polarization_log(polarization_log_path(path))
        fields = _vectors(columns, "efield")
        polarizations = _vectors(columns, "polarization")
        try:
            loop = switching_cycle(columns["time_fs"], fields, polarizations, hold_fs=protocol.hold_fs,
                                   period_fs=protocol.period_fs, axis=protocol.axis,
                                   window_fs=protocol.sample_window_fs, every_fs=protocol.sample_every_fs)
        except NoSwitchingError as error:
            unfinished[path.stem] = str(error)
            continue
        loops[path.stem] = loop
        runs[path.stem] = loop_in_reporting_units(loop)
    summary = {"protocol": protocol.as_dict(), "complete_runs": len(runs), "runs": runs,
               "not_analysed": unfinished, "over_runs": statistics_over_runs(list(runs.values())),
               "sampling": f"P averaged over {protocol.sample_window_fs / 1000:g} ps windows every "
                           f"{protocol.sample_every_fs / 1000:g} ps, the field at the window's end; "
                           "the loop's centre from P at the field's extremes"}
    (directory / "switching.json").write_text(json.dumps(summary, indent=1) + "\n")
    if loops:
        plot_switching_loops(loops, summary["over_runs"]["coercive_field_MV_per_cm"], directory / "switching.png")
    return summary


def _vectors(columns, name):
    import numpy as np
    return np.stack([columns[f"{name}_{axis}"] for axis in "xyz"], axis=1)
