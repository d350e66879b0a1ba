"""Physical derivatives of the model energy E(R, h, ε) (pure functions; conventions in docs/conventions.md).

Forces, strain derivative and field derivative come from one backward pass: positions and cell are displaced
by a symmetric strain (r → r(1 + s), h → h(1 + s)) with s = 0 requiring grad, so
  F = -∂E/∂R,   stress = (1/Ω) ∂E/∂s (ASE sign),   virial = -∂E/∂s,   ΩP = -∂E/∂ε.
Born charges and polarizability are the derivatives of the dipole (three more backward passes, one per field
component, only when asked):  Z*[i, a, b] = ∂(ΩP_a)/∂R_ib = ∂F_ib/∂ε_a,   α[a, b] = ∂(ΩP_a)/∂ε_b.
With Born charges outside training, the leaves are the edges' harmonics and radial weights instead of the
positions (polmodel/nn/edge_inputs.py); forces, virial and Z* then follow from the per-edge chain rule.

Two couplings to the field (FIELD_COUPLINGS): "network" evaluates E(R, h, ε) at the applied field
(`compute_response`); "first-order" evaluates the model at ε = 0 and adds the field to first order, as
Allegro-pol's MD does (`first_order_field_response`):  F(ε) = F(0) + Z*ᵀε,  ΩP(ε) = ΩP(0) + αε,
E(ε) = E(0) - ΩP(0)·ε.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch

from polmodel.data import keys
from polmodel.data.dielectric import dielectric_from_polarizability
from polmodel.nn.edge_inputs import atom_gradients, edge_inputs, edge_vector_gradients, strain_gradients

if TYPE_CHECKING:
    from polmodel.data.graphs import Graph


class ResponseFunction(Protocol):
    """The signature of `compute_response` and `first_order_field_response`: (model, graph, flags) -> response."""

    def __call__(self, model: torch.nn.Module, data: Graph, *, stress: bool = ..., born_charges: bool = ...,
                 polarizability: bool = ..., training: bool = ..., memory_limit_gb: float | None = ...) -> Graph: ...


class EdgeEnergyModel(Protocol):
    """An energy model whose positions enter only through its edges' harmonics and radial weights (PolModel):
    polmodel/nn/edge_inputs.py differentiates it through those."""

    def energy_from_edges(self, data: Graph, edge_sh: torch.Tensor,
                          path_weights: Sequence[Sequence[torch.Tensor]]) -> Graph: ...


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|det h| per graph (zero for the zero cell of open boundaries)."""
    return torch.linalg.det(cell).abs()


def periodic_graphs(data: Graph) -> torch.Tensor:
    """(G,) bool: graphs periodic in all three directions (they have a stress and a polarization)."""
    return data[keys.PBC].all(dim=-1)


def compute_response(model: torch.nn.Module, data: Graph, *, stress: bool = True, born_charges: bool = False,
                     polarizability: bool = False, training: bool = False,
                     memory_limit_gb: float | None = None) -> Graph:
    """Energy and its derivatives for a (batched) graph dictionary.

    Returns a dict with ENERGY (G,), ATOMIC_ENERGY (N,), FORCES (N, 3), DIPOLE (G, 3); STRESS (G, 3, 3) and
    VIRIAL (G, 3, 3) when `stress` and POLARIZATION (G, 3) whenever a graph is fully periodic (rows of graphs
    that are not are NaN; a single open-boundary graph gets neither key); BORN_CHARGES (N, 3, 3) when
    `born_charges`; POLARIZABILITY and DIELECTRIC (G, 3, 3) when `polarizability` (DIELECTRIC NaN rows for open
    boundaries). `training=True` keeps the graph so that losses on derivatives can be back-propagated.

    Born charges outside training take their reverse passes to the per-edge inputs (polmodel/nn/edge_inputs.py)
    when the model exposes them (`energy_from_edges`, as PolModel does); training, and any other energy module,
    differentiates through the positions, so that the model's parameters stay in the graph.

    `memory_limit_gb` (outside training): evaluate each graph in spatial chunks that fit this budget
    (polmodel/nn/chunked.py; exact to round-off); its neighbour list is rebuilt per chunk, the one in `data` unused.
    """
    if memory_limit_gb is not None:
        from polmodel.nn.chunked import chunked_graph_response  # chunked imports this module (its chunks)
        if training:
            raise ValueError("memory_limit_gb is for evaluation; training needs the whole graph")
        return chunked_graph_response(model, data, memory_limit_gb, stress=stress, born_charges=born_charges,
                                      polarizability=polarizability)
    periodic = periodic_graphs(data)
    compute_stress = stress and bool(periodic.any())
    if born_charges and not training and hasattr(model, "energy_from_edges"):
        raw = _derivatives_through_edge_inputs(cast(EdgeEnergyModel, model), data, compute_stress, polarizability)
    else:
        raw = _derivatives_through_positions(model, data, compute_stress, born_charges, polarizability, training)
    return response_from_derivatives(raw, data, compute_stress=compute_stress, born_charges=born_charges,
                                     polarizability=polarizability, training=training)


