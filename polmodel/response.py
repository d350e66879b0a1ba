"""Physical derivatives of the model energy E(R, h, ε) (pure functions; conventions in /work/shared/DESIGN.md).

Forces, strain derivative and field derivative come from one backward pass: positions and cell are displaced
by a symmetric strain (r → r(1 + s), h → h(1 + s)) with s = 0 requiring grad, so
  F = -∂E/∂R,   stress = (1/Ω) ∂E/∂s (ASE sign),   virial = -∂E/∂s,   ΩP = -∂E/∂ε.
Born charges and polarizability are the derivatives of the dipole (three more backward passes, one per field
component, only when asked):  Z*[i, a, b] = ∂(ΩP_a)/∂R_ib = ∂F_ib/∂ε_a,   α[a, b] = ∂(ΩP_a)/∂ε_b.
"""
import torch

from polmodel import keys
from polmodel.units import EPSILON0_E_PER_V_ANGSTROM


def cell_volume(cell):
    """|det h| per graph (zero for the zero cell of open boundaries)."""
    return torch.linalg.det(cell).abs()


def periodic_graphs(data):
    """(G,) bool: graphs periodic in all three directions (they have a stress and a polarization)."""
    return data[keys.PBC].all(dim=-1)


def compute_response(model, data, *, stress=True, born_charges=False, polarizability=False, training=False):
    """Energy and its derivatives for a (batched) graph dictionary.

    Returns a dict with ENERGY (G,), ATOMIC_ENERGY (N,), FORCES (N, 3), DIPOLE (G, 3); STRESS (G, 3, 3) and
    VIRIAL (G, 3, 3) when `stress` and POLARIZATION (G, 3) whenever a graph is fully periodic (rows of graphs
    that are not are NaN; a single open-boundary graph gets neither key); BORN_CHARGES (N, 3, 3) when
    `born_charges`; POLARIZABILITY and DIELECTRIC (G, 3, 3) when `polarizability` (DIELECTRIC NaN rows for open
    boundaries). `training=True` keeps the graph so that losses on derivatives can be back-propagated.
    """
    second_order = born_charges or polarizability
    create_graph = training or second_order
    periodic = periodic_graphs(data)
    any_periodic = bool(periodic.any())
    compute_stress = stress and any_periodic

    batch = data[keys.BATCH]
    positions = data[keys.POSITIONS]
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    efield = data[keys.EFIELD]
    if not efield.requires_grad:
        efield = efield.detach().requires_grad_(True)
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
    forces = -gradients[0]
    dipole = -gradients[1]

    result = {keys.ENERGY: energy, keys.ATOMIC_ENERGY: out[keys.ATOMIC_ENERGY], keys.FORCES: forces,
              keys.DIPOLE: dipole}
    volume = cell_volume(cell)
    if any_periodic:
        safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
        result[keys.POLARIZATION] = torch.where(periodic.unsqueeze(-1), dipole / safe_volume.unsqueeze(-1),
                                                torch.full_like(dipole, float("nan")))
    if compute_stress:
        virial = -gradients[2]
        result[keys.VIRIAL] = virial
        result[keys.STRESS] = torch.where(periodic.view(-1, 1, 1), -virial / safe_volume.view(-1, 1, 1),
                                          torch.full_like(virial, float("nan")))

    if second_order:
        born_rows, alpha_rows = [], []
        targets = ([positions] if born_charges else []) + ([efield] if polarizability else [])
        for a in range(3):
            # the last pass may free the graph unless training needs it
            keep = training or a < 2
            rows = torch.autograd.grad(dipole[:, a].sum(), targets, create_graph=training, retain_graph=keep,
                                       allow_unused=True)
            rows = [torch.zeros_like(t) if r is None else r for r, t in zip(rows, targets)]
            if born_charges:
                born_rows.append(rows[0])
            if polarizability:
                alpha_rows.append(rows[-1])
        if born_charges:
            result[keys.BORN_CHARGES] = torch.stack(born_rows, dim=1)        # [i, a, b] = ∂(ΩP_a)/∂R_ib
        if polarizability:
            alpha = torch.stack(alpha_rows, dim=1)                             # [g, a, b] = ∂(ΩP_a)/∂ε_b
            result[keys.POLARIZABILITY] = alpha
            eye = torch.eye(3, dtype=alpha.dtype, device=alpha.device)
            safe_volume = torch.where(periodic, volume, torch.ones_like(volume))
            dielectric = eye + alpha / (EPSILON0_E_PER_V_ANGSTROM * safe_volume.view(-1, 1, 1))
            result[keys.DIELECTRIC] = torch.where(periodic.view(-1, 1, 1), dielectric,
                                                  torch.full_like(dielectric, float("nan")))
    if not training:
        result = {name: value.detach() for name, value in result.items()}
    return result
