"""Import e3nn 0.4.4 under torch >= 2.6.

e3nn 0.4.4 (the version mace-torch pins, so both live in one environment) loads its Wigner constants with a
plain `torch.load`, which torch >= 2.6 runs with `weights_only=True`; the file holds `slice` objects, which are
harmless but not on torch's allow-list. Allow exactly that type, then import. Import e3nn through this module.
"""
import torch.serialization

torch.serialization.add_safe_globals([slice])

import e3nn  # noqa: E402
from e3nn import nn, o3  # noqa: E402,F401

__all__ = ["e3nn", "o3", "nn"]
