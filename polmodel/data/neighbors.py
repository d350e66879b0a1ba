"""Neighbour lists (vesin, linear scaling) in the edge convention of polmodel/data/keys.py.

An edge (i, j, S) says that atom j, translated by the integer lattice shift S, lies within the cutoff of atom i:
r_ij = r_j - r_i + S @ cell. Periodic images of an atom itself are edges (small cells need them); the atom at
zero shift is not. Edges come sorted by receiver, then sender, then shift.
"""
import ctypes

import numpy as np
import vesin


def _compute(calculator, **arguments):
    """`calculator.compute(...)` without its memory leak: vesin's NumPy output goes through
    `numpy.ctypeslib.as_array(pointer, shape)`, which makes a ctypes array type for every new pair count, and
    ctypes keeps each such type for good as a key of its pointer-type cache. MD meets a new pair count at almost
    every step (every chunk's, on the chunked path), so a run's memory grew with its length (tests/test_md_streaming.py;
    benchmarks/README.md "Neighbour lists"). The cache entries this call added are dropped again; the returned arrays
    keep their own types alive for as long as they live."""
    cache = getattr(ctypes, "_pointer_type_cache", None)
    before = set(cache) if cache is not None else None
    try:
        return calculator.compute(**arguments)
    finally:
        if cache is not None:
            for key in set(cache) - before:
                if isinstance(key, type) and issubclass(key, ctypes.Array):
                    del cache[key]


def neighbor_list(positions, cell, pbc, cutoff):
    """Full neighbour list within `cutoff` (Å).

    positions (N, 3) Å, cell (3, 3) Å with rows as lattice vectors (zeros allowed for open boundaries),
    pbc (3,) bool. Returns (edge_index (2, E) int64 [receiver i, sender j], cell_shift (E, 3) float64).
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {positions.shape}")
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions contain NaN or infinite values")
    if pbc.any():
        periodic_vectors = cell[pbc]
        if np.linalg.matrix_rank(periodic_vectors) < len(periodic_vectors):
            raise ValueError(f"cell {cell.tolist()} is degenerate along its periodic directions (pbc={pbc.tolist()})")
        if not pbc.all() and abs(np.linalg.det(cell)) < 1e-12:
            raise ValueError("a partially periodic structure needs a non-degenerate cell "
                             "(give the non-periodic directions a vacuum vector)")
    if len(positions) == 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.float64)

    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    receivers, senders, shifts = _compute(calculator, points=positions, box=cell, periodic=pbc.tolist(),
                                          quantities="ijS")
    receivers = receivers.astype(np.int64)
    senders = senders.astype(np.int64)
    shifts = shifts.astype(np.float64)
    not_self = (receivers != senders) | np.any(shifts != 0, axis=1)
    receivers, senders, shifts = receivers[not_self], senders[not_self], shifts[not_self]
    # receiver-major order: deterministic, and the neighbour sum (index_add over receivers) is faster on it
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], senders, receivers))
    return np.stack([receivers[order], senders[order]]), shifts[order]


def open_boundary_pairs(positions, cutoff, receivers_mask=None):
    """Edges (2, E) [receiver, sender] within `cutoff` among points with open boundaries (no shifts), sorted by
    receiver then sender; with `receivers_mask` (N,) bool, only the edges whose receiver is marked.

    The chunks of polmodel/nn/chunked.py are open clusters of periodic images, with millions of edges each: this
    skips the shifts and the five-key sort of `neighbor_list`, which cost several times vesin's own search.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    if len(positions) == 0:
        return np.zeros((2, 0), dtype=np.int64)
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    receivers, senders = _compute(calculator, points=positions, box=np.zeros((3, 3)), periodic=False,
                                  quantities="ij")
    receivers = receivers.astype(np.int64)
    senders = senders.astype(np.int64)
    if receivers_mask is not None:
        keep = receivers_mask[receivers]
        receivers, senders = receivers[keep], senders[keep]
    order = np.lexsort((senders, receivers))
    return np.stack([receivers[order], senders[order]])
