"""Minimum-image arithmetic on the multivalued cell dipole (docs/conventions.md "The polarization quantum").

A Berry-phase cell dipole ΩP is defined modulo the lattice of quantum vectors f·e·R_i (rows of `quantum`).
The difference of two dipoles is therefore compared only after folding onto its minimum image: the shortest
vector among delta - n @ quantum over all integer n.

Rounding the coordinates of delta in the quantum basis to the nearest integers (Babai's rounding) gives that
image only for near-orthogonal quanta; in a hexagonal or rhombohedral cell it can return a longer image. The
exact search used here:
1. reduce the quantum basis (LLL, δ = 3/4): an integer unimodular transform T gives a basis B = T @ quantum of
   short, nearly orthogonal rows spanning the same lattice;
2. round in that basis to get a first image r0 of length ρ;
3. every image at most as long, delta - m @ B, has coordinates x = f - m (f the fractional coordinates of delta
   in B) with |x_i| <= ρ·‖column i of B⁻¹‖, so enumerating the integers m inside that box is exhaustive. After
   the reduction the box holds a handful of points.
Ties (two images of equal length, delta exactly on a boundary) keep the rounded image.
"""
import functools
import itertools

import numpy as np
import torch

LLL_DELTA = 0.75


def reduce_lattice_basis(basis):
    """LLL reduction of the rows of `basis` (3, 3): returns (reduced, transform), reduced = transform @ basis,
    transform an integer matrix with determinant ±1 (the rows span the same lattice)."""
    reduced = np.array(basis, dtype=float)
    transform = np.eye(len(reduced), dtype=np.int64)
    size = len(reduced)

    def gram_schmidt(rows):
        orthogonal = np.zeros_like(rows)
        mu = np.zeros((size, size))
        for i in range(size):
            orthogonal[i] = rows[i]
            for j in range(i):
                mu[i, j] = rows[i] @ orthogonal[j] / (orthogonal[j] @ orthogonal[j])
                orthogonal[i] = orthogonal[i] - mu[i, j] * orthogonal[j]
        return orthogonal, mu

    k = 1
    orthogonal, mu = gram_schmidt(reduced)
    for _ in range(1000):  # LLL ends after a few swaps for 3 rows; the cap only guards against NaN input
        if k >= size:
            break
        for j in range(k - 1, -1, -1):
            q = int(np.round(mu[k, j]))
            if q:
                reduced[k] -= q * reduced[j]
                transform[k] -= q * transform[j]
                orthogonal, mu = gram_schmidt(reduced)
        if orthogonal[k] @ orthogonal[k] >= (LLL_DELTA - mu[k, k - 1] ** 2) * (orthogonal[k - 1] @ orthogonal[k - 1]):
            k += 1
        else:
            reduced[[k, k - 1]] = reduced[[k - 1, k]]
            transform[[k, k - 1]] = transform[[k - 1, k]]
            orthogonal, mu = gram_schmidt(reduced)
            k = max(k - 1, 1)
    return reduced, transform


@functools.lru_cache(maxsize=256)
def _reduced_basis(quantum_bytes):
    """(reduced basis, transform, inverse of the reduced basis, norms of its columns) of one quantum; cached
    because an MD run or a training set folds against the same few quanta over and over."""
    reduced, transform = reduce_lattice_basis(np.frombuffer(quantum_bytes, dtype=float).reshape(3, 3))
    inverse = np.linalg.inv(reduced)
    return reduced, transform, inverse, np.linalg.norm(inverse, axis=0)


