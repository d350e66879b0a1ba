"""Edge messages: a 'uvu' tensor product of each sender's features with the edge's spherical harmonics, weighted
per edge and channel, summed onto the receiving atom.

The arithmetic is that of e3nn's `o3.TensorProduct(irreps_in, irreps_sh, irreps_out, uvu instructions,
shared_weights=False)` followed by a neighbour sum (tests/test_edge_messages.py checks the equality), written so
that second derivatives stay cheap. Born charges back-propagate through the graph of a first backward three times,
and in e3nn's generated code every edge tensor is a slice of one concatenated layout (the features of the sender,
the weights, the output); the backward of each slice writes a zero-filled edge-sized tensor and copies into it.
Here each path has its own edge tensors from the start: the sender's features are sliced per irrep on the atoms
(N rows, not E) and then gathered, each path's weights come from their own columns of the radial network, and
each path's messages are summed onto the atoms before they are joined into e3nn's layout. Edge tensors are
channel-last, (E, 2l+1, u), so that products and the reductions of their backwards run over u contiguous floats.
Every pass of the model (forward, backward, Born charges) is faster this way than with e3nn's module
(benchmarks/README.md "Edge messages").
Per path (x the sender's irrep block (E, 2l1+1, u), Y the edge harmonic (E, 2l2+1), C the Wigner 3j symbol
times the path weight):   m[e, k, u] = w[e, u] Σ_ij C[i, j, k] x[e, i, u] Y[e, j].
"""
import math

import torch

from e3nn import o3


class _SumOverReceivers(torch.autograd.Function):
    """Σ of edge rows onto their receiving atoms: index_add, with `_GatherSenders` as its backward.

    torch's own backward of index_add is index_select, which on the CPU gathers (E, C) rows several times slower
    than `grad[index]` (benchmarks/README.md "Edge messages"). Both backwards are differentiable torch functions,
    so second derivatives use the same fast pair.
    """

    @staticmethod
    def forward(ctx, rows, index, num_atoms):
        ctx.save_for_backward(index)
        return rows.new_zeros((num_atoms,) + rows.shape[1:]).index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        # contiguous: indexing keeps its source's memory layout, and the edge tensors should be channel-last
        return _GatherSenders.apply(grad.contiguous(), index), None, None


