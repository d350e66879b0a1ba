"""Molecular dynamics under a (time-dependent) homogeneous field, on ASE's integrators.

The calculator's energy is the electric enthalpy, so NVE at a static field conserves enthalpy + kinetic energy.
For a time-dependent field the field of every force evaluation is the protocol's value at the time of the
positions being evaluated: before step n → n+1 the calculator is told the field at t_{n+1}, while the cached
forces at t_n (computed at ε(t_n)) stay valid for the first half kick.

`run_md(atoms, calculator, protocol, settings, trajectory_path=..., restart=..., progress=...)`: what the run is
(length, integrator, thermostat, what it records and how often) is one `MDSettings`, checked when it is made; where
it writes and whether it continues are run_md's own keywords.

Output: an extended-XYZ trajectory, one frame every `interval` steps (frame 0 is the start) and one at the last
step when it falls between (`--steps 15 --interval 10` ends at step 15), each frame's info
holding time_fs, step, efield, energy (enthalpy, eV), kinetic_energy, temperature, dipole, polarization (periodic
cells), and for ensembles energy_std, polarization_std, max_force_std, and with born_spread the response's
spreads max_born_charge_std (e, the largest atom's, norm over its 9 components) and polarizability_spread
(e·Å²/V per atom, polmodel.active_learning.selection.polarizability_spread); arrays forces and forces_std. The first frame also holds the run's settings (`md_*` keys: field protocol,
thermostat, timestep, temperature, friction, pressure, interval) and, for ensembles, `force_spread_threshold`;
a restart with other settings is refused (RestartMismatchError), since appending it would give a trajectory
that no single run made.
Next to it `<trajectory>.polarization.csv` (polmodel/dynamics/polarization_log.py) gets one row per step, or
every `polarization_interval` steps: time, field, cell dipole, polarization, volume, enthalpy, kinetic energy and
temperature, flushed as it goes; the trajectory stays the subsample. Nothing per step is kept in memory: a run's
memory does not grow with its length (tested).
`<trajectory>.restart.npz` keeps the last frame's exact state (extxyz rounds positions to 1e-8 Å)
plus thermostat and random-number state, so a restarted run reproduces the uninterrupted one.

Trust: with an ensemble, the largest atomic force spread is checked at every step against
`spread_threshold` (eV/Å). The first step above it gives one ForceSpreadWarning and is recorded as
`force_spread_exceeded_step` in every frame written from then on; with `stop_on_spread` the run stops there
and writes that step's frame (off the `interval` grid when it falls between frames) with `stopped_on_spread`.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from polmodel.data.spreads import largest_atom_norm, polarizability_spread
from polmodel.dynamics.polarization_log import PolarizationLog, polarization_log_path

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch
    from ase import Atoms
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.nvtberendsen import NVTBerendsen
    from ase.md.verlet import VelocityVerlet
    from numpy.typing import NDArray
    from tqdm import tqdm

    from polmodel.dynamics.calculator import PolCalculator

    # the integrators of THERMOSTATS (`_build_dynamics`)
    MolecularDynamics = VelocityVerlet | Langevin | NoseHooverChainNVT | NVTBerendsen | IsotropicMTKNPT


class FieldProtocol(Protocol):
    """A field protocol (polmodel/dynamics/fields.py): the field (3,) V/Å at a time in fs, and its JSON-able record."""

    def __call__(self, time_fs: float) -> NDArray[np.float64]: ...

    def as_dict(self) -> dict[str, Any]: ...

# ASE is imported inside the functions: `polmodel md --help` reads THERMOSTATS and should not pay for ASE.
THERMOSTATS = ("nve", "langevin", "nose-hoover", "berendsen", "npt")
#: eV/Å; the limit on the largest atomic force spread of an ensemble during MD when neither the caller nor the
#: model file gives one: the default upper trust level of `polmodel.active_learning.selection.SelectionCriteria` (above it a
#: frame is "failed", i.e. outside anything the ensemble knows)
DEFAULT_SPREAD_THRESHOLD = 0.5
#: The model's own limit is this many times its validation force RMSE: the loop's lower trust level is twice the
#: validation error (`force_lower_factor`) and the upper at least twice the lower, so a spread past ~4-5x the
#: validation error is one the loop would not trust.
SPREAD_THRESHOLD_PER_VALIDATION_RMSE = 5.0
# the run settings a restart must share with the trajectory it continues (first-frame info keys)
_SETTINGS_PREFIX = "md_"
# what counts as a number in settings (bool is an int too: MDSettings refuses it where a number is meant)
_NUMBER_TYPES = (int, float, np.integer, np.floating)


class RestartMismatchError(ValueError):
    """A restart whose settings (field protocol, thermostat, timestep, ...) differ from the trajectory's."""