FIELD_COUPLINGS = ("network", "first-order")


def first_order_field_response(model: torch.nn.Module, data: Graph, *, stress: bool = False,
                               born_charges: bool = False, polarizability: bool = False, training: bool = False,
                               memory_limit_gb: float | None = None) -> Graph:
    """compute_response's ENERGY, ATOMIC_ENERGY, FORCES, DIPOLE (and POLARIZATION for periodic graphs) with the
    field data[EFIELD] applied to first order about ε = 0 (module docstring).

    Z*ᵀε and αε come from one reverse pass of ΩP(0)·ε, a Hessian-vector product of E in the direction of the
    field (about the cost of one Born-charge row), never the full Z*. BORN_CHARGES and POLARIZABILITY, when asked
    for, are those at ε = 0, the ones the coupling uses. ATOMIC_ENERGY is the zero-field one. There is no stress:
    the coupling is for fixed-cell runs, and asking for one is a ValueError, as is training or a memory limit
    (the cell is evaluated whole)."""
    if stress or training or memory_limit_gb is not None:
        raise ValueError("the first-order field coupling evaluates fixed cells whole, outside training: it takes "
                         "no stress, training or memory_limit_gb")
    applied = data[keys.EFIELD].detach()
    zero_field = dict(data)
    zero_field[keys.EFIELD] = torch.zeros_like(applied)
    if born_charges or polarizability:
        result = compute_response(model, zero_field, stress=False, born_charges=born_charges,
                                  polarizability=polarizability)
    else:
        result = {}
    field = torch.zeros_like(applied, requires_grad=True)
    zero_field[keys.EFIELD] = field
    if hasattr(model, "energy_from_edges"):
        out, forces, dipole, born_times_field, alpha_times_field = _first_order_through_edge_inputs(
            cast(EdgeEnergyModel, model), zero_field, applied)
    else:
        out, forces, dipole, born_times_field, alpha_times_field = _first_order_through_positions(
            model, zero_field, applied)
    raw = {keys.ENERGY: out[keys.ENERGY].detach() - (dipole * applied).sum(dim=-1),
           keys.ATOMIC_ENERGY: out[keys.ATOMIC_ENERGY].detach(),
           keys.FORCES: forces + born_times_field,
           keys.DIPOLE: dipole + alpha_times_field}
    result.update(response_from_derivatives(raw, data, compute_stress=False, born_charges=False,
                                            polarizability=False, training=False))
    return result


def _gradients_or_zeros(output: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    gradients = torch.autograd.grad(output, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if gradient is None else gradient for gradient, leaf in zip(gradients, leaves)]


def _first_order_through_positions(model: torch.nn.Module, data: Graph, applied: torch.Tensor
                                   ) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model output, F(0), ΩP(0), Z*ᵀε, αε) with the positions and the (zero) field data[EFIELD] as leaves:
    ∂(ΩP(0)·ε)/∂R_ib = Σ_a ε_a Z*[i, a, b] and ∂(ΩP(0)·ε)/∂ε_b = (αε)_b (α is symmetric)."""
    positions = data[keys.POSITIONS].detach().requires_grad_(True)
    field = data[keys.EFIELD]
    inputs = dict(data)
    inputs[keys.POSITIONS] = positions
    out = model(inputs)
    energy_gradient, field_gradient = torch.autograd.grad(out[keys.ENERGY].sum(), [positions, field],
                                                          create_graph=True)
    dipole = -field_gradient
    born_times_field, alpha_times_field = _gradients_or_zeros((dipole * applied).sum(), [positions, field])
    return out, -energy_gradient.detach(), dipole.detach(), born_times_field, alpha_times_field


def _first_order_through_edge_inputs(model: EdgeEnergyModel, data: Graph, applied: torch.Tensor
                                     ) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `_first_order_through_positions`, with the edges' harmonics and radial weights as the leaves
    (polmodel/nn/edge_inputs.py): the second pass stops at the edges and is chained to the atoms once."""
    inputs = edge_inputs(model, data)
    harmonics = inputs.harmonics.requires_grad_(True)
    weights = [[w.requires_grad_(True) for w in layer] for layer in inputs.radial_weights]
    flat_weights = [w for layer in weights for w in layer]
    field = data[keys.EFIELD]
    out = model.energy_from_edges(data, harmonics, weights)
    leaves = [harmonics, *flat_weights, field]
    gradients: Sequence[torch.Tensor] = torch.autograd.grad(out[keys.ENERGY].sum(), leaves, create_graph=True,
                                                            allow_unused=True)
    gradients = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(gradients, leaves)]
    dipole = -gradients[-1]
    harmonics_gradient, *weight_gradients = [g.detach() for g in gradients[:-1]]
    forces = -atom_gradients(data, edge_vector_gradients(inputs, harmonics_gradient,
                                                         _per_layer(weight_gradients, weights)))
    second = _gradients_or_zeros((dipole * applied).sum(), leaves)
    born_times_field = atom_gradients(data, edge_vector_gradients(inputs, second[0],
                                                                  _per_layer(second[1:-1], weights)))
    return out, forces, dipole.detach(), born_times_field, second[-1]


