"""Parsers of the `polmodel` CalcJobs. The parsing itself is in pure `parse_*` functions that tests call directly."""
import json
import os

import numpy as np
from aiida import orm
from aiida.common import exceptions
from aiida.parsers import Parser

from polmodel.plugins.data import ModelData

# Per-frame scalars / vectors that `polmodel md` writes into each frame's info (polmodel/dynamics/md.py), with their
# shapes.
TRAJECTORY_FRAME_KEYS = {
    "time_fs": (),
    "step": (),
    "efield": (3,),
    "energy": (),
    "kinetic_energy": (),
    "temperature": (),
    "dipole": (3,),
    "polarization": (3,),
    "energy_std": (),
    "polarization_std": (3,),
    "max_force_std": (),
    "max_born_charge_std": (),
    "polarizability_spread": (),
}
TRAJECTORY_ATOM_KEYS = ("forces", "forces_std")


def frame_value(atoms, key):
    """A per-frame value from `info`, `arrays` or the calculator ASE's extxyz reader moved it to; None if absent."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def parse_trajectory_frames(frames):
    """Arrays of a `polmodel md` trajectory: positions, cells, symbols and every per-frame quantity present.

    Returns a dict: `symbols` (list), `positions` (T, N, 3), `cells` (T, 3, 3), `steps` (T,), `times` (T,) and,
    for each key of `TRAJECTORY_FRAME_KEYS` / `TRAJECTORY_ATOM_KEYS` that every frame carries, an array (T, ...).
    Raises ValueError for an empty or inconsistent trajectory.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("the trajectory holds no frames")
    symbols = frames[0].get_chemical_symbols()
    if any(atoms.get_chemical_symbols() != symbols for atoms in frames):
        raise ValueError("the atoms change between frames")
    result = {
        "symbols": symbols,
        "positions": np.array([atoms.get_positions() for atoms in frames], dtype=float),
        "cells": np.array([np.asarray(atoms.get_cell()) for atoms in frames], dtype=float),
        "pbc": [bool(flag) for flag in frames[0].get_pbc()],
    }
    for key, shape in TRAJECTORY_FRAME_KEYS.items():
        values = [frame_value(atoms, key) for atoms in frames]
        if any(value is None for value in values):
            continue
        array = np.array(values, dtype=float).reshape((len(frames),) + shape)
        result[key] = array
    for key in TRAJECTORY_ATOM_KEYS:
        values = [frame_value(atoms, key) for atoms in frames]
        if any(value is None for value in values):
            continue
        result[key] = np.array(values, dtype=float).reshape(len(frames), len(symbols), 3)
    result["steps"] = result.pop("step").astype(int) if "step" in result else np.arange(len(frames))
    result["times"] = result.pop("time_fs") if "time_fs" in result else None
    return result


def parse_trajectory_file(path):
    """`parse_trajectory_frames` of an extxyz file; ValueError with the reason if it cannot be read."""
    from ase.io import read

    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as error:  # ASE raises many types for a malformed file; all mean the same here
        raise ValueError(f"{os.path.basename(path)} is not a readable extxyz trajectory: {error}") from error
    return parse_trajectory_frames(frames)


def trajectory_node(parsed):
    """A `TrajectoryData` from `parse_trajectory_frames` output; per-frame quantities become named arrays."""
    trajectory = orm.TrajectoryData()
    trajectory.set_trajectory(
        symbols=parsed["symbols"],
        positions=parsed["positions"],
        stepids=np.asarray(parsed["steps"], dtype=int),
        cells=parsed["cells"],
        times=parsed["times"],
    )
    trajectory.base.attributes.set("pbc", parsed["pbc"])
    for key, value in parsed.items():
        if key in ("symbols", "positions", "cells", "steps", "times", "pbc"):
            continue
        trajectory.set_array(key, np.asarray(value))
    return trajectory


def trajectory_frames(trajectory):
    """The frames of a `TrajectoryData` made by `trajectory_node` as `ase.Atoms` (positions, cell, pbc only)."""
    from ase import Atoms

    symbols = trajectory.symbols
    positions = trajectory.get_positions()
    cells = trajectory.get_cells()
    pbc = trajectory.base.attributes.get("pbc", [True, True, True])
    return [
        Atoms(symbols=symbols, positions=positions[index], cell=cells[index] if cells is not None else None, pbc=pbc)
        for index in range(len(positions))
    ]


def parse_metrics(text):
    """The metrics JSON of `polmodel train` as a dict; ValueError if it is not a JSON object."""
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"expected a JSON object, got {type(metrics).__name__}")
    return metrics


def validation_errors(metrics):
    """{quantity: {"mae": .., "rmse": ..}} from a metrics dict, wherever `polmodel train` nested them.

    Looks in `metrics["validation"]` first, then at the top level, for entries that carry an "mae".
    """
    source = metrics.get("validation") if isinstance(metrics.get("validation"), dict) else metrics
    errors = {}
    for quantity, entry in source.items():
        if isinstance(entry, dict) and "mae" in entry:
            errors[quantity] = {key: entry[key] for key in ("mae", "rmse", "count") if key in entry}
    return errors