class RunInProgressError(ValueError):
    """Another process is writing the same trajectory (its lock file is held)."""


class ForceSpreadWarning(UserWarning):
    """The ensemble's force spread passed the MD run's threshold: the model is extrapolating."""


# Trajectory info keys that ASE's extxyz reader moves into a SinglePointCalculator; `read_trajectory` moves
# them back so the analysis sees one flat record per frame.
_CALCULATOR_KEYS = ("energy", "free_energy", "dipole", "polarization", "stress")


def checkpoint_path(trajectory_path: str | os.PathLike[str]) -> Path:
    return Path(f"{trajectory_path}.restart.npz")


def read_trajectory(path: str | Path, index: int | str = ":") -> list[Atoms]:
    """Frames of a `run_md` trajectory with every per-frame quantity in `atoms.info` / `atoms.arrays`."""
    import ase.io
    frames = ase.io.read(path, index=index, format="extxyz")
    if not isinstance(frames, list):
        frames = [frames]
    for atoms in frames:
        if atoms.calc is not None:
            for key, value in atoms.calc.results.items():
                if key == "forces":
                    atoms.arrays["forces"] = np.array(value)
                elif key in _CALCULATOR_KEYS:
                    atoms.info[key] = value
            atoms.calc = None
    return frames


def _build_dynamics(atoms: Atoms, thermostat: str, timestep_fs: float, temperature_K: float, friction: float,
                    rng: np.random.Generator, pressure_GPa: float) -> MolecularDynamics:
    from ase import units as ase_units
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.nvtberendsen import NVTBerendsen
    from ase.md.verlet import VelocityVerlet

    dt = timestep_fs * ase_units.fs
    relaxation_time = (1.0 / friction) * ase_units.fs  # friction is 1/fs
    if thermostat == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if thermostat == "langevin":
        return Langevin(atoms, timestep=dt, temperature_K=temperature_K, friction=friction / ase_units.fs,
                        fixcm=False, rng=rng)
    if thermostat == "nose-hoover":
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=relaxation_time)
    if thermostat == "berendsen":
        return NVTBerendsen(atoms, timestep=dt, temperature_K=temperature_K, taut=relaxation_time)
    if thermostat == "npt":
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_K,
                               pressure_au=pressure_GPa * ase_units.GPa, tdamp=relaxation_time,
                               pdamp=10.0 * relaxation_time)
    raise ValueError(f"unknown thermostat {thermostat!r}; expected one of {', '.join(THERMOSTATS)}")


def _thermostat_state(dynamics: MolecularDynamics) -> dict[str, list[float]]:
    thermostat = getattr(dynamics, "_thermostat", None)
    if thermostat is None:
        return {}
    return {"eta": thermostat._eta.tolist(), "p_eta": thermostat._p_eta.tolist()}


def _restore_thermostat_state(dynamics: MolecularDynamics, state: Mapping[str, Any] | None) -> None:
    thermostat = getattr(dynamics, "_thermostat", None)
    if thermostat is not None and state:
        thermostat._eta = np.array(state["eta"])
        thermostat._p_eta = np.array(state["p_eta"])


