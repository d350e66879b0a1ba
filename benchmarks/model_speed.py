"""Speed and memory of polmodel (through PolCalculator) on cubic BaTiO3 supercells, against MACE.

Per size, the median time of `--repeats` calls (after two untimed calls, the first of which measures memory) for
  (a) E+F at zero field, (b) E+F+P at a finite field, (c) (b) + Born charges, (d) (b) + polarizability,
and for a MACE model of comparable size (mace.modules.MACE built with the same channels, lmax, layers and
cutoff, random weights; E+F from its own forward(compute_force=True)). Both include the neighbour list
(the same vesin call), so the ratio compares whole force calls. Memory: peak resident memory above the
baseline before the call (a psutil sampler thread; tracemalloc does not see torch's allocator) on CPU,
torch.cuda.max_memory_allocated on GPU. The scaling exponent is the slope of log t vs log N over the sizes
with N >= --fit-min-atoms.

    python benchmarks/model_speed.py --max-atoms 20000 --repeats 3
Needs mace-torch (pip install -e '.[bench]'); without it the MACE columns are skipped with a note.
"""
import argparse
import json
import statistics
import threading
import time

import numpy as np
import torch
from ase.build import bulk

from polmodel.data.neighbors import neighbor_list
from polmodel.dynamics.calculator import PolCalculator
from polmodel.nn.model import PolModel
from polmodel.runtime.allocator import release_freed_memory

SPECIES = ["Ba", "Ti", "O"]


def batio3_supercell(repeat, lattice=4.0):
    """Cubic perovskite BaTiO3 (5 atoms) repeated repeat³ times, atoms rattled so forces are non-zero."""
    from ase import Atoms
    unit = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                            (0, 0.5, 0.5)], cell=np.eye(3) * lattice, pbc=True)
    atoms = unit.repeat((repeat,) * 3)
    atoms.rattle(0.03, seed=repeat)
    return atoms


class PeakMemory:
    """Peak of (CPU resident memory | CUDA allocated memory) above the value at entry, in MiB."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        import psutil
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.baseline) / 2 ** 20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.mib = (self.peak - self.baseline) / 2 ** 20


def _release_freed_memory():
    """Return freed heap pages to the OS so that a call's resident-memory peak is measured from a clean baseline."""
    import gc
    gc.collect()
    release_freed_memory()


def _cpu_clock():
    # With one torch thread all work (autograd included) runs on the calling thread; its CPU time excludes the
    # memory sampler thread and other processes. With more threads, the process's CPU time is the best proxy.
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def timed(function, repeats, device):
    """Medians (wall seconds, CPU seconds of this process) of `repeats` calls, and the peak MiB of one call.

    The memory call comes first, after freed memory went back to the OS; it and one more untimed call are the
    warm-up. The timed calls follow without handing memory back: an MD loop reuses the memory of its previous
    step, and a call on memory handed back to the OS pays a page fault per fresh page. The heap needs two calls
    to settle (E+F at 20,480 atoms, one thread: 25.2 s, 8.0 s, then 3.66 and 3.64 s).
    CPU time is what the table reports: on a shared machine it is far less sensitive to other processes
    than wall time (with one torch thread the two agree on an idle machine)."""
    _release_freed_memory()
    with PeakMemory(device) as meter:
        function()
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_clock()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(_cpu_clock() - cpu)
    return statistics.median(walls), statistics.median(cpus), meter.mib


