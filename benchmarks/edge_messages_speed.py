"""polmodel's EdgeMessages against e3nn's TensorProduct + neighbour sum, side by side on the same edges.

On the edges of a BaTiO3 supercell (the default model's second layer: 32x0e + 32x1o features, harmonics to l = 2,
outputs 0e + 1o), one torch thread, CPU time of the median of --repeats:
  forward        the summed messages M(x, Y(r), w(r)) and a nonlinear readout s = Σ tanh(M)
  first backward ∂s/∂x and ∂s/∂r with create_graph, as forces and polarization are taken
  second pass    ∂(∂s/∂x · v)/∂r, the pattern of one Born-charge row
Both implementations get the same inputs, and the script checks that their outputs agree.

    python benchmarks/edge_messages_speed.py --repeat 6
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import batio3_supercell  # noqa: E402

from e3nn import o3  # noqa: E402
from polmodel.data.neighbors import neighbor_list  # noqa: E402
from polmodel.nn.edge_messages import EdgeMessages, uvu_paths  # noqa: E402
from polmodel.runtime.allocator import keep_freed_memory_in_heap  # noqa: E402


class E3nnEdgeMessages(torch.nn.Module):
    """The former implementation: e3nn's generated tensor product on gathered features, then index_add."""

    def __init__(self, irreps_in, irreps_sh, allowed):
        super().__init__()
        irreps_out, instructions = uvu_paths(irreps_in, irreps_sh, allowed)
        self.product = o3.TensorProduct(irreps_in, irreps_sh, irreps_out, instructions, shared_weights=False,
                                        internal_weights=False)

    def forward(self, node_features, edge_sh, path_weights, senders, receivers):
        messages = self.product(node_features[senders], edge_sh, torch.cat(path_weights, dim=1))
        return messages.new_zeros(node_features.shape[0], messages.shape[1]).index_add(0, receivers, messages)


def phases(module, inputs):
    features, vectors, weight_matrix, senders, receivers, irreps_sh, probe, multiplicity = inputs
    features = features.detach().requires_grad_(True)
    vectors = vectors.detach().requires_grad_(True)
    clock = time.thread_time()
    edge_sh = o3.spherical_harmonics(irreps_sh, vectors, normalize=True, normalization="component")
    path_weights = list((vectors.norm(dim=-1, keepdim=True) * weight_matrix).split(multiplicity, dim=1))
    summed = module(features, edge_sh, path_weights, senders, receivers)
    readout = torch.tanh(summed).sum()
    forward = time.thread_time() - clock
    clock = time.thread_time()
    grad_features, _ = torch.autograd.grad(readout, [features, vectors], create_graph=True)
    first = time.thread_time() - clock
    clock = time.thread_time()
    (second_derivative,) = torch.autograd.grad((grad_features * probe).sum(), [vectors])
    second = time.thread_time() - clock
    return (forward, first, second), summed.detach(), second_derivative


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=6, help="supercell repeat n (5n³ atoms)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cutoff", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory_in_heap()

    atoms = batio3_supercell(args.repeat)
    edge_index, shifts = neighbor_list(atoms.get_positions(), atoms.cell.array, atoms.pbc, args.cutoff)
    edge_index = torch.as_tensor(edge_index)
    positions = torch.tensor(atoms.get_positions(), dtype=torch.float32)
    vectors = (positions[edge_index[1]] - positions[edge_index[0]]
               + torch.tensor(shifts @ atoms.cell.array, dtype=torch.float32))
    irreps_in, irreps_sh = o3.Irreps("32x0e + 32x1o"), o3.Irreps.spherical_harmonics(2)
    allowed = {o3.Irrep("0e"), o3.Irrep("1o")}
    ours, theirs = EdgeMessages(irreps_in, irreps_sh, allowed), E3nnEdgeMessages(irreps_in, irreps_sh, allowed)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(atoms), irreps_in.dim, generator=generator)
    weight_matrix = torch.randn(1, ours.weight_numel, generator=generator) / 4
    probe = torch.randn(len(atoms), irreps_in.dim, generator=generator)
    inputs = (features, vectors, weight_matrix, edge_index[1], edge_index[0], irreps_sh, probe, ours.multiplicity)

    _, summed_ours, second_ours = phases(ours, inputs)
    _, summed_theirs, second_theirs = phases(theirs, inputs)
    print(f"{len(atoms)} atoms, {vectors.shape[0]} edges; max |difference|: messages "
          f"{(summed_ours - summed_theirs).abs().max():.2e} (of {summed_theirs.abs().max():.2e}), "
          f"second derivative {(second_ours - second_theirs).abs().max():.2e} "
          f"(of {second_theirs.abs().max():.2e})")
    medians = {}
    for name, module in (("e3nn TensorProduct", theirs), ("EdgeMessages", ours)):
        times = [phases(module, inputs)[0] for _ in range(args.repeats + 1)][1:]
        medians[name] = [statistics.median(column) * 1e3 for column in zip(*times)]
    print(f"{'':20s} {'forward ms':>11s} {'1st backward ms':>16s} {'2nd pass ms':>12s}")
    for name, (forward, first, second) in medians.items():
        print(f"{name:20s} {forward:11.1f} {first:16.1f} {second:12.1f}")
    before, after = medians["e3nn TensorProduct"], medians["EdgeMessages"]
    print("speed-up (e3nn / EdgeMessages): " + ", ".join(
        f"{label} {b / a:.2f}" for label, b, a in zip(("forward", "first backward", "second pass"), before, after)))


if __name__ == "__main__":
    main()