def _frame(atoms: Atoms, calculator: PolCalculator, step: int, time_fs: float, born_spread: bool) -> Atoms:
    """A copy of `atoms` (positions, momenta) with this step's results in info/arrays."""
    from ase import Atoms

    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    # a fresh Atoms: labels carried by the starting structure (a DFT frame's info/arrays) do not belong here
    frame = Atoms(numbers=atoms.numbers, positions=atoms.get_positions(), cell=atoms.cell, pbc=atoms.pbc,
                  momenta=atoms.get_momenta())
    info = {"time_fs": float(time_fs), "step": int(step),
            "efield": np.array(calculator.results_efield, dtype=float),
            "energy": float(energy), "kinetic_energy": float(atoms.get_kinetic_energy()),
            "temperature": float(atoms.get_temperature()),
            "dipole": np.array(calculator.get_property("dipole", atoms))}
    if np.all(atoms.pbc):
        info["polarization"] = np.array(calculator.get_property("polarization", atoms))
    frame.arrays["forces"] = np.array(forces)
    if calculator.is_ensemble:
        info["energy_std"] = float(calculator.get_property("energy_std", atoms))
        forces_std = np.array(calculator.get_property("forces_std", atoms))
        frame.arrays["forces_std"] = forces_std
        info["max_force_std"] = largest_atom_norm(forces_std)
        if np.all(atoms.pbc):
            info["polarization_std"] = np.array(calculator.get_property("polarization_std", atoms))
        if born_spread:
            born_std = np.array(calculator.get_property("born_effective_charges_std", atoms))
            info["max_born_charge_std"] = largest_atom_norm(born_std)
            alpha_std = calculator.get_property("polarizability_std", atoms)
            info["polarizability_spread"] = polarizability_spread(alpha_std, len(atoms))
    frame.info = info
    return frame


def _write_checkpoint(path: Path, atoms: Atoms, step: int, time_fs: float, dynamics: MolecularDynamics,
                      rng: np.random.Generator) -> None:
    state = {"thermostat": _thermostat_state(dynamics), "rng": rng.bit_generator.state}
    temporary = Path(f"{path}.tmp.npz")
    np.savez(temporary, step=step, time_fs=time_fs, positions=atoms.get_positions(),
             momenta=atoms.get_momenta(), cell=np.array(atoms.cell), state=json.dumps(state))
    os.replace(temporary, path)


def run_settings(protocol: FieldProtocol, settings: MDSettings, *, coupling: str = "network") -> dict[str, Any]:
    """The settings a trajectory is made with, as first-frame info entries (what a restart must repeat)."""
    thermostat = settings.thermostat
    record: dict[str, Any] = {"field": json.dumps(protocol.as_dict(), sort_keys=True), "thermostat": thermostat,
                              "timestep_fs": float(settings.timestep_fs), "interval": int(settings.interval)}
    if coupling != "network":   # recorded only when not the default, so older trajectories still continue
        record["coupling"] = coupling
    if settings.polarization_interval != 1:   # recorded only when not the default, so older trajectories still continue
        record["polarization_interval"] = int(settings.polarization_interval)
    if thermostat != "nve":   # NVE ignores these, so changing them on restart changes nothing
        record.update({"temperature_K": float(settings.temperature_K), "friction": float(settings.friction)})
    if thermostat == "npt":
        record["pressure_GPa"] = float(settings.pressure_GPa)
    return {_SETTINGS_PREFIX + name: value for name, value in record.items()}


