"""ε∞ from the polarizability: the one home of the formula, below both the model's response (polmodel/nn/response.py,
the DIELECTRIC output) and the analysis (polmodel.analysis.spectra, which re-exports it)."""
import numpy as np

from polmodel.data.units import EPSILON0_E_PER_V_ANGSTROM


def dielectric_from_polarizability(polarizability, volume):
    """ε∞ = 1 + α/(ε_vac Ω): α (..., 3, 3) e·Å²/V, Ω Å³ (a number, or an array/tensor broadcastable against α,
    e.g. shape (G, 1, 1) for a batch). NumPy arrays or torch tensors; the one home of this formula."""
    if hasattr(polarizability, "new_tensor"):  # torch: stay on the tensor's device, dtype and graph
        identity = polarizability.new_tensor(np.eye(3))
    else:
        polarizability = np.asarray(polarizability, dtype=float)
        if polarizability.shape[-2:] != (3, 3):
            raise ValueError(f"polarizability must be (..., 3, 3), got {polarizability.shape}")
        if not np.all(np.asarray(volume) > 0):
            raise ValueError(f"volume must be positive, got {volume}")
        identity = np.eye(3)
    return identity + polarizability / (EPSILON0_E_PER_V_ANGSTROM * volume)
