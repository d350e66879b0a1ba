"""Run molecular dynamics under an electric field with a polmodel model or ensemble.

Example:
    polmodel md --model ensemble.pt --structure start.xyz --output traj.xyz --steps 2000 --timestep 1
        --temperature 300 --thermostat langevin --field '{"kind": "cosine", "amplitude": 0.02,
        "period_fs": 1000, "axis": [0, 0, 1]}' --interval 10
"""
import json
import sys

from polmodel.md import THERMOSTATS


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model or ensemble file written by `polmodel train`")
    parser.add_argument("--structure", required=True, help="starting structure (any ASE-readable file; last frame)")
    parser.add_argument("--output", required=True, help="extended-XYZ trajectory to write (continued if present)")
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
    parser.add_argument("--born-spread", action="store_true",
                        help="record the ensemble spread of the Born charges in every frame")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="run the model in this precision (default: as saved)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--no-restart", action="store_true", help="overwrite --output instead of continuing it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args):
    import ase.io
    import torch

    from polmodel.calculator import PolCalculator
    from polmodel.devices import resolve_device
    from polmodel.fields import field_protocol_from_json
    from polmodel.md import run_md

    try:
        protocol = field_protocol_from_json(args.field)
    except ValueError as error:
        sys.exit(f"polmodel md: bad --field: {error}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        sys.exit(f"polmodel md: {error}")
    atoms = ase.io.read(args.structure, index=-1)
    dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[args.dtype]
    calculator = PolCalculator(args.model, efield=protocol(0.0), dtype=dtype, device=device)
    final = run_md(atoms, calculator, protocol, steps=args.steps, timestep_fs=args.timestep,
                   temperature_K=args.temperature, thermostat=args.thermostat, friction=args.friction,
                   interval=args.interval, trajectory_path=args.output, born_spread=args.born_spread,
                   restart=not args.no_restart, progress=not args.quiet, seed=args.seed,
                   pressure_GPa=args.pressure)
    if not args.quiet:
        print(json.dumps({"trajectory": args.output, "final_temperature_K": final.get_temperature()}))
    return 0