def check_restart(trajectory_path: str | Path, atoms: Atoms, settings: Mapping[str, Any]) -> None:
    """Raise when the trajectory at `trajectory_path` cannot be continued from `atoms` with `settings`
    (`run_settings`): other atoms, other settings, or a file that is not a `run_md` trajectory.

    Trajectories written before the settings were recorded are continued without the settings check."""
    try:
        first = read_trajectory(trajectory_path, index=0)[0]
        last = read_trajectory(trajectory_path, index=-1)[-1]
    except Exception as error:  # ASE raises many types for a file that is not extended XYZ
        raise RestartMismatchError(f"cannot restart from {trajectory_path}: not a readable `polmodel md` "
                                   f"trajectory ({type(error).__name__}: {error})") from error
    if "step" not in last.info or "time_fs" not in last.info:
        raise RestartMismatchError(f"cannot restart from {trajectory_path}: not a `polmodel md` trajectory "
                                   "(its frames have no step and time_fs)")
    if len(last) != len(atoms) or np.any(last.numbers != atoms.numbers):
        raise RestartMismatchError(f"cannot restart from {trajectory_path}: its atoms ({last.get_chemical_formula()})"
                                   f" are not the starting structure's ({atoms.get_chemical_formula()})")
    recorded = {key: value for key, value in first.info.items() if key.startswith(_SETTINGS_PREFIX)}
    if not recorded:
        return
    differences = []
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if not _same_setting(old, new):
            differences.append(f"{key[len(_SETTINGS_PREFIX):]} was {old} and is now {new}")
    if differences:
        raise RestartMismatchError(f"cannot continue {trajectory_path} with other settings ({'; '.join(differences)})"
                                   ": give another output file, or start over with no restart")


def _same_setting(old: object, new: object) -> bool:
    if isinstance(old, _NUMBER_TYPES) and isinstance(new, _NUMBER_TYPES):
        return bool(np.isclose(float(old), float(new), rtol=1e-12, atol=0.0))  # extxyz round trip of floats
    return old == new


def saved_step(trajectory_path: str | os.PathLike[str]) -> int:
    """The step a restart of the trajectory at `trajectory_path` would continue from (0 when nothing is saved)."""
    checkpoint = checkpoint_path(trajectory_path)
    if not checkpoint.exists():
        return 0
    with np.load(checkpoint) as saved:
        return int(saved["step"])


def _resume(atoms: Atoms, trajectory_path: str | Path, timestep_fs: float) -> tuple[int, dict[str, Any]]:
    """Put the saved state on `atoms`: the checkpoint's when it is at or after the last frame (it is written
    with every frame and every `checkpoint_interval` steps), else the last frame's; returns (step, extra state)."""
    frames = read_trajectory(trajectory_path, index=-1)
    last = frames[-1]
    step = int(last.info["step"])
    if not np.isclose(float(last.info["time_fs"]), step * timestep_fs):
        raise ValueError(f"cannot restart from {trajectory_path}: its last frame is step {step} at "
                         f"{last.info['time_fs']} fs, which does not match a {timestep_fs} fs timestep")
    positions, momenta, cell, state = last.get_positions(), last.get_momenta(), np.array(last.cell), {}
    checkpoint = checkpoint_path(trajectory_path)
    if checkpoint.exists():
        with np.load(checkpoint) as saved:
            if int(saved["step"]) >= step and len(saved["positions"]) == len(atoms):
                step = int(saved["step"])
                positions, momenta, cell = saved["positions"], saved["momenta"], saved["cell"]
                state = json.loads(str(saved["state"]))
    atoms.set_cell(cell, scale_atoms=False)
    atoms.set_positions(positions)
    atoms.set_momenta(momenta)
    return step, state


