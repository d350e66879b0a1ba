"""One frame's ensemble spread of a quantity as one number, and the frame's error in the same form.

MD records the spreads for every frame it writes (polmodel.dynamics.md); training measures, on its validation
frames, both the spreads and the errors in these forms (polmodel.training.evaluation.spread_calibration); selection
compares a frame's spread with a level that follows the model's error, scaled by that measured ratio
(polmodel.active_learning.selection.adapt_trust_window). All three must use one definition, so it lives below them.
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


def largest_atom_norm(values: npt.ArrayLike) -> float:
    """The largest per-atom norm of (N, ...) values: the largest atomic force spread (eV/Å) from the (N, 3)
    per-component spreads, the largest atomic Z* spread (e) from (N, 3, 3), or the same of an error."""
    array = np.asarray(values, dtype=float)
    return float(np.linalg.norm(array.reshape(len(array), -1), axis=1).max())
