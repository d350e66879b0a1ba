"""One frame's ensemble spread of a response quantity as one number, in the unit of the error it is compared with.

MD records it for every frame it writes (polmodel.dynamics.md), and selection compares it with a threshold that
follows the model's validation error (polmodel.active_learning.selection.adapt_trust_window): both sides must
use this one definition, so it lives below both.
"""
import numpy as np
import numpy.typing as npt


def polarizability_spread(polarizability_std: npt.ArrayLike, num_atoms: int) -> float:
    """One frame's α spread in the unit of the α error (polmodel.training.losses.QUANTITY_UNITS: e·Å²/V per atom,
    per component): the root mean square over the 9 components of the members' α std (3, 3), divided by the
    number of atoms, so that a threshold of `response_threshold_factor` × the validation α RMSE compares like
    with like (the norm of the cell's α std is about 3N times the error it would be compared with)."""
    spread = np.asarray(polarizability_std, dtype=float)
    if spread.shape != (3, 3):
        raise ValueError(f"polarizability_std must be (3, 3), got shape {spread.shape}")
    if int(num_atoms) < 1:
        raise ValueError(f"num_atoms must be at least 1, got {num_atoms}")
    return float(np.sqrt(np.mean(spread ** 2)) / int(num_atoms))