def spread_threshold_of(model: torch.nn.Module) -> tuple[float, str]:
    """(threshold eV/Å, source text) for MD with `model`: SPREAD_THRESHOLD_PER_VALIDATION_RMSE times the mean
    validation force RMSE its members were saved with (`polmodel train` records it), else DEFAULT_SPREAD_THRESHOLD."""
    members = getattr(model, "members", [model])
    errors = []
    for member in members:
        validation = (getattr(member, "training_options", None) or {}).get("validation") or {}
        rmse = (validation.get("metrics", {}).get("forces") or {}).get("rmse")
        if rmse is None or not np.isfinite(rmse) or rmse <= 0:
            return DEFAULT_SPREAD_THRESHOLD, "default (the model file records no validation force error)"
        errors.append(float(rmse))
    error = float(np.mean(errors))
    return (SPREAD_THRESHOLD_PER_VALIDATION_RMSE * error,
            f"{SPREAD_THRESHOLD_PER_VALIDATION_RMSE:g} x the model's validation force RMSE {error:.3g} eV/Å")


#: fs·amu^-1/2: the longest timestep for the lightest mass m is this × √m. Velocity Verlet is unstable above
#: dt = T/π for the fastest vibration (period T); bonds of a light atom of mass m vibrate with T ∝ √m, and O–H
#: stretches (T ≈ 9 fs) put the limit for hydrogen near 3 fs, so 1.25 √m fs (1.3 fs for H, 5 fs for O, 15 fs for
#: Ba) refuses runs that would blow up while admitting every usual choice.
MAX_TIMESTEP_FS_PER_SQRT_AMU = 1.25


def check_timestep(timestep_fs: float, masses: npt.ArrayLike) -> None:
    """ValueError when the timestep is beyond MAX_TIMESTEP_FS_PER_SQRT_AMU × √(lightest mass)."""
    lightest = float(np.min(masses))
    limit = MAX_TIMESTEP_FS_PER_SQRT_AMU * np.sqrt(lightest)
    if timestep_fs > limit:
        raise ValueError(f"timestep {timestep_fs:g} fs is too long for the lightest atom ({lightest:.3g} amu): "
                         f"Verlet integration blows up; use at most {limit:.2g} fs")


def _number(value: object) -> float | None:
    """`value` as a float when it is a real number (not a bool, a string or None), else None."""
    if isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool):
        return float(value)
    return None


def _whole(name: str, value: object, smallest: int) -> int:
    """`value` as an int when it is a whole number >= `smallest` (5 and 5.0 are; True, 5.5 and "5" are not)."""
    number = _number(value)
    if number is None or not (np.isfinite(number) and number.is_integer() and number >= smallest):
        kind = "a non-negative" if smallest == 0 else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {value}")
    return int(value) if isinstance(value, (int, np.integer)) else int(number)   # exact beyond 2**53 (a seed)