def response_from_derivatives(raw: Graph, data: Graph, *, compute_stress: bool, born_charges: bool,
                              polarizability: bool, training: bool) -> Graph:
    """compute_response's dict from the raw derivatives (ENERGY, ATOMIC_ENERGY, FORCES, DIPOLE; VIRIAL,
    BORN_CHARGES, POLARIZABILITY as computed): polarization, stress and ε∞ from the cell (data's CELL, PBC)."""
    periodic = periodic_graphs(data)
    any_periodic = bool(periodic.any())
    result = {name: raw[name] for name in (keys.ENERGY, keys.ATOMIC_ENERGY, keys.FORCES, keys.DIPOLE)}
    volume = cell_volume(data[keys.CELL])
    safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
    if any_periodic:
        dipole = raw[keys.DIPOLE]
        result[keys.POLARIZATION] = torch.where(periodic.unsqueeze(-1), dipole / safe_volume.unsqueeze(-1),
                                                torch.full_like(dipole, float("nan")))
    if compute_stress:
        virial = raw[keys.VIRIAL]
        result[keys.VIRIAL] = virial
        result[keys.STRESS] = torch.where(periodic.view(-1, 1, 1), -virial / safe_volume.view(-1, 1, 1),
                                          torch.full_like(virial, float("nan")))
    if born_charges:
        result[keys.BORN_CHARGES] = raw[keys.BORN_CHARGES]
    if polarizability:
        alpha = raw[keys.POLARIZABILITY]
        result[keys.POLARIZABILITY] = alpha
        dielectric = dielectric_from_polarizability(alpha, safe_volume.view(-1, 1, 1))
        result[keys.DIELECTRIC] = torch.where(periodic.view(-1, 1, 1), dielectric,
                                              torch.full_like(dielectric, float("nan")))
    if not training:
        result = {name: value.detach() for name, value in result.items()}
    return result


def _field_leaf(data: Graph) -> torch.Tensor:
    efield = data[keys.EFIELD]
    return efield if efield.requires_grad else efield.detach().requires_grad_(True)


def _dipole_derivatives(dipole: torch.Tensor, targets: Sequence[torch.Tensor], keep_graph: bool
                        ) -> list[list[torch.Tensor]]:
    """Per field direction a, ∂(ΩP_a)/∂target for each target (zeros where unused): three reverse passes."""
    rows = []
    for a in range(3):
        # the last pass may free the graph unless training needs it
        row = torch.autograd.grad(dipole[:, a].sum(), targets, create_graph=keep_graph,
                                  retain_graph=keep_graph or a < 2, allow_unused=True)
        rows.append([torch.zeros_like(t) if r is None else r for r, t in zip(row, targets)])
    return rows