def _nearest_lattice_coefficients_one(delta, quantum):
    reduced, transform, inverse, column_norms = _reduced_basis(quantum.tobytes())
    fractional = delta @ inverse
    rounded = np.round(fractional)
    rounded_length = np.linalg.norm(delta - rounded @ reduced)
    # a tiny margin so that an image exactly on the box boundary is not lost to round-off
    radius = rounded_length * (1 + 1e-12) + 1e-12
    low = np.ceil(fractional - radius * column_norms).astype(np.int64)
    high = np.floor(fractional + radius * column_norms).astype(np.int64)
    candidates = np.array(list(itertools.product(*(range(a, b + 1) for a, b in zip(low, high)))), dtype=float)
    lengths = np.linalg.norm(delta - candidates @ reduced, axis=1)
    best = int(np.argmin(lengths))
    chosen = candidates[best] if lengths[best] < rounded_length * (1 - 1e-12) else rounded
    return chosen @ transform  # coefficients in the original basis: chosen @ reduced = (chosen @ transform) @ quantum


def nearest_lattice_coefficients(delta, quantum):
    """Integers n (…, 3) (as floats) with delta - n @ quantum the shortest vector of its coset (numpy, float64).

    `delta` (…, 3); `quantum` (…, 3, 3) with the lattice vectors as rows, broadcast against `delta`.
    """
    delta = np.asarray(delta, dtype=float)
    quantum = np.asarray(quantum, dtype=float)
    batch_shape = np.broadcast_shapes(delta.shape[:-1], quantum.shape[:-2])
    delta = np.broadcast_to(delta, batch_shape + (3,)).reshape(-1, 3)
    quantum = np.broadcast_to(quantum, batch_shape + (3, 3)).reshape(-1, 3, 3)
    coefficients = [_nearest_lattice_coefficients_one(d, np.ascontiguousarray(q)) for d, q in zip(delta, quantum)]
    return np.array(coefficients, dtype=float).reshape(batch_shape + (3,))


def fold_dipole_difference(delta, quantum):
    """The minimum image (…, 3) of a dipole difference on the lattice spanned by the rows of `quantum` (…, 3, 3).

    Exact in any cell (module docstring). Works on numpy arrays and on torch tensors; for tensors the result is
    differentiable with respect to `delta` (the subtracted integers are piecewise constant, so the gradient is the
    identity), and `quantum` is not differentiated. The integer search runs in float64 numpy on detached copies.
    """
    if isinstance(delta, torch.Tensor):
        quantum = torch.as_tensor(quantum, dtype=delta.dtype, device=delta.device).detach()
        integers = nearest_lattice_coefficients(delta.detach().to(torch.float64).cpu().numpy(),
                                                quantum.to(torch.float64).cpu().numpy())
        integers = torch.as_tensor(integers, dtype=delta.dtype, device=delta.device)
        return delta - torch.einsum("...i,...ij->...j", integers, quantum)
    delta = np.asarray(delta, dtype=float)
    quantum = np.asarray(quantum, dtype=float)
    return delta - np.einsum("...i,...ij->...j", nearest_lattice_coefficients(delta, quantum), quantum)


def common_lattice_coefficients(deltas, quanta):
    """One integer vector n (3,) minimising Σ_r |deltas[r] - n @ quanta[r]|² (numpy, float64).

    The shift that moves several dipole labels of one branch (e.g. the zero-field and ±ε frames of a structure)
    onto another branch together, so that they stay on one branch. Expanding the sum gives n G nᵀ - 2 n·b with
    G = Σ_r Q_r Q_rᵀ and b = Σ_r Q_r d_r; with G = L Lᵀ (Cholesky) that is |n @ L - t|² - const for
    t = L⁻¹ b, a closest-vector problem in the lattice with rows L, solved exactly by the same search as the fold.
    """
    deltas = np.asarray(deltas, dtype=float).reshape(-1, 3)
    quanta = np.broadcast_to(np.asarray(quanta, dtype=float), (len(deltas), 3, 3))
    gram = np.einsum("rij,rkj->ik", quanta, quanta)
    projected = np.einsum("rij,rj->i", quanta, deltas)
    lower = np.linalg.cholesky(gram)
    target = np.linalg.solve(lower, projected)
    return nearest_lattice_coefficients(target, lower)
