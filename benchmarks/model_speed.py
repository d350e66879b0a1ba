"""Speed and memory of polmodel (through PolCalculator) on cubic BaTiO3 supercells.

Per size, the median time of `--repeats` calls (after two untimed calls, the first of which measures memory) for
  (a) E+F at zero field, (b) E+F+P at a finite field, (c) (b) + Born charges, (d) (b) + polarizability.
Each includes the neighbour list. Memory: peak resident memory above the baseline before the call (a psutil
sampler thread; tracemalloc does not see torch's allocator) on CPU, torch.cuda.max_memory_allocated on GPU. The
scaling exponent is the slope of log t vs log N over the sizes with N >= --fit-min-atoms.

    python benchmarks/model_speed.py --max-atoms 20000 --repeats 3 --json polmodel.json
    python benchmarks/model_speed.py --against 0d343c3     # the default model now against an older revision's
The MACE comparison runs in its own environment (mace-torch pins e3nn 0.4.4, polmodel needs a newer one):
benchmarks/mace_speed.py reads the --json file and times a MACE model of comparable size on the same cells.
`make bench` runs both.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import SPECIES, batio3_supercell, supercell_repeats, timed  # noqa: E402

from polmodel.dynamics.calculator import PolCalculator  # noqa: E402
from polmodel.nn.model import PolModel  # noqa: E402

def compare_revisions(revision, *, rounds, calls, repeat):
    """Side by side: the working tree's default PolModel against the one at `revision` (a git worktree made for
    the run), on the same 5·repeat³-atom cell, in alternating one-thread processes (`revision_timing.py`), so that
    a change of the machine's load hits both alike. Prints best and median CPU times and their ratios."""
    import statistics
    import subprocess
    import tempfile

    here = Path(__file__).resolve().parent
    root = here.parent
    worker = here / "revision_timing.py"
    results = {"current": {"ef": [], "efp": []}, revision: {"ef": [], "efp": []}}
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "old"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(worktree), revision], check=True,
                       capture_output=True)
        try:
            for _ in range(rounds):
                for label, checkout in (("current", root), (revision, worktree)):
                    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
                    done = subprocess.run([sys.executable, str(worker), str(checkout), "--calls", str(calls),
                                           "--repeat", str(repeat)], check=True, capture_output=True, text=True,
                                          env=environment)
                    record = json.loads(done.stdout.strip().splitlines()[-1])
                    if not record["polmodel"].startswith(str(checkout)):
                        raise RuntimeError(f"{label}: imported {record['polmodel']}, not the checkout's polmodel")
                    for kind, values in record["times_s"].items():
                        results[label][kind].extend(values)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    print(f"default PolModel on {5 * repeat ** 3}-atom BaTiO3, one thread, CPU time per call; {rounds} alternating "
          f"rounds of {calls} calls each")
    print(f"{'':>10} {'current best':>13} {'median':>8} {revision + ' best':>13} {'median':>8} {'ratio best':>11} "
          f"{'ratio median':>13}")
    for kind, name in (("ef", "E+F"), ("efp", "E+F+P")):
        new, old = results["current"][kind], results[revision][kind]
        print(f"{name:>10} {min(new) * 1e3:11.1f}ms {statistics.median(new) * 1e3:6.1f}ms "
              f"{min(old) * 1e3:11.1f}ms {statistics.median(old) * 1e3:6.1f}ms {min(new) / min(old):11.2f} "
              f"{statistics.median(new) / statistics.median(old):13.2f}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default=None, metavar="REVISION",
                        help="instead of the size ladder: time the default model of the working tree against the one "
                             "at this git revision side by side (320 atoms, one thread; ratios > 1 are slower now)")
    parser.add_argument("--rounds", type=int, default=3, help="--against: alternating rounds per revision")
    parser.add_argument("--max-atoms", type=int, default=None,
                        help="largest supercell (default 20,480 on CPU, 10^6 on GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size and mode (median)")
    parser.add_argument("--repeat-sizes", default=None,
                        help="comma-separated supercell repeats n (5n³ atoms) instead of the default ladder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--lmax", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--field", type=float, default=0.01, help="finite field along z, V/Å")
    parser.add_argument("--second-order-max-atoms", type=int, default=None,
                        help="skip (c) and (d) above this size (default: no limit)")
    parser.add_argument("--fit-min-atoms", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's own; 1 gives the least noisy CPU times)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.against:
        compare_revisions(args.against, rounds=args.rounds, calls=max(args.repeats, 9), repeat=4)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_atoms = args.max_atoms or (1_000_000 if device.type == "cuda" else 20_480)
    torch.manual_seed(0)
    model = PolModel(SPECIES, args.cutoff, num_features=args.features, lmax=args.lmax, num_layers=args.layers)
    zero_field = PolCalculator(model, device=device, keep_heap=True)
    finite_field = PolCalculator(model, efield=(0.0, 0.0, args.field), device=device, keep_heap=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cutoff {args.cutoff} Å, polmodel {model.architecture} ({count(model)} parameters)")

    base = ("energy", "forces", "dipole", "polarization")
    rows = []
    repeats = [int(n) for n in args.repeat_sizes.split(",")] if args.repeat_sizes else supercell_repeats(
        max_atoms, device)
    for repeat in repeats:
        atoms = batio3_supercell(repeat)
        n = len(atoms)
        row = {"repeat": repeat, "atoms": n}
        clock = 1 if device.type == "cpu" else 0  # CPU seconds on CPU, wall seconds on GPU
        measure = lambda function: (lambda r: (r[clock], r[2], r[0]))(timed(function, args.repeats, device))  # noqa: E731,E501
        row["a_s"], row["a_mib"], row["a_wall_s"] = measure(lambda: zero_field.calculate(atoms, ["energy", "forces"]))
        row["b_s"], row["b_mib"], _ = measure(lambda: finite_field.calculate(atoms, list(base)))
        second_order = args.second_order_max_atoms is None or n <= args.second_order_max_atoms
        if second_order:
            row["c_s"], row["c_mib"], _ = measure(
                lambda: finite_field.calculate(atoms, [*base, "born_effective_charges"]))
            row["d_s"], row["d_mib"], _ = measure(lambda: finite_field.calculate(atoms, [*base, "polarizability"]))
        rows.append(row)
        print(_format_row(row), flush=True)
    print()
    print(_table(rows, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
                       "cutoff": args.cutoff, "species": SPECIES, "hyperparameters": model.architecture,
                       "rows": rows}, handle, indent=1)


def _format_row(row):
    cells = [f"{row['atoms']:>8d}"]
    for key in ("a", "b", "c", "d"):
        cells.append(f"{row[key + '_s'] * 1e3:10.1f}" if key + "_s" in row else f"{'-':>10}")
    return " ".join(cells)


def _table(rows, args):
    header = (f"{'atoms':>8} {'a E+F ms':>10} {'b +P ms':>10} {'c +Z* ms':>10} {'d +α ms':>10} "
              f"{'b/a':>6} {'c/b':>6} {'d/b':>6} {'atom-step/s':>12} {'mem a MiB':>10} {'mem c MiB':>10} "
              f"{'wall a ms':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = lambda x, y: f"{row[x + '_s'] / row[y + '_s']:6.2f}" if x + "_s" in row and y + "_s" in row else f"{'-':>6}"  # noqa: E731,E501
        mem = lambda key, width: f"{row[key]:{width}.0f}" if key in row else f"{'-':>{width}}"  # noqa: E731
        lines.append(f"{_format_row(row)} {ratio('b', 'a')} {ratio('c', 'b')} {ratio('d', 'b')} "
                     f"{row['atoms'] / row['a_s']:12.0f} {mem('a_mib', 10)} {mem('c_mib', 10)} "
                     f"{row['a_wall_s'] * 1e3:10.1f}")
    lines.append("a: E+F at zero field; b: E+F+P at ε = (0, 0, %g) V/Å; c: b + Born charges; d: b + polarizability;"
                 % args.field)
    lines.append("Times: medians of %d calls after two untimed ones (the first measures memory), CPU time of the "
                 "computing thread on CPU (wall time on GPU); 'wall a' is the wall-clock median. "
                 "atom-step/s from (a); memory: peak above the pre-call baseline" % args.repeats)
    large = [row for row in rows if row["atoms"] >= args.fit_min_atoms]
    for key, name in (("a", "polmodel E+F"), ("b", "polmodel E+F+P"), ("c", "polmodel +Z*")):
        points = [(row["atoms"], row[key + "_s"]) for row in large if key + "_s" in row]
        if len(points) >= 2:
            slope = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]
            lines.append(f"scaling exponent {name}: t ∝ N^{slope:.2f} (fit over {len(points)} sizes, "
                         f"N >= {args.fit_min_atoms})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