def _derivatives_through_positions(model: torch.nn.Module, data: Graph, compute_stress: bool, born_charges: bool,
                                   polarizability: bool, training: bool) -> Graph:
    """Forces, dipole and virial from one backward pass with positions, field and strain as the leaves; Born
    charges and α as derivatives of the dipole, also w.r.t. those leaves."""
    second_order = born_charges or polarizability
    create_graph = training or second_order
    batch = data[keys.BATCH]
    positions = data[keys.POSITIONS]
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    efield = _field_leaf(data)
    cell = data[keys.CELL]
    inputs = dict(data)
    inputs[keys.EFIELD] = efield
    if compute_stress:
        num_graphs = cell.shape[0]
        strain = torch.zeros(num_graphs, 3, 3, dtype=cell.dtype, device=cell.device, requires_grad=True)
        symmetric = 0.5 * (strain + strain.transpose(-1, -2))
        inputs[keys.POSITIONS] = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch])
        inputs[keys.CELL] = cell + torch.bmm(cell, symmetric)
    else:
        inputs[keys.POSITIONS] = positions

    out = model(inputs)
    energy = out[keys.ENERGY]
    wrt = [positions, efield] + ([strain] if compute_stress else [])
    gradients = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
    raw = {keys.ENERGY: energy, keys.ATOMIC_ENERGY: out[keys.ATOMIC_ENERGY], keys.FORCES: -gradients[0],
           keys.DIPOLE: -gradients[1]}
    if compute_stress:
        raw[keys.VIRIAL] = -gradients[2]
    if second_order:
        targets = ([positions] if born_charges else []) + ([efield] if polarizability else [])
        rows = _dipole_derivatives(raw[keys.DIPOLE], targets, keep_graph=training)
        if born_charges:
            raw[keys.BORN_CHARGES] = torch.stack([row[0] for row in rows], dim=1)      # [i, a, b] = ∂(ΩP_a)/∂R_ib
        if polarizability:
            raw[keys.POLARIZABILITY] = torch.stack([row[-1] for row in rows], dim=1)   # [g, a, b] = ∂(ΩP_a)/∂ε_b
    return raw


def _derivatives_through_edge_inputs(model: EdgeEnergyModel, data: Graph, compute_stress: bool,
                                     polarizability: bool) -> Graph:
    """As `_derivatives_through_positions` with Born charges, but with the edges' harmonics and radial weights
    as the leaves (polmodel/nn/edge_inputs.py): the three dipole passes stop at the edges, and their chain rule to
    the positions is one contraction for the three together. Not differentiable w.r.t. the parameters."""
    inputs = edge_inputs(model, data)
    harmonics = inputs.harmonics.requires_grad_(True)
    weights = [[w.requires_grad_(True) for w in layer] for layer in inputs.radial_weights]
    flat_weights = [w for layer in weights for w in layer]
    efield = _field_leaf(data)
    fed = dict(data)
    fed[keys.EFIELD] = efield
    out = model.energy_from_edges(fed, harmonics, weights)
    energy = out[keys.ENERGY]

    edge_leaves = [harmonics, *flat_weights]
    gradients: Sequence[torch.Tensor] = torch.autograd.grad(energy.sum(), edge_leaves + [efield], create_graph=True,
                                                            allow_unused=True)
    gradients = [torch.zeros_like(t) if g is None else g for g, t in zip(gradients, edge_leaves + [efield])]
    dipole = -gradients[-1]
    # forces and virial are results, not part of the graph the dipole passes run through
    harmonics_gradient, *weight_gradients = [g.detach() for g in gradients[:-1]]
    vector_gradients = edge_vector_gradients(inputs, harmonics_gradient, _per_layer(weight_gradients, weights))
    raw = {keys.ENERGY: energy, keys.ATOMIC_ENERGY: out[keys.ATOMIC_ENERGY],
           keys.FORCES: -atom_gradients(data, vector_gradients), keys.DIPOLE: dipole}
    if compute_stress:
        raw[keys.VIRIAL] = -strain_gradients(data, inputs, vector_gradients, data[keys.CELL].shape[0])

    rows = _dipole_derivatives(dipole, edge_leaves + ([efield] if polarizability else []), keep_graph=False)
    stacked = [torch.stack(column) for column in zip(*rows)]                       # each (3, ...) over a
    born_vectors = edge_vector_gradients(inputs, stacked[0], _per_layer(stacked[1:1 + len(flat_weights)], weights))
    raw[keys.BORN_CHARGES] = atom_gradients(data, born_vectors).transpose(0, 1)    # [i, a, b] = ∂(ΩP_a)/∂R_ib
    if polarizability:
        raw[keys.POLARIZABILITY] = stacked[-1].transpose(0, 1)                      # [g, a, b] = ∂(ΩP_a)/∂ε_b
    return raw


def _per_layer(flat: Sequence[torch.Tensor], nested_like: Sequence[Sequence[torch.Tensor]]
               ) -> list[list[torch.Tensor]]:
    """Regroup a flat list of per-path tensors into the per-layer nesting of `nested_like`."""
    grouped, start = [], 0
    for layer in nested_like:
        grouped.append(list(flat[start:start + len(layer)]))
        start += len(layer)
    return grouped
