"""The energy's per-edge inputs and their derivatives along the edge vector, for Born charges at the cost of a
few contractions per edge.

The positions enter `PolModel` only through two functions of each edge vector r_e: the spherical harmonics
Y(r̂_e) and the radial weights w(|r_e|) of every layer's edge-message paths (`PolModel.energy_from_edges`).
Born charges are Z*[i, a, b] = ∂(ΩP_a)/∂R_ib, three reverse passes through the graph of a first backward. Taken
with the positions as the leaves, each pass also runs backwards through the harmonics and the radial networks
(matrix products over E edges × radial_hidden). Taken with (Y, w) as the leaves, each pass stops at them, and the
chain rule to the edge vectors is applied once for the three passes together, with the per-edge derivatives
dY/dr_e (E, S, 3) and dw/dr (E, u) computed here in one sweep:
    ∂X/∂r_e = Σ_s ∂X/∂Y_es dY_es/dr_e + (Σ_paths Σ_u ∂X/∂w_eu dw_eu/dr) r_e / |r_e|.
polmodel/nn/response.py uses this for Born charges; tests/test_edge_inputs.py checks it against the plain reverse
passes.
"""
from typing import List, NamedTuple

import torch
from torch.autograd import forward_ad

from polmodel.data import keys


class EdgeInputs(NamedTuple):
    vectors: torch.Tensor                        # (E, 3) r_e = r_sender - r_receiver + shift
    lengths: torch.Tensor                        # (E,)
    harmonics: torch.Tensor                      # (E, S)
    harmonics_jacobian: torch.Tensor             # (E, S, 3) dY_es / dr_e
    radial_weights: List[List[torch.Tensor]]     # per layer, per path: (E, u)
    radial_slopes: List[List[torch.Tensor]]      # per layer, per path: (E, u) dw / d|r_e|


def harmonics_with_jacobian(model, vectors):
    """(Y (E, S), dY/dr (E, S, 3)): three forward-mode derivatives, one per Cartesian direction."""
    columns = []
    with forward_ad.dual_level():
        for direction in torch.eye(3, dtype=vectors.dtype, device=vectors.device):
            dual = model.edge_harmonics(forward_ad.make_dual(vectors, direction.expand_as(vectors)))
            harmonics, column = forward_ad.unpack_dual(dual)
            columns.append(column)
    return harmonics, torch.stack(columns, dim=-1)


def edge_inputs(model, data):
    """The per-edge inputs of `model.energy_from_edges` and their derivatives, detached (no graph)."""
    with torch.no_grad():
        vectors = model.edge_vectors(data)
        lengths = torch.linalg.norm(vectors, dim=-1)
        harmonics, jacobian = harmonics_with_jacobian(model, vectors)
        radial, radial_slope = model.radial_basis.with_slope(lengths)
        weights, slopes = zip(*[layer.path_weights_with_slope(radial, radial_slope) for layer in model.layers])
    return EdgeInputs(vectors, lengths, harmonics, jacobian, list(weights), list(slopes))


def edge_vector_gradients(inputs, harmonics_cotangent, weight_cotangents):
    """∂X/∂r_e (..., E, 3) from ∂X/∂Y (..., E, S) and ∂X/∂w (per layer, per path: (..., E, u)); the leading
    dimensions (e.g. the three field directions of the Born charges) are carried through."""
    along_length = 0.0
    for layer_cotangents, layer_slopes in zip(weight_cotangents, inputs.radial_slopes):
        for cotangent, slope in zip(layer_cotangents, layer_slopes):
            along_length = along_length + (cotangent * slope).sum(-1)
    unit = inputs.vectors / inputs.lengths.unsqueeze(-1)
    # (..., E, S) × (E, S, 3): the harmonics' part, as one batched matrix product per edge
    through_harmonics = (harmonics_cotangent.unsqueeze(-2) @ inputs.harmonics_jacobian).squeeze(-2)
    return through_harmonics + along_length.unsqueeze(-1) * unit


def atom_gradients(data, vector_gradients):
    """∂X/∂R_i (..., N, 3) from ∂X/∂r_e (..., E, 3): r_e grows with its sender and shrinks with its receiver."""
    receivers, senders = data[keys.EDGE_INDEX][0], data[keys.EDGE_INDEX][1]
    shape = vector_gradients.shape[:-2] + (data[keys.POSITIONS].shape[0], 3)
    atoms = vector_gradients.new_zeros(shape)
    atoms.index_add_(-2, senders, vector_gradients)
    atoms.index_add_(-2, receivers, -vector_gradients)
    return atoms


def strain_gradients(data, inputs, vector_gradients, num_graphs):
    """∂X/∂s (G, 3, 3) for the symmetric strain r → r (1 + s) of every edge vector, summed per graph."""
    per_edge = inputs.vectors.unsqueeze(-1) * vector_gradients.unsqueeze(-2)          # [e, k, l] = r_ek ∂X/∂r_el
    graph_of_edge = data[keys.BATCH][data[keys.EDGE_INDEX][0]]
    summed = per_edge.new_zeros((num_graphs, 3, 3)).index_add_(0, graph_of_edge, per_edge)
    return 0.5 * (summed + summed.transpose(-1, -2))
