"""α-quartz MD for the IR spectrum and ε0: the shipped ensemble (or one member) on a supercell, equilibrated with Langevin
at T, then NVE; the P(t) file of the NVE run (every step) is the input of `polmodel analyze ir` and
`polmodel analyze dielectric`.

    python benchmarks/quartz_md_ir.py --repeat 5 --nve-ps 20 --device cuda --workdir /tmp/quartz_md
    polmodel analyze ir /tmp/quartz_md/nve.xyz.polarization.csv --skip-fs 1000
    polmodel analyze dielectric /tmp/quartz_md/nve.xyz.polarization.csv --skip-fs 1000 --model data/quartz/ensemble.pt

The NVE run goes on in chunks of --chunk steps (each a restart of `run_md`, which continues the trajectory and
its P(t) file exactly) until --nve-ps or --wall-limit-s, whichever comes first, so a run cut short by the wall
limit is still a complete, analysable NVE series; rerunning the command continues it. Prints one JSON line:
atoms, device, ms per step, NVE length, mean temperature and the drift of the conserved energy.
Measured: README, α-quartz section (5×5×5 = 1125 atoms, 20 ps, on one H200). With Allegro-pol's SiO2 ensemble on
its relaxed 72-atom cell (data/allegro_pol/README.md, "SiO2 MD"):

    python benchmarks/quartz_md_ir.py --model data/allegro_pol/SiO2.pt --member 0 \
        --structure data/allegro_pol/SiO2-72-ortho-phrelax.xyz --repeat 3 3 2 --timestep 2 --nve-ps 20 \
        --workdir data/allegro_pol/sio2_md
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

QUARTZ = Path(__file__).resolve().parent.parent / "data" / "quartz"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(QUARTZ / "ensemble.pt"))
    parser.add_argument("--structure", default=str(QUARTZ / "alpha_quartz.cif"))
    parser.add_argument("--repeat", type=int, nargs="+", default=[5],
                        help="unit cells along each axis: one number for all three, or three (default 5)")
    parser.add_argument("--member", type=int, default=None, metavar="K",
                        help="run one member of the ensemble (default: the ensemble's mean)")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs (equilibration, and NVE unless too slow)")
    parser.add_argument("--longest-timestep", type=float, default=None, metavar="FS",
                        help="with --wall-limit-s: if the equilibration's speed says --nve-ps at --timestep would "
                             "not fit the wall limit, run NVE at this timestep instead (it is reported)")
    parser.add_argument("--equilibration-ps", type=float, default=0.5, help="Langevin (friction 0.01/fs)")
    parser.add_argument("--nve-ps", type=float, default=20.0)
    parser.add_argument("--chunk", type=int, default=1000, help="NVE steps between wall-limit checks")
    parser.add_argument("--wall-limit-s", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="quartz_md")
    args = parser.parse_args()
    if len(args.repeat) not in (1, 3) or min(args.repeat) < 1:
        parser.error("--repeat takes one positive number or three")
    repeat = tuple(args.repeat) * (3 if len(args.repeat) == 1 else 1)

    import ase.io
    import polmodel
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.dynamics.fields import StaticField
    from polmodel.dynamics.md import MDSettings, read_trajectory, run_md
    from polmodel.dynamics.polarization_log import polarization_log_path, read_polarization_log

    start = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = polmodel.load(args.model)
    if args.member is not None:
        model = model.members[args.member]
    calculator = PolCalculator(model, efield=np.zeros(3), device=args.device)
    zero_field = StaticField(np.zeros(3))
    equilibration, nve = workdir / "equilibration.xyz", workdir / "nve.xyz"
    equilibration_steps = round(args.equilibration_ps * 1000 / args.timestep)
    common = dict(temperature_K=args.temperature, seed=args.seed, spread_threshold=None)   # MDSettings of both runs

    if nve.exists():
        atoms = read_trajectory(nve, index=-1)[0]   # run_md resumes from the trajectory's checkpoint
    else:
        atoms = ase.io.read(args.structure).repeat(repeat)
        warm_up = max(equilibration_steps // 10, 1)   # the first steps pay for loading and kernel selection
        for steps in (warm_up, equilibration_steps):
            warmed = time.perf_counter()
            settings = MDSettings(steps=steps, timestep_fs=args.timestep, thermostat="langevin", friction=0.01,
                                  interval=warm_up, **common)
            atoms = run_md(atoms, calculator, zero_field, settings, trajectory_path=equilibration, progress=False)
    equilibrated = time.perf_counter()
    timestep = args.timestep
    if args.longest_timestep and args.wall_limit_s and not nve.exists():
        seconds_per_step = (equilibrated - warmed) / (equilibration_steps - warm_up)
        if seconds_per_step * args.nve_ps * 1000 / timestep > args.wall_limit_s - (equilibrated - start):
            timestep = args.longest_timestep
    elif nve.exists():
        timestep = float(read_trajectory(nve, index=0)[0].info["md_timestep_fs"])
    nve_steps = round(args.nve_ps * 1000 / timestep)

    done, first_step = 0, None
    while done < nve_steps:
        if args.wall_limit_s is not None and done and time.perf_counter() - start > args.wall_limit_s:
            break
        recorded = read_polarization_log(polarization_log_path(nve))[1]["step"] if nve.exists() else [0]
        first_step = int(recorded[-1]) if first_step is None else first_step
        target = min(nve_steps, int(recorded[-1]) + args.chunk)
        chunk_start = time.perf_counter()
        settings = MDSettings(steps=target, timestep_fs=timestep, thermostat="nve", interval=args.chunk, **common)
        atoms = run_md(atoms, calculator, zero_field, settings, trajectory_path=nve, progress=False)
        done = target
        print(json.dumps({"nve_step": done, "chunk_s": round(time.perf_counter() - chunk_start, 1)}), flush=True)

    _, log = read_polarization_log(polarization_log_path(nve))
    conserved = np.asarray(log["energy"]) + np.asarray(log["kinetic_energy"])
    nve_wall = time.perf_counter() - equilibrated
    print(json.dumps({
        "atoms": len(atoms), "device": str(calculator.device), "timestep_fs": timestep,
        "equilibration_ps": args.equilibration_ps, "nve_ps": float(log["time_fs"][-1] / 1000),
        "ms_per_nve_step": round(1000 * nve_wall / max(done - (first_step or 0), 1), 2),
        "mean_temperature_K": float(np.mean(log["temperature"])),
        "conserved_energy_drift_meV_per_atom_per_ps": float(
            1000 * np.polyfit(np.asarray(log["time_fs"]) / 1000, conserved, 1)[0] / len(atoms)),
        "conserved_energy_std_meV_per_atom": float(1000 * np.std(conserved) / len(atoms)),
        "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
