"""Field protocols: the homogeneous electric field (V/Å) as a function of simulation time (fs).

A protocol is a small immutable object; `protocol(time_fs)` returns the (3,) field vector, `protocol.as_dict()`
gives its JSON form ({"kind": "static" | "ramp" | "cosine", ...}) and `field_protocol_from_dict` reads it back.
"""
import difflib
import json
import math
from dataclasses import MISSING, dataclass, fields

import numpy as np

# Sanity limit on the field magnitude. Far below it a real insulator already breaks down (Zener tunnelling
# sets in once |ε|·L ≳ E_gap/e; for BaTiO3, a gap of ~3 eV over a few-nm supercell gives ~0.1 V/Å), so a larger
# value is a unit mistake (V/m, MV/cm or Ry a.u. passed as V/Å), not a simulation setting.
MAX_FIELD_V_PER_ANGSTROM = 1.0


def validate_field_vector(vector, name="field"):
    """Return `vector` as a float (3,) array, or raise ValueError for a bad shape, non-finite values or a
    magnitude above `MAX_FIELD_V_PER_ANGSTROM`."""
    try:
        array = np.asarray(vector, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be three numbers in V/Å, got {vector!r}") from error
    if array.shape != (3,):
        raise ValueError(f"{name} must be a 3-vector in V/Å, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    _check_magnitude(float(np.linalg.norm(array)), name)
    return array


def _check_magnitude(magnitude, name):
    if magnitude > MAX_FIELD_V_PER_ANGSTROM:
        raise ValueError(
            f"{name} of {magnitude:g} V/Å exceeds the sanity limit of {MAX_FIELD_V_PER_ANGSTROM:g} V/Å: an "
            "insulator suffers Zener breakdown (interband tunnelling) long before that, so the model would be far "
            "outside anything DFT can label. Fields are in V/Å (1 V/Å = 100 MV/cm = 1e10 V/m).")


def _finite_number(value, name):
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class StaticField:
    """A constant field `vector` (V/Å)."""
    vector: tuple

    def __post_init__(self):
        object.__setattr__(self, "vector", tuple(validate_field_vector(self.vector, "static field").tolist()))

    def __call__(self, time_fs):
        return np.array(self.vector, dtype=float)

    def as_dict(self):
        return {"kind": "static", "vector": list(self.vector)}


@dataclass(frozen=True)
class RampField:
    """A field that goes linearly from `start` to `stop` (V/Å) during `duration_fs`, then stays at `stop`."""
    start: tuple
    stop: tuple
    duration_fs: float

    def __post_init__(self):
        object.__setattr__(self, "start", tuple(validate_field_vector(self.start, "ramp start").tolist()))
        object.__setattr__(self, "stop", tuple(validate_field_vector(self.stop, "ramp stop").tolist()))
        duration = _finite_number(self.duration_fs, "ramp duration_fs")
        if duration <= 0.0:
            raise ValueError(f"ramp duration_fs must be positive, got {duration:g} fs")
        object.__setattr__(self, "duration_fs", duration)

    def __call__(self, time_fs):
        fraction = min(max(float(time_fs) / self.duration_fs, 0.0), 1.0)
        start, stop = np.array(self.start), np.array(self.stop)
        return start + fraction * (stop - start)

    def as_dict(self):
        return {"kind": "ramp", "start": list(self.start), "stop": list(self.stop), "duration_fs": self.duration_fs}


@dataclass(frozen=True)
class CosineField:
    """ε(t) = amplitude · cos(2π (t - hold_fs) / period_fs + phase) · axis/|axis|, amplitude in V/Å, phase in
    radians; for t < hold_fs the field stays at its value at t = hold_fs (a poling hold before the cycle).

    With the default phase the field starts at +amplitude; a hysteresis cycle is one period."""
    amplitude: float
    period_fs: float
    axis: tuple
    phase: float = 0.0
    hold_fs: float = 0.0

    def __post_init__(self):
        amplitude = _finite_number(self.amplitude, "cosine amplitude")
        _check_magnitude(abs(amplitude), "cosine amplitude")
        period = _finite_number(self.period_fs, "cosine period_fs")
        if period <= 0.0:
            raise ValueError(f"cosine period_fs must be positive, got {period:g} fs")
        try:
            axis = np.asarray(self.axis, dtype=float)
        except (TypeError, ValueError) as error:
            raise ValueError(f"cosine axis must be three numbers, got {self.axis!r}") from error
        if axis.shape != (3,) or not np.all(np.isfinite(axis)):
            raise ValueError(f"cosine axis must be a finite 3-vector, got {self.axis!r}")
        norm = float(np.linalg.norm(axis))
        if norm == 0.0:
            raise ValueError("cosine axis must be a non-zero vector (it sets the field direction)")
        object.__setattr__(self, "amplitude", amplitude)
        object.__setattr__(self, "period_fs", period)
        object.__setattr__(self, "axis", tuple((axis / norm).tolist()))
        object.__setattr__(self, "phase", _finite_number(self.phase, "cosine phase"))
        hold = _finite_number(self.hold_fs, "cosine hold_fs")
        if hold < 0.0:
            raise ValueError(f"cosine hold_fs must be >= 0, got {hold:g} fs")
        object.__setattr__(self, "hold_fs", hold)

    def __call__(self, time_fs):
        angle = 2.0 * math.pi * max(float(time_fs) - self.hold_fs, 0.0) / self.period_fs + self.phase
        return self.amplitude * math.cos(angle) * np.array(self.axis)

    def as_dict(self):
        data = {"kind": "cosine", "amplitude": self.amplitude, "period_fs": self.period_fs,
                "axis": list(self.axis), "phase": self.phase}
        if self.hold_fs:   # absent when zero, so trajectories recorded before it existed continue unchanged
            data["hold_fs"] = self.hold_fs
        return data


_KINDS = {"static": StaticField, "ramp": RampField, "cosine": CosineField}


def field_protocol_from_dict(data):
    """Build a protocol from its `as_dict()` form; unknown kinds or keys raise ValueError."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"a field protocol is a dict with a 'kind' key ({', '.join(_KINDS)}), got {data!r}")
    parameters = dict(data)
    kind = parameters.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown field protocol kind {kind!r}; expected one of {', '.join(_KINDS)}")
    known = [item.name for item in fields(_KINDS[kind])]
    unknown = [name for name in parameters if name not in known]
    if unknown:
        hints = [f"{name!r}" + "".join(f" (did you mean {match!r}?)"
                                       for match in difflib.get_close_matches(str(name), known, n=1))
                 for name in unknown]
        raise ValueError(f"unknown key(s) {', '.join(hints)} in a {kind!r} field protocol; its keys are kind, "
                         f"{', '.join(known)}")
    missing = [item.name for item in fields(_KINDS[kind])
               if item.default is MISSING and item.name not in parameters]
    if missing:
        raise ValueError(f"a {kind!r} field protocol needs {', '.join(missing)}")
    return _KINDS[kind](**parameters)


def field_protocol_from_json(text_or_path):
    """Read a protocol from a JSON string or a JSON file path (what `polmodel md --field` accepts)."""
    text = str(text_or_path).strip()
    if not text.startswith("{"):
        try:
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ValueError(f"--field is neither a JSON object nor a readable file: {text_or_path!r}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"field protocol is not valid JSON: {error}") from error
    return field_protocol_from_dict(data)
