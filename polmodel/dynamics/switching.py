"""Ferroelectric switching runs: a poling hold at +amplitude, then one cosine cycle of the field, in Nosé–Hoover
NVT at fixed cell; Allegro-pol's coercive-field protocol by default (data/allegro_pol/README.md).

`SwitchingProtocol` holds every setting and makes the field protocol; `run_switching` runs (or continues) one
run of it with `run_md`, whose trajectory, P(t) file and restart checkpoint make a killed run continue exactly.
The analysis of the runs is polmodel/analysis/switching.py.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polmodel.dynamics.fields import CosineField
from polmodel.dynamics.md import MDSettings, run_md


@dataclass(frozen=True)
class SwitchingProtocol:
    """Allegro-pol's coercive-field runs (the defaults): 10 ps at +0.3636 V/Å along z, then ε(t) = amplitude ·
    cos(2π t / 200 ps), Nosé–Hoover NVT with a 0.2 ps damping time, 2 fs steps.

    temperature_K; amplitude V/Å; period_fs and hold_fs fs; axis the field direction; timestep_fs fs;
    thermostat_time_fs the Nosé–Hoover damping time; sample_window_fs / sample_every_fs: P is averaged over
    windows this long, this often, in the analysis (default period/200 and period/100: Allegro-pol's 1 ps every
    2 ps at 200 ps). polarization_interval, frame_interval and checkpoint_interval (steps): the P(t) row, the
    trajectory frame and the restart checkpoint are written this often."""
    temperature_K: float = 300.0
    amplitude: float = 0.3636
    period_fs: float = 200_000.0
    hold_fs: float = 10_000.0
    axis: tuple = (0.0, 0.0, 1.0)
    timestep_fs: float = 2.0
    thermostat_time_fs: float = 200.0
    sample_window_fs: float = None
    sample_every_fs: float = None
    polarization_interval: int = 5
    frame_interval: int = 5000
    checkpoint_interval: int = 250

    def __post_init__(self):
        field = CosineField(self.amplitude, self.period_fs, self.axis, hold_fs=self.hold_fs)  # checks them
        object.__setattr__(self, "axis", field.axis)
        for name in ("temperature_K", "timestep_fs", "thermostat_time_fs"):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.sample_window_fs is None:
            object.__setattr__(self, "sample_window_fs", self.period_fs / 200.0)
        if self.sample_every_fs is None:
            object.__setattr__(self, "sample_every_fs", self.period_fs / 100.0)
        if not (0 < self.sample_window_fs <= self.sample_every_fs):
            raise ValueError("the sampling window must be positive and no longer than the sampling interval, got "
                             f"{self.sample_window_fs} fs every {self.sample_every_fs} fs")
        for name in ("polarization_interval", "frame_interval", "checkpoint_interval"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive number of steps, got {value!r}")
        duration = self.hold_fs + self.period_fs
        if abs(duration / self.timestep_fs - round(duration / self.timestep_fs)) > 1e-9:
            raise ValueError(f"hold + period ({duration:g} fs) must be a whole number of {self.timestep_fs:g} fs steps")

    @property
    def field(self):
        return CosineField(self.amplitude, self.period_fs, self.axis, hold_fs=self.hold_fs)

    @property
    def steps(self):
        """Steps of one run: the hold and one full cycle."""
        return int(round((self.hold_fs + self.period_fs) / self.timestep_fs))

    def md_settings(self, *, seed, spread_threshold=None):
        """The `run_md` settings of one run of this protocol with velocity seed `seed` (Nosé–Hoover NVT, the
        protocol's intervals); spread_threshold as MDSettings' (None: no check)."""
        return MDSettings(steps=self.steps, timestep_fs=self.timestep_fs, temperature_K=self.temperature_K,
                          thermostat="nose-hoover", friction=1.0 / self.thermostat_time_fs, seed=seed,
                          interval=self.frame_interval, polarization_interval=self.polarization_interval,
                          checkpoint_interval=self.checkpoint_interval, spread_threshold=spread_threshold)

    def as_dict(self):
        data = asdict(self)
        data["axis"] = list(self.axis)
        return data


def run_path(directory, seed):
    """The trajectory of the run with velocity seed `seed` (its P(t) file and checkpoint lie beside it)."""
    return Path(directory) / f"seed-{int(seed)}.xyz"


def run_switching(atoms, calculator, protocol, *, seed, directory, progress=True, spread_threshold=None):
    """Run, or continue where it stopped, the switching run with velocity seed `seed` in `directory`; returns
    its trajectory path. The calculator's coupling (network or first-order) is recorded with the run;
    spread_threshold: as MDSettings' (ensembles: warn once where the force spread passes it)."""
    path = run_path(directory, seed)
    run_md(atoms, calculator, protocol.field, protocol.md_settings(seed=seed, spread_threshold=spread_threshold),
           trajectory_path=path, progress=progress)
    return path