def build_mace(hyperparameters, cutoff, device):
    from e3nn import o3
    from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    f, lmax = hyperparameters["num_features"], hyperparameters["lmax"]
    # node features up to polmodel's feature lmax (when it has one), edge harmonics up to its lmax
    feature_lmax = hyperparameters.get("feature_lmax", lmax)
    hidden = o3.Irreps([(f, (l, (-1) ** l)) for l in range(feature_lmax + 1)])
    model = MACE(r_max=cutoff, num_bessel=hyperparameters["num_radial"],
                 num_polynomial_cutoff=hyperparameters["polynomial_degree"], max_ell=lmax,
                 interaction_cls=RealAgnosticResidualInteractionBlock,
                 interaction_cls_first=RealAgnosticInteractionBlock, num_interactions=hyperparameters["num_layers"],
                 num_elements=len(SPECIES), hidden_irreps=hidden,
                 MLP_irreps=o3.Irreps(f"{hyperparameters['readout_hidden']}x0e"),
                 atomic_energies=np.zeros(len(SPECIES)), avg_num_neighbors=hyperparameters["avg_num_neighbors"],
                 atomic_numbers=[8, 22, 56], correlation=3, gate=torch.nn.functional.silu,
                 radial_MLP=[hyperparameters["radial_hidden"]] * 3)
    return model.to(device).eval()


