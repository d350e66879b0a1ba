"""`polmodel md` at scale: one run of the command on a large BaTiO3 supercell under a cosine field.

Builds the cell with benchmarks/scale.py's helpers (cubic BaTiO3, rattled by 0.03 Å), saves an untrained default
PolModel (float32, --cutoff), and runs `polmodel md` in this process through its command-line entry point, so
that the figures are the command's own: wall time, CPU time (user + system), peak resident memory (ru_maxrss),
the number and mean time of model calls, and the share of the wall time spent building neighbour lists (every
vesin search: the whole cell's on the one-shot path; the chunks' open clusters and the overlap check at
min_distance on the chunked path) and, on the chunked path, building the chunks' halos (images and their
neighbour lists). The run writes OUTPUT, OUTPUT.polarization.csv (one row per step) and OUTPUT.restart.npz.

    python benchmarks/md_scale.py --repeat 30 --steps 3 --memory-limit-gb 5 --workdir /tmp/md_scale

Measured (issue 15; shared 2-core CPU with a DFT campaign running beside it, `nice -n 15`): see the README's MD
section. Prints one JSON line; no assertions.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import supercell  # noqa: E402


class _Timer:
    """Wraps module-level functions and adds up the time spent in them (nested calls counted once)."""

    def __init__(self):
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def wrap(self, module, name):
        function = getattr(module, name)

        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1
        setattr(module, name, timed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30, help="unit cells along each axis (5 atoms each)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-limit-gb", type=float, default=5.0)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="md_scale")
    parser.add_argument("--small-model", action="store_true",
                        help="num_features 8, lmax 1, one layer (a 5 Å halo) instead of the default architecture")
    args = parser.parse_args()

    import torch

    from polmodel.cli import main as polmodel_main
    from polmodel.data import graphs, neighbors
    from polmodel.dynamics import calculator as calculator_module
    from polmodel.nn import chunked
    from polmodel.nn.model import PolModel
    from polmodel.nn.serialization import save

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model_path, structure, output = workdir / "model.pt", workdir / "start.xyz", workdir / "traj.xyz"
    size = dict(num_features=8, lmax=1, num_layers=1) if args.small_model else {}
    save(PolModel(["Ba", "Ti", "O"], args.cutoff, **size), model_path)
    atoms = supercell("batio3", args.repeat)
    atoms.write(structure)
    del atoms

    searches, chunk_building, model_calls = _Timer(), _Timer(), _Timer()
    searches.wrap(neighbors, "neighbor_list")           # the overlap check's (chunked path)
    searches.wrap(graphs, "neighbor_list")              # the one-shot graph's
    searches.wrap(chunked, "open_boundary_pairs")       # each chunk's
    chunk_building.wrap(chunked, "build_chunk")         # images in the halo + their neighbour list
    model_calls.wrap(calculator_module.PolCalculator, "calculate")
    field = json.dumps({"kind": "cosine", "amplitude": 0.02, "period_fs": 100.0, "axis": [0, 0, 1]})
    argv = ["md", "--model", str(model_path), "--structure", str(structure), "--output", str(output),
            "--steps", str(args.steps), "--interval", "1", "--timestep", "1", "--thermostat", "nve",
            "--temperature", "300", "--field", field, "--memory-limit-gb", str(args.memory_limit_gb),
            "--dtype", "float32", "--no-restart", "--quiet"]
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    status = polmodel_main(argv)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rows = (output.parent / f"{output.name}.polarization.csv").read_text().splitlines()
    print(json.dumps({
        "exit_status": status, "model": "small" if args.small_model else "default", "atoms": 5 * args.repeat ** 3, "steps": args.steps, "threads": args.threads,
        "memory_limit_gb": args.memory_limit_gb, "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "model_calls": model_calls.calls, "model_call_s_mean": round(model_calls.seconds / max(model_calls.calls, 1), 1),
        "neighbour_search_s": round(searches.seconds, 1),
        "neighbour_search_fraction_of_wall": round(searches.seconds / wall, 4),
        "chunk_building_s": round(chunk_building.seconds, 1),
        "chunk_building_fraction_of_wall": round(chunk_building.seconds / wall, 4),
        "polarization_rows": len(rows) - 2, "last_row": rows[-1][:160],
        "trajectory_bytes": output.stat().st_size}))


if __name__ == "__main__":
    main()
