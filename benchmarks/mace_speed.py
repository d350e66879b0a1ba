"""Speed and memory of a MACE model comparable to a benchmarks/model_speed.py run, on the same BaTiO3 cells.

Reads model_speed.py's --json file (polmodel's architecture under "hyperparameters", cutoff, supercells, device,
threads and times) and builds mace.modules.MACE with the same channels, lmax, layers and cutoff (random weights);
times E+F from its own forward(compute_force=True), including the neighbour list (the same vesin call as
PolCalculator), the way model_speed.py times polmodel (benchmarks/measurement.py), and prints MACE's figures beside
polmodel's (a).

mace-torch pins e3nn 0.4.4 and polmodel a newer e3nn, so this runs in an environment of its own: `make bench`
builds .venv-bench (torch, mace-torch, polmodel without its dependencies for the neighbour list) and runs
    .venv-bench/bin/python benchmarks/mace_speed.py --polmodel-json build/bench/polmodel.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import SPECIES, batio3_supercell, timed  # noqa: E402

from polmodel.data.neighbors import neighbor_list  # noqa: E402
from polmodel.runtime.allocator import keep_freed_memory_in_heap  # noqa: E402


def build_mace(architecture, cutoff, device):
    # mace before e3nn: mace's import sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, without which e3nn 0.4.4 cannot load
    # its Wigner constants under torch >= 2.6
    from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from e3nn import o3
    f, lmax = architecture["num_features"], architecture["lmax"]
    # node features up to polmodel's feature lmax (when it has one), edge harmonics up to its lmax
    feature_lmax = architecture.get("feature_lmax", lmax)
    hidden = o3.Irreps([(f, (l, (-1) ** l)) for l in range(feature_lmax + 1)])
    model = MACE(r_max=cutoff, num_bessel=architecture["num_radial"],
                 num_polynomial_cutoff=architecture["polynomial_degree"], max_ell=lmax,
                 interaction_cls=RealAgnosticResidualInteractionBlock,
                 interaction_cls_first=RealAgnosticInteractionBlock, num_interactions=architecture["num_layers"],
                 num_elements=len(SPECIES), hidden_irreps=hidden,
                 MLP_irreps=o3.Irreps(f"{architecture['readout_hidden']}x0e"),
                 atomic_energies=np.zeros(len(SPECIES)), avg_num_neighbors=architecture["avg_num_neighbors"],
                 atomic_numbers=[8, 22, 56], correlation=3, gate=torch.nn.functional.silu,
                 radial_MLP=[architecture["radial_hidden"]] * 3)
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
    parser.add_argument("--polmodel-json", required=True, help="the --json file of benchmarks/model_speed.py")
    args = parser.parse_args(argv)
    with open(args.polmodel_json, encoding="utf-8") as handle:
        polmodel_run = json.load(handle)
    torch.set_num_threads(polmodel_run["threads"])
    device = torch.device(polmodel_run["device"])
    keep_freed_memory_in_heap()     # as PolCalculator(keep_heap=True) in model_speed.py
    architecture, cutoff = polmodel_run["hyperparameters"], polmodel_run["cutoff"]
    torch.manual_seed(0)
    mace = build_mace(architecture, cutoff, device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, cutoff {cutoff} Å; "
          f"MACE: hidden irreps {architecture['num_features']}x(0..{architecture['feature_lmax']}), "
          f"max_ell {architecture['lmax']}, {architecture['num_layers']} interactions, correlation 3 "
          f"({sum(p.numel() for p in mace.parameters())} parameters)")
    header = (f"{'atoms':>8} {'MACE ms':>10} {'polmodel a ms':>14} {'a/MACE':>7} {'mem MACE MiB':>13} "
              f"{'mem a MiB':>10} {'wall MACE ms':>13}")
    print(header)
    print("-" * len(header))
    clock = 1 if device.type == "cpu" else 0  # CPU seconds on CPU, wall seconds on GPU, as in model_speed.py
    for row in polmodel_run["rows"]:
        atoms = batio3_supercell(row["repeat"])
        result = timed(lambda: mace_energy_forces(mace, atoms, cutoff, device), polmodel_run["repeats"], device)
        seconds, mib, wall = result[clock], result[2], result[0]
        print(f"{row['atoms']:>8d} {seconds * 1e3:10.1f} {row['a_s'] * 1e3:14.1f} {row['a_s'] / seconds:7.2f} "
              f"{mib:13.0f} {row['a_mib']:10.0f} {wall * 1e3:13.1f}", flush=True)
    print("MACE: E+F, same neighbour list and timing as model_speed.py (a: polmodel E+F at zero field, from "
          f"{args.polmodel_json})")


if __name__ == "__main__":
    main()
