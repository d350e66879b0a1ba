"""Minimum-image arithmetic on the multivalued cell dipole (DESIGN.md "Polarization is multivalued").

A Berry-phase cell dipole ΩP is defined modulo the lattice of quantum vectors f·e·R_i (rows of `quantum`).
The difference of two dipoles is therefore compared only after folding: write it in the basis of the quantum
rows, subtract the nearest integers, go back to Cartesian.
"""
import numpy as np
import torch


def fold_dipole_difference(delta, quantum):
    """Fold a dipole difference (…, 3) into the cell of the quantum lattice around zero.

    `quantum` (…, 3, 3) holds the quantum vectors as rows, so delta = n @ quantum with fractional n. Works on
    numpy arrays and on torch tensors; for tensors the result is differentiable with respect to `delta`
    (the subtracted integers are piecewise constant, so the gradient is the identity), and `quantum` is not
    differentiated. The fold is the nearest-integer reduction in the quantum basis, which is the minimum image
    for the (near-orthogonal) quanta of the cells we use.
    """
    if isinstance(delta, torch.Tensor):
        quantum = torch.as_tensor(quantum, dtype=delta.dtype, device=delta.device).detach()
        batch_shape = torch.broadcast_shapes(quantum.shape[:-2], delta.shape[:-1])
        quantum = quantum.expand(*batch_shape, 3, 3)
        delta = delta.expand(*batch_shape, 3)
        # delta = n @ Q  <=>  Q^T n = delta
        fractional = torch.linalg.solve(quantum.transpose(-1, -2), delta.detach().unsqueeze(-1)).squeeze(-1)
        return delta - torch.einsum("...i,...ij->...j", torch.round(fractional), quantum)
    delta = np.asarray(delta, dtype=float)
    quantum = np.broadcast_to(np.asarray(quantum, dtype=float), delta.shape[:-1] + (3, 3))
    fractional = np.linalg.solve(np.swapaxes(quantum, -1, -2), delta[..., None])[..., 0]
    integers = np.round(fractional)
    return delta - np.einsum("...i,...ij->...j", integers, quantum)