def mace_energy_forces(model, atoms, cutoff, device):
    """One MACE E+F call including the neighbour list, as PolCalculator does it."""
    edge_index, cell_shift = neighbor_list(atoms.get_positions(), np.array(atoms.cell), atoms.pbc, cutoff)
    # polmodel's edge_index is [i, j] with r_ij = r_j - r_i + S·cell; MACE's vectors are
    # positions[edge_index[1]] - positions[edge_index[0]] + shifts, so the same array works as is.
    cell = torch.tensor(np.array(atoms.cell), dtype=torch.get_default_dtype(), device=device)
    unit_shifts = torch.tensor(cell_shift, dtype=torch.get_default_dtype(), device=device)
    index = {8: 0, 22: 1, 56: 2}
    species = torch.tensor([index[z] for z in atoms.numbers], device=device)
    data = {"positions": torch.tensor(atoms.get_positions(), dtype=torch.get_default_dtype(), device=device),
            "node_attrs": torch.nn.functional.one_hot(species, len(SPECIES)).to(torch.get_default_dtype()),
            "edge_index": torch.as_tensor(edge_index, device=device), "unit_shifts": unit_shifts,
            "shifts": unit_shifts @ cell, "cell": cell, "batch": torch.zeros(len(atoms), dtype=torch.long,
                                                                            device=device),
            "ptr": torch.tensor([0, len(atoms)], device=device)}
    out = model(data, training=False, compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--no-mace", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_atoms = args.max_atoms or (1_000_000 if device.type == "cuda" else 20_480)
    torch.manual_seed(0)
    model = PolModel(SPECIES, args.cutoff, num_features=args.features, lmax=args.lmax, num_layers=args.layers)
    zero_field = PolCalculator(model, device=device, keep_heap=True)
    finite_field = PolCalculator(model, efield=(0.0, 0.0, args.field), device=device, keep_heap=True)
    mace, mace_note = None, ""
    if not args.no_mace:
        try:
            mace = build_mace(model.hyperparameters, args.cutoff, device)
        except ImportError as error:
            mace_note = f"MACE skipped: {error} (pip install -e '.[bench]')"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cutoff {args.cutoff} Å, polmodel {model.hyperparameters} ({count(model)} parameters)")
    if mace is not None:
        feature_lmax = model.hyperparameters.get("feature_lmax", args.lmax)
        print(f"MACE: hidden irreps {args.features}x(0..{feature_lmax}), "
              f"max_ell {args.lmax}, {args.layers} interactions, correlation 3 "
              f"({count(mace)} parameters)")
    elif mace_note:
        print(mace_note)

    base = ("energy", "forces", "dipole", "polarization")
    rows = []
    repeats = [int(n) for n in args.repeat_sizes.split(",")] if args.repeat_sizes else supercell_repeats(
        max_atoms, device)
    for repeat in repeats:
        atoms = batio3_supercell(repeat)
        n = len(atoms)
        row = {"atoms": n}
        clock = 1 if device.type == "cpu" else 0  # CPU seconds on CPU, wall seconds on GPU
        measure = lambda function: (lambda r: (r[clock], r[2], r[0]))(timed(function, args.repeats, device))  # noqa: E731,E501
        row["a_s"], row["a_mib"], row["a_wall_s"] = measure(lambda: zero_field.calculate(atoms, ["energy", "forces"]))
        row["b_s"], row["b_mib"], _ = measure(lambda: finite_field.calculate(atoms, list(base)))
        second_order = args.second_order_max_atoms is None or n <= args.second_order_max_atoms
        if second_order:
            row["c_s"], row["c_mib"], _ = measure(
                lambda: finite_field.calculate(atoms, [*base, "born_effective_charges"]))
            row["d_s"], row["d_mib"], _ = measure(lambda: finite_field.calculate(atoms, [*base, "polarizability"]))
        if mace is not None:
            row["mace_s"], row["mace_mib"], row["mace_wall_s"] = measure(
                lambda: mace_energy_forces(mace, atoms, args.cutoff, device))
        rows.append(row)
        print(_format_row(row), flush=True)
    print()
    print(_table(rows, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "rows": rows, "hyperparameters": model.hyperparameters}, handle,
                      indent=1)


def supercell_repeats(max_atoms, device):
    """Supercell repeats n (5n³ atoms): 40, 135, 320, 1080, 2560, 8640, 20480 atoms, and on GPU on to ~10^6."""
    ladder = [2, 3, 4, 6, 8, 12, 16] + ([24, 32, 40, 50, 59] if device.type == "cuda" else [24, 32])
    return [n for n in ladder if 5 * n ** 3 <= max_atoms]


def _format_row(row):
    cells = [f"{row['atoms']:>8d}"]
    for key in ("a", "b", "c", "d", "mace"):
        cells.append(f"{row[key + '_s'] * 1e3:10.1f}" if key + "_s" in row else f"{'-':>10}")
    return " ".join(cells)


def _table(rows, args):
    header = (f"{'atoms':>8} {'a E+F ms':>10} {'b +P ms':>10} {'c +Z* ms':>10} {'d +α ms':>10} {'MACE ms':>10} "
              f"{'b/a':>6} {'c/b':>6} {'d/b':>6} {'a/MACE':>7} {'atom-step/s':>12} {'mem a MiB':>10} "
              f"{'mem c MiB':>10} {'mem MACE':>9} {'wall a ms':>10} {'wall MACE':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = lambda x, y: f"{row[x + '_s'] / row[y + '_s']:6.2f}" if x + "_s" in row and y + "_s" in row else f"{'-':>6}"  # noqa: E731,E501
        mem = lambda key, width: f"{row[key]:{width}.0f}" if key in row else f"{'-':>{width}}"  # noqa: E731
        lines.append(f"{_format_row(row)} {ratio('b', 'a')} {ratio('c', 'b')} {ratio('d', 'b')} "
                     f"{ratio('a', 'mace'):>7} {row['atoms'] / row['a_s']:12.0f} {mem('a_mib', 10)} "
                     f"{mem('c_mib', 10)} {mem('mace_mib', 9)} {row['a_wall_s'] * 1e3:10.1f} "
                     f"{row['mace_wall_s'] * 1e3 if 'mace_wall_s' in row else float('nan'):10.1f}")
    lines.append("a: E+F at zero field; b: E+F+P at ε = (0, 0, %g) V/Å; c: b + Born charges; d: b + polarizability;"
                 % args.field)
    lines.append("MACE: E+F, same neighbour list. Times: medians of %d calls after two untimed ones "
                 "(the first measures memory), CPU time of the computing thread on CPU (wall time on GPU); "
                 "'wall' columns are wall-clock medians. atom-step/s from (a); "
                 "memory: peak above the pre-call baseline" % args.repeats)
    large = [row for row in rows if row["atoms"] >= args.fit_min_atoms]
    for key, name in (("a", "polmodel E+F"), ("b", "polmodel E+F+P"), ("c", "polmodel +Z*"),
                      ("mace", "MACE E+F")):
        points = [(row["atoms"], row[key + "_s"]) for row in large if key + "_s" in row]
        if len(points) >= 2:
            slope = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]
            lines.append(f"scaling exponent {name}: t ∝ N^{slope:.2f} (fit over {len(points)} sizes, "
                         f"N >= {args.fit_min_atoms})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