class _GatherSenders(torch.autograd.Function):
    """atom_rows[index] (one row per edge), with `_SumOverReceivers` as its backward.

    torch's backward of indexing is an accumulating index_put into a zero tensor; index_add is the same sum
    without the generic indexing machinery.
    """

    @staticmethod
    def forward(ctx, atom_rows, index):
        ctx.save_for_backward(index)
        ctx.num_atoms = atom_rows.shape[0]
        return atom_rows.contiguous()[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _SumOverReceivers.apply(grad, index, ctx.num_atoms), None


def sum_over_receivers(rows, receivers, num_atoms):
    """(E, ...) edge rows summed onto atoms: (num_atoms, ...)."""
    return _SumOverReceivers.apply(rows, receivers, num_atoms)


def gather_senders(atom_rows, senders):
    """(N, ...) atom rows copied onto edges: (E, ...)."""
    return _GatherSenders.apply(atom_rows, senders)


def uvu_paths(irreps_in, irreps_sh, allowed):
    """The e3nn instructions (i_in, i_sh, i_out, "uvu", True) and output irreps of every product of an input
    irrep with a harmonic whose result is in `allowed`, in e3nn's order (input irrep, then harmonic)."""
    irreps_out, instructions = [], []
    for i_in, (mul, ir_in) in enumerate(irreps_in):
        for i_sh, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in allowed:
                    instructions.append((i_in, i_sh, len(irreps_out), "uvu", True))
                    irreps_out.append((mul, ir_out))
    return o3.Irreps(irreps_out), instructions


class EdgeMessages(torch.nn.Module):
    """Σ_j over the neighbours of i of the uvu product of x_j with Y(r_ij), one weight per edge, path and channel.

    `irreps_in`: node features with one multiplicity u; `irreps_sh`: the edge harmonics (one copy of each l,
    e3nn's spherical harmonics of the edge direction with "component" normalization: paths 1 ⊗ 2 → 1 use Y¹ and
    rely on Y² being the harmonic of the same direction);
    `allowed`: the irreps kept in the output. `irreps_out` lists one block per path in e3nn's order, and the
    output rows are laid out as e3nn's TensorProduct output with these instructions. `weight_numel` = paths × u.
    """

    def __init__(self, irreps_in, irreps_sh, allowed):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_sh = o3.Irreps(irreps_sh)
        multiplicities = {mul for mul, _ in self.irreps_in}
        if len(multiplicities) != 1 or any(mul != 1 for mul, _ in self.irreps_sh):
            raise ValueError(f"uvu edge messages need one multiplicity on the features ({self.irreps_in}) and "
                             f"single harmonics ({self.irreps_sh})")
        self.multiplicity = multiplicities.pop()
        self.irreps_out, instructions = uvu_paths(self.irreps_in, self.irreps_sh, allowed)
        self.paths = [(i_in, i_sh, i_out) for i_in, i_sh, i_out, _, _ in instructions]
        self.weight_numel = len(self.paths) * self.multiplicity
        # e3nn's "component" irrep normalization with "element" path normalization, one uvu path per output
        # block: the path weight is sqrt(2 l_out + 1). Kept in float64 and cast per call (not buffers: a model
        # built in float32 and moved to float64 would carry float32-rounded symbols, equivariant only to ~1e-8).
        self._exact_couplings = [
            o3.wigner_3j(self.irreps_in[i_in].ir.l, self.irreps_sh[i_sh].ir.l, self.irreps_out[i_out].ir.l,
                         dtype=torch.float64) * math.sqrt(self.irreps_out[i_out].ir.dim)
            for i_in, i_sh, i_out in self.paths]
        self._cast_couplings = {}
        # with the scalar harmonic, l ⊗ 0 → l is the identity in e3nn's basis: such a path is a plain product
        self.identity_paths = {
            index for index, coupling in enumerate(self._exact_couplings)
            if coupling.shape[1] == 1 and coupling.shape[0] == coupling.shape[2]
            and torch.allclose(coupling[:, 0, :], torch.eye(coupling.shape[0], dtype=torch.float64))}
        self.dyadic_paths = self._dyadic_paths()

    def _dyadic_paths(self):
        """{path: (position of the l = 1 harmonic, a, b)} for the paths 1 ⊗ 2 → 1.

        Their per-edge 3×3 matrix Σ_j C[i, j, k] Y²_j(r̂) is a y y^T + b 1 with y = Y¹(r̂), so the product is
        a y (y · x) + b x: two contractions over the three components instead of a batched 3×3 matrix product,
        which on the CPU is an order of magnitude slower (benchmarks/README.md "Edge messages"). a and b are fitted
        here on random directions and the fit is required to be exact.
        """
        l1_positions = [i_sh for i_sh, (_, ir) in enumerate(self.irreps_sh) if ir.l == 1]
        if not l1_positions:
            return {}
        directions = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        y1 = o3.spherical_harmonics(1, directions, normalize=True, normalization="component")
        y2 = o3.spherical_harmonics(2, directions, normalize=True, normalization="component")
        basis = torch.stack([torch.einsum("ei,ek->eik", y1, y1).reshape(-1),
                             torch.eye(3, dtype=torch.float64).repeat(len(directions), 1, 1).reshape(-1)], dim=1)
        dyadic = {}
        for index, (i_in, i_sh, i_out) in enumerate(self.paths):
            ls = (self.irreps_in[i_in].ir.l, self.irreps_sh[i_sh].ir.l, self.irreps_out[i_out].ir.l)
            if ls != (1, 2, 1):
                continue
            matrices = torch.einsum("ijk,ej->eik", self._exact_couplings[index], y2).reshape(-1, 1)
            (a, b) = torch.linalg.lstsq(basis, matrices).solution.squeeze(1).tolist()
            if torch.allclose(basis @ torch.tensor([[a], [b]], dtype=torch.float64), matrices, atol=1e-12):
                dyadic[index] = (l1_positions[0], a, b)
        return dyadic

    def couplings(self, dtype, device):
        """The paths' Wigner 3j symbols times their path weights, (d_in, d_sh, d_out) each, in dtype on device."""
        key = (dtype, device)
        if key not in self._cast_couplings:
            self._cast_couplings[key] = [c.to(dtype=dtype, device=device) for c in self._exact_couplings]
        return self._cast_couplings[key]

    def forward(self, node_features, edge_sh, path_weights, senders, receivers):
        """node_features (N, irreps_in.dim), edge_sh (E, irreps_sh.dim), path_weights: one (E, u) per path.
        Returns (N, irreps_out.dim)."""
        num_atoms, u = node_features.shape[0], self.multiplicity
        # edge tensors are (E, 2l+1, u): the channel axis is the contiguous one, so that the products and the
        # reductions of the backward passes run over 32 (or more) contiguous floats, not over 3 or 5
        sender_blocks = [gather_senders(node_features[:, block].reshape(num_atoms, u, ir.dim).transpose(1, 2)
                                        .contiguous(), senders)
                         for (_, ir), block in zip(self.irreps_in, self.irreps_in.slices())]
        harmonics = [edge_sh[:, block] for block in self.irreps_sh.slices()]
        couplings = self.couplings(edge_sh.dtype, edge_sh.device)
        summed = []
        for index, ((i_in, i_sh, _), weights) in enumerate(zip(self.paths, path_weights)):
            coupling = couplings[index]                                          # (d_in, d_sh, d_out)
            x, y = sender_blocks[i_in], harmonics[i_sh]                           # (E, d_in, u), (E, d_sh)
            d_in, d_sh, d_out = coupling.shape
            if index in self.identity_paths:
                message = (weights * y).unsqueeze(1) * x
            elif index in self.dyadic_paths:
                i_vector, a, b = self.dyadic_paths[index]
                y1 = harmonics[i_vector].unsqueeze(-1)                               # (E, 3, 1)
                projected = (y1 * x).sum(1, keepdim=True)                            # (E, 1, u)
                message = weights.unsqueeze(1) * (a * y1 * projected + b * x)
            elif d_in == 1:      # scalar features: an outer product with the coupled harmonic
                message = (y @ coupling[0]).unsqueeze(-1) * (weights * x[:, 0, :]).unsqueeze(1)
            elif d_out == 1:     # scalar output: a contraction of the features with the coupled harmonic
                coupled = y @ coupling[:, :, 0].transpose(0, 1)                  # (E, d_in)
                message = (weights * (coupled.unsqueeze(-1) * x).sum(1)).unsqueeze(1)
            else:
                matrices = (y @ coupling.permute(1, 2, 0).reshape(d_sh, d_out * d_in)).view(-1, d_out, d_in)
                message = weights.unsqueeze(1) * torch.bmm(matrices, x)
            atom_sums = sum_over_receivers(message, receivers, num_atoms)          # (N, d_out, u)
            summed.append(atom_sums.transpose(1, 2).reshape(num_atoms, u * d_out))
        return torch.cat(summed, dim=-1)