def _read_stderr(retrieved, name):
    try:
        text = retrieved.base.repository.get_object_content(name, mode="r")
    except (FileNotFoundError, OSError):
        return "(no stderr)"
    lines = text.strip().splitlines()
    return " | ".join(lines[-5:]) if lines else "(empty)"


class TrainParser(Parser):
    """Parse `polmodel train`: `model` (ModelData), `metrics` (Dict), `plots` (FolderData of PNGs)."""

    def parse(self, **kwargs):
        from polmodel.plugins.calculations import TrainCalculation

        retrieved = self.retrieved
        temporary = kwargs.get("retrieved_temporary_folder")
        stderr = _read_stderr(retrieved, TrainCalculation._STDERR)

        model_path = os.path.join(temporary, TrainCalculation._MODEL) if temporary else None
        if model_path is None or not os.path.isfile(model_path):
            if self._output_unfinished_checkpoint(temporary, metrics=None):
                return self.exit_codes.ERROR_INTERRUPTED.format(stderr=stderr)
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(filename=TrainCalculation._MODEL, stderr=stderr)
        try:
            metrics_text = retrieved.base.repository.get_object_content(TrainCalculation._METRICS, mode="r")
        except (FileNotFoundError, OSError):
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(filename=TrainCalculation._METRICS, stderr=stderr)
        try:
            metrics = parse_metrics(metrics_text)
        except ValueError as error:
            return self.exit_codes.ERROR_CORRUPT_METRICS.format(error=error)

        from polmodel.nn.serialization import ModelFileError

        try:
            model = ModelData.from_file(model_path, metrics=validation_errors(metrics))
        except (ModelFileError, OSError, RuntimeError) as error:
            return self.exit_codes.ERROR_CORRUPT_MODEL.format(error=error)
        self.out("model", model)
        self.out("metrics", orm.Dict(metrics))
        self._output_unfinished_checkpoint(temporary, metrics)

        plots = orm.FolderData()
        try:
            names = retrieved.base.repository.list_object_names(TrainCalculation._PLOTS)
        except (FileNotFoundError, exceptions.NotExistent, OSError):
            names = []
        for name in names:
            if name.lower().endswith(".png"):
                content = retrieved.base.repository.get_object_content(f"{TrainCalculation._PLOTS}/{name}", mode="rb")
                plots.base.repository.put_object_from_bytes(content, name)
        if plots.base.repository.list_object_names():
            self.out("plots", plots)
        return None


    def _output_unfinished_checkpoint(self, temporary, metrics):
        """Output the checkpoint files as `checkpoint` when the training can go on from them: always for a run that
        wrote no model, else when a member stopped at its time limit (`stopped_early`). Returns whether it did."""
        paths = checkpoint_files(temporary)
        if not paths or (metrics is not None and not stopped_early(metrics)):
            return False
        folder = orm.FolderData()
        for path in paths:
            with open(path, "rb") as handle:
                folder.base.repository.put_object_from_filelike(handle, os.path.basename(path))
        self.out("checkpoint", folder)
        return True


def checkpoint_files(folder):
    """The `polmodel train --checkpoint` files in `folder` (one per ensemble member), sorted; [] if none."""
    import glob

    from polmodel.plugins.calculations import TrainCalculation

    if not folder:
        return []
    return sorted(glob.glob(os.path.join(folder, TrainCalculation._CHECKPOINT_GLOB)))


def stopped_early(metrics):
    """Whether a member of a finished `polmodel train` run stopped at its time limit (so it can be resumed)."""
    members = metrics.get("members") or [metrics]
    return any(member.get("stopped") == "max_time_s" for member in members)


class MdParser(Parser):
    """Parse `polmodel md`: `trajectory` (TrajectoryData with P(t), field(t), energies and ensemble spreads)."""

    def parse(self, **kwargs):
        from polmodel.plugins.calculations import MdCalculation

        temporary = kwargs.get("retrieved_temporary_folder")
        stderr = _read_stderr(self.retrieved, MdCalculation._STDERR)
        path = os.path.join(temporary, MdCalculation._TRAJECTORY) if temporary else None
        if path is None or not os.path.isfile(path):
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(filename=MdCalculation._TRAJECTORY, stderr=stderr)
        if os.path.getsize(path) == 0:
            return self.exit_codes.ERROR_EMPTY_TRAJECTORY
        try:
            parsed = parse_trajectory_file(path)
        except ValueError as error:
            if "no frames" in str(error):
                return self.exit_codes.ERROR_EMPTY_TRAJECTORY
            return self.exit_codes.ERROR_CORRUPT_OUTPUT.format(error=error)
        self.out("trajectory", trajectory_node(parsed))
        return None