def _real(name: str, value: object, requirement: str, allowed: Callable[[float], bool]) -> float:
    """`value` as a float when it is a number that `allowed` accepts, else ValueError naming `name`."""
    number = _number(value)
    if number is None or not allowed(number):
        raise ValueError(f"{name} must be {requirement}, got {value}")
    return number


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class MDSettings:
    """What an MD run of `run_md` is: its length, integrator and thermostat, what it records and how often.

    Every field is checked when the settings are made (ValueError naming the field), so bad settings are refused
    before any work; what needs the atoms or the calculator (the timestep against the lightest mass, npt on a
    periodic cell, born_spread with an ensemble) `run_md` checks. JSON-able through `as_dict` / `from_dict`.
    The field protocol, the calculator (and its coupling) and where the output goes are `run_md`'s other arguments.
    """

    steps: int                      # the total length of the run; a restart continues up to the same total
    timestep_fs: float              # fs
    temperature_K: float = 300.0    # K: the thermostat's target, and the Maxwell-Boltzmann temperature of the
    #                                 initial velocities when the atoms have none
    thermostat: str = "nve"         # one of THERMOSTATS
    friction: float = 0.01          # 1/fs: the Langevin friction, or the inverse relaxation time of the other
    #                                 thermostats (the NPT barostat relaxes 10x slower); NVE does not use it
    pressure_GPa: float = 0.0       # GPa, npt only
    seed: int = 0                   # initial velocities and Langevin noise
    interval: int = 10              # steps between trajectory frames
    polarization_interval: int = 1  # steps between rows of `<trajectory>.polarization.csv`
    checkpoint_interval: int | None = None  # steps between exact restart states besides those of the frames
    #                                         (None: with the frames only); a long run with sparse frames loses
    #                                         little work when killed
    born_spread: bool = False       # also record the ensemble's Z* and α spreads (second-derivative passes a frame)
    spread_threshold: float | None = DEFAULT_SPREAD_THRESHOLD  # eV/Å: the ensemble force spread above which the
    #                                 run warns once and records it (None: no check); module docstring
    stop_on_spread: bool = False    # stop at the step the spread passes spread_threshold instead of going on

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {"seed": _whole("seed", self.seed, 0)}
        if self.thermostat not in THERMOSTATS:
            raise ValueError(f"thermostat must be one of {', '.join(THERMOSTATS)}; got {self.thermostat!r}")
        checked["steps"] = _whole("steps", self.steps, 0)
        for name in ("interval", "polarization_interval"):
            checked[name] = _whole(name, getattr(self, name), 1)
        checked["timestep_fs"] = _real("timestep_fs", self.timestep_fs, "a positive number of fs",
                                       lambda value: bool(np.isfinite(value)) and value > 0)
        positive = self.thermostat != "nve"   # a thermostat needs a target above 0 K
        checked["temperature_K"] = _real(
            "temperature_K", self.temperature_K,
            f"a positive number of K for the {self.thermostat} thermostat" if positive else "a number >= 0 K",
            lambda value: bool(np.isfinite(value)) and (value > 0 if positive else value >= 0))
        checked["friction"] = _real("friction", self.friction, "a positive number of 1/fs",
                                    lambda value: bool(np.isfinite(value)) and value > 0)
        checked["pressure_GPa"] = _real("pressure_GPa", self.pressure_GPa, "a finite number of GPa",
                                        lambda value: bool(np.isfinite(value)))
        if self.spread_threshold is not None:
            checked["spread_threshold"] = _real("spread_threshold", self.spread_threshold,
                                                "a positive number of eV/Å or None",
                                                lambda value: bool(np.isfinite(value)) and value > 0)
        if self.checkpoint_interval is not None:
            checked["checkpoint_interval"] = _whole("checkpoint_interval", self.checkpoint_interval, 1)
        for name in ("born_spread", "stop_on_spread"):
            checked[name] = _flag(name, getattr(self, name))
        for name, value in checked.items():   # plain int / float / bool, as JSON and the record want them
            object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MDSettings:
        """From a JSON-able dict of the fields; unknown or missing keys are refused, naming them."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown MD settings {unknown}; known: {known}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if missing:
            raise ValueError(f"MD settings need {missing}")
        return cls(**values)


def run_md(atoms: Atoms, calculator: PolCalculator, protocol: FieldProtocol, settings: MDSettings, *,
           trajectory_path: str | os.PathLike[str] = "md.xyz", restart: bool = True, progress: bool = True) -> Atoms:
    """Run MD of `atoms` with `calculator` (a PolCalculator) under the field protocol `protocol` with `settings`.

    trajectory_path: the trajectory to write; its P(t) file, restart state and lock lie beside it.
    restart: continue an existing trajectory (False: overwrite it); a trajectory made with other settings
    (`run_settings`) raises RestartMismatchError. progress: show a progress bar.
    Returns the final atoms (a copy without calculator); its info has `force_spread_exceeded_step` when the
    spread passed the threshold and `stopped_on_spread` when the run stopped for it. A second process on the same
    trajectory raises RunInProgressError before it touches anything.
    """
    if not isinstance(settings, MDSettings):
        raise TypeError(f"settings must be an MDSettings (MDSettings.from_dict reads a dict), got "
                        f"{type(settings).__name__}")
    check_timestep(settings.timestep_fs, atoms.get_masses())
    if settings.thermostat == "npt" and not np.all(atoms.pbc):
        raise ValueError("the npt thermostat needs a periodic cell (a volume to hold at pressure)")
    if settings.born_spread and not calculator.is_ensemble:
        raise ValueError("born_spread needs an ensemble calculator (it is the spread over members)")
    trajectory_path = Path(trajectory_path)
    checkpoint = checkpoint_path(trajectory_path)
    polarization_path = polarization_log_path(trajectory_path)
    atoms = atoms.copy()
    rng = np.random.default_rng(settings.seed)
    with _exclusive(trajectory_path):
        return _run_locked(atoms, calculator, protocol, settings, trajectory_path=trajectory_path, restart=restart,
                           progress=progress, rng=rng, checkpoint=checkpoint, polarization_path=polarization_path)


@contextlib.contextmanager
def _exclusive(trajectory_path: Path) -> Iterator[None]:
    """Hold `<trajectory>.lock` while the run writes: a second process on the same trajectory (the same command
    started twice) would interleave its rows and checkpoints with the first's; it gets RunInProgressError."""
    import fcntl

    lock = Path(f"{trajectory_path}.lock")
    handle = open(lock, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunInProgressError(f"another process is running {trajectory_path} (it holds {lock}): wait for it or "
                                 "stop it first") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def _run_locked(atoms: Atoms, calculator: PolCalculator, protocol: FieldProtocol, settings: MDSettings, *,
                trajectory_path: Path, restart: bool, progress: bool, rng: np.random.Generator, checkpoint: Path,
                polarization_path: Path) -> Atoms:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    timestep_fs, temperature_K = settings.timestep_fs, settings.temperature_K
    recorded = run_settings(protocol, settings, coupling=getattr(calculator, "coupling", "network"))
    resuming = restart and trajectory_path.exists() and trajectory_path.stat().st_size > 0
    if resuming:
        check_restart(trajectory_path, atoms, recorded)
        step, state = _resume(atoms, trajectory_path, timestep_fs)
        if "rng" in state:
            rng.bit_generator.state = state["rng"]
    else:
        for path in (trajectory_path, checkpoint, polarization_path):
            if path.exists():
                path.unlink()
        step, state = 0, {}
        if not np.any(atoms.get_momenta()) and temperature_K > 0:
            MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
            Stationary(atoms)

    # time is step × timestep throughout, so a restarted run evaluates the protocol at bit-identical times
    time_fs = step * timestep_fs
    atoms.calc = calculator
    calculator.set(efield=protocol(time_fs))
    dynamics = _build_dynamics(atoms, settings.thermostat, timestep_fs, temperature_K, settings.friction, rng,
                               settings.pressure_GPa)
    _restore_thermostat_state(dynamics, state.get("thermostat"))

    import ase.io

    atoms.get_forces()  # cache the starting forces at the starting field before the protocol moves on
    watch = _SpreadWatch(settings.spread_threshold if calculator.is_ensemble else None, settings.stop_on_spread)
    watch.check(calculator, step)
    if resuming:
        polarization_log = PolarizationLog.resume(polarization_path, step, atoms, recorded,
                                                  settings.polarization_interval)
    else:
        polarization_log = PolarizationLog.start(polarization_path, atoms, recorded, settings.polarization_interval)
        polarization_log.write(step, time_fs, atoms, calculator)
        first = _frame(atoms, calculator, step, time_fs, settings.born_spread)
        first.info.update(recorded)
        if watch.threshold is not None:
            first.info["force_spread_threshold"] = float(watch.threshold)
        first.info.update(watch.record())
        ase.io.write(trajectory_path, first, format="extxyz")
        _write_checkpoint(checkpoint, atoms, step, time_fs, dynamics, rng)

    remaining = max(settings.steps - step, 0)
    bar = None
    if progress and remaining:
        from tqdm import tqdm
        bar = tqdm(total=remaining, desc="md", unit="step")
    try:
        step = _integrate(atoms, calculator, protocol, dynamics, rng, watch, polarization_log, bar, step=step,
                          remaining=remaining, timestep_fs=timestep_fs, interval=settings.interval,
                          born_spread=settings.born_spread, trajectory_path=trajectory_path, checkpoint=checkpoint,
                          checkpoint_interval=settings.checkpoint_interval or settings.interval)
    finally:
        polarization_log.close()
        if bar is not None:
            bar.close()
    final = atoms.copy()
    final.calc = None
    final.info.update(watch.record())
    return final


def _integrate(atoms: Atoms, calculator: PolCalculator, protocol: FieldProtocol, dynamics: MolecularDynamics,
               rng: np.random.Generator, watch: _SpreadWatch, polarization_log: PolarizationLog, bar: tqdm | None, *,
               step: int, remaining: int, timestep_fs: float, interval: int, born_spread: bool,
               trajectory_path: Path, checkpoint: Path, checkpoint_interval: int) -> int:
    """The MD loop of `run_md`: every step goes to the P(t) file and every `interval`-th to the trajectory as
    it is made; nothing is kept. Returns the last step."""
    import ase.io

    for _ in range(remaining if not watch.stopped else 0):
        calculator.set_field_for_next_positions(protocol((step + 1) * timestep_fs))
        dynamics.step()
        step += 1
        time_fs = step * timestep_fs
        watch.check(calculator, step)
        if polarization_log.due(step) or watch.stopped:
            polarization_log.write(step, time_fs, atoms, calculator)
        if step % interval == 0 or watch.stopped:
            frame = _frame(atoms, calculator, step, time_fs, born_spread)
            frame.info.update(watch.record())
            ase.io.write(trajectory_path, frame, format="extxyz", append=True)
            _write_checkpoint(checkpoint, atoms, step, time_fs, dynamics, rng)
        elif step % checkpoint_interval == 0:
            _write_checkpoint(checkpoint, atoms, step, time_fs, dynamics, rng)
        if watch.stopped:
            break
        if bar is not None:
            bar.update(1)
            bar.set_postfix(T=f"{atoms.get_temperature():.0f}K", refresh=False)
    if remaining and not watch.stopped and step % interval != 0:
        # the last step off the frame grid: written, so that the trajectory ends where the run did
        frame = _frame(atoms, calculator, step, step * timestep_fs, born_spread)
        frame.info.update(watch.record())
        ase.io.write(trajectory_path, frame, format="extxyz", append=True)
        _write_checkpoint(checkpoint, atoms, step, step * timestep_fs, dynamics, rng)
    return step


class _SpreadWatch:
    """Watches the ensemble's largest atomic force spread at every step (from the calculator's cached results,
    so it costs nothing): one ForceSpreadWarning at the first step above the threshold, remembered for the
    frames, and a stop there when asked."""

    def __init__(self, threshold: float | None, stop: bool) -> None:
        self.threshold, self.stop = threshold, bool(stop)
        self.exceeded_step: int | None = None
        self.stopped = False

    def check(self, calculator: PolCalculator, step: int) -> None:
        if self.threshold is None or self.exceeded_step is not None:
            return
        spread = largest_atom_norm(calculator.results["forces_std"])
        if spread > self.threshold:
            self.exceeded_step = int(step)
            self.stopped = self.stop
            action = "stopping here (stop_on_spread)" if self.stop else "going on; later frames record it"
            warnings.warn(f"step {step}: the ensemble's force spread {spread:.3g} eV/Å passed the threshold "
                          f"{self.threshold:g} eV/Å, so the model is extrapolating; {action}",
                          ForceSpreadWarning, stacklevel=3)

    def record(self) -> dict[str, int | bool]:
        record: dict[str, int | bool] = {}
        if self.exceeded_step is not None:
            record["force_spread_exceeded_step"] = self.exceeded_step
        if self.stopped:
            record["stopped_on_spread"] = True
        return record
