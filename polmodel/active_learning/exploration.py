"""The exploration schedule of the active-learning loop (pure Python; the workchains call these functions).

DP-GEN explores in stages: each stage a set of MD conditions, and the loop moves on to the next, harder stage once
the model is accurate on the current one. Here a stage is a list of temperatures, a field amplitude and a run
length (`ExplorationStage`); the loop advances when the accurate fraction of the current stage's exploration
reaches `stage_threshold` (`next_stage`). Fields are explored only within the range the labels cover plus a
stated margin (`capped_field_protocol`, `covered_field`): the model is asked to extrapolate in field by at most
the margin, and because selected frames are labelled at the field they were sampled at, the covered range grows
with the labels, iteration by iteration, up to the stage's amplitude.
"""
from dataclasses import asdict, dataclass

import numpy as np

from polmodel.data.frames import frame_efield


@dataclass(frozen=True)
class ExplorationStage:
    """One stage: MD temperatures (K), the largest field amplitude (V/Å) of its field protocols, steps per run."""

    temperatures: tuple
    field_amplitude: float
    steps: int

    def __post_init__(self):
        temperatures = tuple(float(t) for t in self.temperatures)
        if not temperatures or min(temperatures) < 0:
            raise ValueError(f"a stage needs one or more temperatures >= 0 K, got {self.temperatures}")
        if not self.field_amplitude >= 0:
            raise ValueError(f"field_amplitude must be >= 0 V/Å, got {self.field_amplitude}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        object.__setattr__(self, "temperatures", temperatures)
        object.__setattr__(self, "field_amplitude", float(self.field_amplitude))
        object.__setattr__(self, "steps", int(self.steps))

    @classmethod
    def from_dict(cls, values):
        unknown = sorted(set(values) - {"temperatures", "field_amplitude", "steps"})
        if unknown:
            raise ValueError(f"unknown stage key(s) {unknown}; known: field_amplitude, steps, temperatures")
        return cls(**values)

    def as_dict(self):
        return asdict(self)


def validate_schedule(stages):
    """The stages as ExplorationStage objects; a schedule must not get easier from one stage to the next."""
    parsed = [ExplorationStage.from_dict(dict(stage)) for stage in stages]
    if not parsed:
        raise ValueError("the exploration schedule needs at least one stage")
    for before, after in zip(parsed, parsed[1:]):
        if (after.field_amplitude < before.field_amplitude or after.steps < before.steps
                or max(after.temperatures) < max(before.temperatures)):
            raise ValueError(f"stages must not get easier: {before.as_dict()} is followed by {after.as_dict()}")
    return parsed


def next_stage(stage_index, accurate_fraction, stage_threshold, num_stages):
    """The stage of the next iteration: one further once the accurate fraction reached `stage_threshold`."""
    if accurate_fraction >= stage_threshold and stage_index + 1 < num_stages:
        return stage_index + 1
    return stage_index


def field_peak(protocol):
    """The largest field magnitude (V/Å) a field protocol dict (polmodel.dynamics.fields) ever applies."""
    kind = protocol["kind"]
    if kind == "static":
        return float(np.linalg.norm(protocol["vector"]))
    if kind == "ramp":
        return float(max(np.linalg.norm(protocol["start"]), np.linalg.norm(protocol["stop"])))
    if kind == "cosine":
        return abs(float(protocol["amplitude"]))
    raise ValueError(f"unknown field protocol kind {kind!r}")


def capped_field_protocol(protocol, amplitude):
    """`protocol` scaled so that its peak field is `amplitude` V/Å (shape, axis, period kept); zero amplitude, or
    a protocol that applies no field, gives the static zero field."""
    peak = field_peak(protocol)
    if amplitude <= 0.0 or peak == 0.0:
        return {"kind": "static", "vector": [0.0, 0.0, 0.0]}
    scale = amplitude / peak
    scaled = dict(protocol)
    if protocol["kind"] == "static":
        scaled["vector"] = [scale * float(x) for x in protocol["vector"]]
    elif protocol["kind"] == "ramp":
        scaled["start"] = [scale * float(x) for x in protocol["start"]]
        scaled["stop"] = [scale * float(x) for x in protocol["stop"]]
    else:
        scaled["amplitude"] = scale * float(protocol["amplitude"])
    return scaled


def stage_field_protocols(protocols, stage_amplitude, covered, margin):
    """The field protocols of one exploration: each shape of `protocols` at peak min(stage amplitude, covered +
    margin), duplicates removed (in a zero-field stage every shape becomes the same zero field)."""
    amplitude = min(float(stage_amplitude), float(covered) + float(margin))
    result = []
    for protocol in protocols:
        capped = capped_field_protocol(protocol, amplitude)
        if capped not in result:
            result.append(capped)
    return result


def covered_field(frames):
    """The largest field magnitude (V/Å) among labelled frames (`info['efield']`; a frame without one is at zero)."""
    magnitudes = [float(np.linalg.norm(frame_efield(frame))) for frame in frames]
    return max(magnitudes, default=0.0)
