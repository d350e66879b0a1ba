"""How polmodel scales with the cell: BaTiO3 and α-quartz from 10³ to 10⁶ atoms, one shot and in chunks.

Each (structure, size, mode) runs in its own subprocess (so that peak memory is that call's alone):
PolCalculator with a random (untrained) default PolModel (float32, cutoff --cutoff), at a finite field, E+F+P
(`get_forces` computes energy, forces, stress and dipole together). Per run: the time of one call (median of
--repeats calls after one untimed call, or of one call with --repeats 0; the positions move a little before
each, so nothing is cached; the neighbour list is part of the call), atom-steps/s (atoms / time), the peak
resident memory of the process (ru_maxrss) and its increase over the process before the first call per atom;
on a GPU the peak allocated GPU memory as well. Modes: "auto" (the calculator's own choice: one shot when the
cell fits the budget, else chunks), "one-shot" (memory_limit_gb huge), "chunked" (the budget set to what 2×2×2
chunks need, so the calculator cuts the cell into eight chunks). The scaling exponent is the slope of log t
against log N over the sizes ≥ --fit-min-atoms.

Measured (numbers in the notes of issue 15): one NVIDIA H200, default budget: 1,026,895-atom BaTiO3 in 2×2×2
chunks, 31.0 s per E+F+P call (33,100 atom-steps/s, 45 GB of GPU memory); on the shared 2-core CPU, one-shot
calls take ~440 KB per atom, and a 109,760-atom cell with --memory-limit-gb 3 peaked at 2.81 GB.

    python benchmarks/scale.py --sizes 6 13 28 --memory-limit-gb 3                   # CPU table
    python benchmarks/scale.py --structures batio3 --sizes 59 --memory-limit-gb 8 --repeats 0  # 10⁶ atoms
    python benchmarks/scale.py --device cuda --max-atoms 1100000
    python benchmarks/scale.py --measure-memory       # bytes per edge for polmodel/nn/chunked.py's BYTES_PER_EDGE
Prints a table; no assertions.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

STRUCTURES = {
    # cubic perovskite, a = 4.0 Å, 5 atoms
    "batio3": dict(species=["Ba", "Ti", "O"], atoms_per_cell=5),
    # α-quartz P3₂21, a = 4.916 Å, c = 5.405 Å, 9 atoms
    "quartz": dict(species=["Si", "O"], atoms_per_cell=9),
}
# repeats n of the unit cell (n³ cells) giving ~10³, 10⁴, 10⁵, 10⁶ atoms (and points between)
REPEATS = {"batio3": [6, 9, 13, 19, 28, 40, 59], "quartz": [5, 7, 11, 15, 23, 32, 49]}


def unit_cell(name):
    from ase import Atoms
    if name == "batio3":
        return Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True)
    from ase.spacegroup import crystal
    return crystal(["Si", "O"], basis=[(0.4697, 0.0, 2.0 / 3.0), (0.4135, 0.2669, 0.7858)], spacegroup=154,
                   cellpar=[4.916, 4.916, 5.405, 90, 90, 120])


def supercell(name, repeat, seed=0):
    atoms = unit_cell(name).repeat((repeat,) * 3)
    atoms.rattle(0.03, seed=seed)
    return atoms


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def run_one(args):
    """Child process: one structure, size and mode; prints one JSON line."""
    import torch
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.nn import chunked
    from polmodel.nn.model import PolModel

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.progress:   # per-chunk lines and the peak memory so far, on stderr, for runs that may not finish
        import logging
        import threading
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

        def report_peak():
            while True:
                print(f"{time.strftime('%H:%M:%S')} peak RSS so far {peak_rss_bytes() / 1e9:.2f} GB",
                      file=sys.stderr, flush=True)
                time.sleep(30)
        threading.Thread(target=report_peak, daemon=True).start()
    spec = STRUCTURES[args.structure]
    torch.manual_seed(0)
    model = PolModel(spec["species"], args.cutoff).to(device)
    atoms = supercell(args.structure, args.repeat)
    geometry = chunked.cell_geometry(atoms.positions, atoms.cell[:], atoms.pbc)
    eight_chunks_gb = chunked.estimated_chunk_bytes(model, geometry, (2, 2, 2), torch.float32) / 1e9
    limit = {"one-shot": 1e6, "chunked": 1.001 * eight_chunks_gb, "auto": args.memory_limit_gb}[args.mode]
    if limit is None:
        limit = chunked.default_memory_limit_gb(device)
    calc = PolCalculator(model, efield=(0.01, -0.005, 0.02), memory_limit_gb=limit)
    atoms.calc = calc
    plan = chunked.plan_for_cell(model, atoms.positions, atoms.cell[:], atoms.pbc, limit, dtype=torch.float32,
                                 device=device)
    rng = np.random.default_rng(1)
    baseline = peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    untimed = 1 if args.repeats else 0   # --repeats 0: one call, timed (the 10⁶-atom run)
    for call in range(max(args.repeats, 1) + untimed):
        atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forces = atoms.get_forces()
        atoms.calc.results["dipole"]  # noqa: B018  (computed with the forces)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if call >= untimed:
            times.append(elapsed)
        assert np.all(np.isfinite(forces))
    peak = peak_rss_bytes()
    out = dict(structure=args.structure, atoms=len(atoms), mode=args.mode, grid=list(plan.grid),
               one_shot=plan.one_shot, memory_limit_gb=limit, seconds=float(np.median(times)),
               peak_rss_gb=peak / 1e9, rss_increase_per_atom_kb=(peak - baseline) / len(atoms) / 1e3)
    if device.type == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out), flush=True)


def measure_memory(args):
    """Child: peak RSS increase per edge of one one-shot call (E+F+P, + Born charges, + α) in float32."""
    import torch
    from polmodel.data.graphs import atoms_to_graph
    from polmodel.nn.model import PolModel
    from polmodel.nn.response import compute_response

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PolModel(STRUCTURES[args.structure]["species"], args.cutoff)
    atoms = supercell(args.structure, args.repeat)
    graph = atoms_to_graph(atoms, model.species, model.cutoff, efield=(0.01, 0, 0))
    edges = graph["edge_index"].shape[1]
    baseline = peak_rss_bytes()
    flags = {"first_order": {}, "born_charges": {"born_charges": True},
             "polarizability": {"polarizability": True}}[args.mode]
    compute_response(model, graph, **flags)
    print(json.dumps(dict(structure=args.structure, atoms=len(atoms), edges=edges, mode=args.mode,
                          bytes_per_edge=(peak_rss_bytes() - baseline) / edges,
                          edges_per_atom=edges / len(atoms))), flush=True)


def child(args, **overrides):
    argv = [sys.executable, __file__, "--child"]
    settings = {**vars(args), **overrides}
    for name in ("device", "cutoff", "threads", "repeats", "memory_limit_gb", "structure", "repeat", "mode"):
        argv += [f"--{name.replace('_', '-')}", str(settings[name])]
    if settings.get("measure"):
        argv.append("--measure-memory")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=args.child_timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {"structure": settings["structure"], "repeat": settings["repeat"], "mode": settings["mode"],
                "error": " | ".join(tail) or f"exit {result.returncode}"}
    return json.loads(lines[-1])


def slope(points):
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--sizes", type=int, nargs="*", help="unit-cell repeats (default: by --max-atoms)")
    parser.add_argument("--max-atoms", type=float, default=1.2e5)
    parser.add_argument("--compare-max-atoms", type=float, default=1.2e4,
                        help="also run one-shot and chunked side by side up to this size")
    parser.add_argument("--memory-limit-gb", type=lambda text: None if text == "None" else float(text),
                        default=None, help="budget of the 'auto' runs (default: the calculator's own, half of "
                                           "the device's available memory)")
    parser.add_argument("--fit-min-atoms", type=float, default=5e3)
    parser.add_argument("--child-timeout", type=float, default=3600)
    parser.add_argument("--measure-memory", action="store_true")
    parser.add_argument("--json", help="append every result as a JSON line to this file")
    parser.add_argument("--time-budget-s", type=float, default=math.inf,
                        help="start no new run after this many seconds (sizes run smallest first)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--structure", default="batio3", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=6, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_memory(args) if args.measure_memory else run_one(args)

    if args.measure_memory:
        print("peak RSS increase per edge, one-shot compute_response, float32, default model")
        for repeat in args.sizes or [6, 9]:
            for mode in ("first_order", "born_charges", "polarizability"):
                print(json.dumps(child(args, structure=args.structures[0], repeat=repeat, mode=mode,
                                       measure=True)), flush=True)
        return

    print(f"device {args.device}, {args.threads} thread(s), cutoff {args.cutoff} Å, float32 default PolModel "
          f"(random weights), E+F+P at a finite field; 'auto' budget "
          f"{'the default' if args.memory_limit_gb is None else f'{args.memory_limit_gb} GB'}")
    header = (f"{'structure':9s} {'atoms':>9s} {'mode':9s} {'grid':9s} {'s/call':>9s} {'atom-steps/s':>12s} "
              f"{'peak RSS GB':>11s} {'KB/atom':>8s} {'GPU GB':>7s}")
    print(header, flush=True)
    results = []
    started = time.perf_counter()
    for name in args.structures:
        per_cell = STRUCTURES[name]["atoms_per_cell"]
        repeats = args.sizes or [n for n in REPEATS[name] if per_cell * n ** 3 <= args.max_atoms]
        for repeat in repeats:
            atoms = per_cell * repeat ** 3
            modes = ["one-shot", "chunked"] if atoms <= args.compare_max_atoms else ["auto"]
            for mode in modes:
                if time.perf_counter() - started > args.time_budget_s:
                    print(f"{name:9s} {atoms:9d} {mode:9s} skipped: --time-budget-s spent", flush=True)
                    continue
                row = child(args, structure=name, repeat=repeat, mode=mode)
                results.append(row)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                if "error" in row:
                    print(f"{name:9s} {atoms:9d} {mode:9s} failed: {row['error']}", flush=True)
                    continue
                grid = "whole" if row["one_shot"] else "x".join(map(str, row["grid"]))
                print(f"{name:9s} {row['atoms']:9d} {mode:9s} {grid:9s} {row['seconds']:9.3f} "
                      f"{row['atoms'] / row['seconds']:12.0f} {row['peak_rss_gb']:11.2f} "
                      f"{row['rss_increase_per_atom_kb']:8.1f} {row.get('gpu_peak_gb', float('nan')):7.2f}",
                      flush=True)
    for name in args.structures:
        ok = [r for r in results if r["structure"] == name and "error" not in r]
        fit = [(r["atoms"], r["seconds"]) for r in ok if r["atoms"] >= args.fit_min_atoms and r["mode"] != "chunked"]
        print(f"{name}: time ∝ N^{slope(fit):.2f} over N ≥ {args.fit_min_atoms:g} (one-shot/auto runs)")
        for row in ok:
            if row["mode"] == "chunked":
                whole = [r for r in ok if r["atoms"] == row["atoms"] and r["mode"] == "one-shot"]
                if whole:
                    print(f"  {row['atoms']} atoms: chunked {'x'.join(map(str, row['grid']))} / one-shot time "
                          f"{row['seconds'] / whole[0]['seconds']:.2f}, peak RSS "
                          f"{row['peak_rss_gb']:.2f} vs {whole[0]['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
