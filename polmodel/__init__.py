"""polmodel: a field-aware equivariant energy E(R, cell, field) whose derivatives are the electric response.

Subpackages, each described in its own docstring: data (inputs, labelled frames, units) → nn (the model, its
derivatives, model files) → training, dynamics (calculator, MD, LAMMPS), analysis (spectra, phonons, observables);
active_learning (the loop's pure decisions), runtime (device, memory) and cli (the `polmodel` command). The AiiDA
plugins and workflows install as polmodel.plugins and polmodel.workflows. Importing this package never imports AiiDA.
"""
import typing as _typing

from polmodel._version import __version__  # noqa: F401

if _typing.TYPE_CHECKING:  # what __getattr__ gives, for type checkers (tests/test_typing.py)
    from polmodel.dynamics.calculator import PolCalculator  # noqa: F401
    from polmodel.nn.ensemble import PolEnsemble  # noqa: F401
    from polmodel.nn.model import PolModel  # noqa: F401
    from polmodel.nn.serialization import load  # noqa: F401


def __getattr__(name: str) -> object:
    # Lazy so that `import polmodel` stays light (the CLI, AiiDA plugins and tests import pieces).
    if name == "PolModel":
        from polmodel.nn.model import PolModel
        return PolModel
    if name == "PolEnsemble":
        from polmodel.nn.ensemble import PolEnsemble
        return PolEnsemble
    if name == "PolCalculator":
        from polmodel.dynamics.calculator import PolCalculator
        return PolCalculator
    if name == "load":
        from polmodel.nn.serialization import load
        return load
    raise AttributeError(f"module 'polmodel' has no attribute {name!r}")
