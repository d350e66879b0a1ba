"""Labelled frames: read, write, validate, read single labels (docs/conventions.md "Labelled frames (extended XYZ)").

A frame is an `ase.Atoms` whose labels live in `info` (energy, efield, stress (3, 3), dipole,
polarization_quantum (3, 3), polarizability (3, 3), source) and `arrays` (forces (N, 3),
born_effective_charges (N, 9), row-major [a, b]). A missing label is absent, never zero-filled.

ASE's extxyz reader moves the labels it recognises (energy, forces, stress, dipole, born_effective_charges)
into a SinglePointCalculator and turns the stress into Voigt order; `normalize_frame` puts them back where
docs/conventions.md says they live, so every label is read through the accessors below whatever produced the Atoms.
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    from ase import Atoms
    from numpy.typing import NDArray

# label name -> (where it lives, shape with "N" for the number of atoms)
INFO_LABELS = {
    "energy": (),
    "efield": (3,),
    "stress": (3, 3),
    "dipole": (3,),
    "polarization_quantum": (3, 3),
    "polarizability": (3, 3),
}
ARRAY_LABELS = {
    "forces": ("N", 3),
    "born_effective_charges": ("N", 9),
}
# ASE extxyz also knows these as calculator results; we do not use them but must not lose them either.
_OTHER_CALCULATOR_RESULTS = ("free_energy", "polarization", "dielectric_tensor", "charges")


class FrameError(ValueError):
    """A frame or frames file that does not follow the labelled-frame format of docs/conventions.md."""


# --- label accessors (None when the label is absent) ---------------------------------------------------------
def frame_energy(atoms: Atoms) -> float | None:
    value = atoms.info.get("energy")
    return None if value is None else float(value)


def frame_efield(atoms: Atoms) -> NDArray[np.float64]:
    """The frame's homogeneous field in V/Å; a frame without `efield` is at zero field."""
    value = atoms.info.get("efield")
    return np.zeros(3) if value is None else np.asarray(value, dtype=float).reshape(3)


def frame_stress(atoms: Atoms) -> NDArray[np.float64] | None:
    value = atoms.info.get("stress")
    return None if value is None else np.asarray(value, dtype=float).reshape(3, 3)


def frame_dipole(atoms: Atoms) -> NDArray[np.float64] | None:
    value = atoms.info.get("dipole")
    return None if value is None else np.asarray(value, dtype=float).reshape(3)


def frame_polarization_quantum(atoms: Atoms) -> NDArray[np.float64] | None:
    value = atoms.info.get("polarization_quantum")
    return None if value is None else np.asarray(value, dtype=float).reshape(3, 3)


def frame_polarizability(atoms: Atoms) -> NDArray[np.float64] | None:
    value = atoms.info.get("polarizability")
    return None if value is None else np.asarray(value, dtype=float).reshape(3, 3)


def frame_forces(atoms: Atoms) -> NDArray[np.float64] | None:
    value = atoms.arrays.get("forces")
    return None if value is None else np.asarray(value, dtype=float).reshape(len(atoms), 3)


def frame_born_charges(atoms: Atoms) -> NDArray[np.float64] | None:
    """Born effective charges as (N, 3, 3) [i, a, b] = ∂F_ib/∂ε_a, or None."""
    value = atoms.arrays.get("born_effective_charges")
    return None if value is None else np.asarray(value, dtype=float).reshape(len(atoms), 3, 3)


def frame_source(atoms: Atoms) -> str | None:
    value = atoms.info.get("source")
    return None if value is None else str(value)


#: what every frame of a `polmodel md` trajectory records besides its (predicted) energy and forces
_MD_RECORD_KEYS = ("step", "time_fs", "kinetic_energy", "temperature")


def model_prediction_frames(frames: Sequence[Atoms]) -> list[int]:
    """Indices of the frames that are records of a `polmodel md` run (step, time, kinetic energy, temperature in
    their info): their energies and forces are a model's predictions, not labels."""
    return [index for index, frame in enumerate(frames) if all(key in frame.info for key in _MD_RECORD_KEYS)]


# --- branch continuity of the dipole labels ------------------------------------------------------------------
def structure_key(frame: Atoms) -> tuple[tuple[int, ...] | bytes, ...]:
    """Frames of one structure (same species, cell and positions, at any field) share this key."""
    rounded = [np.round(np.asarray(array, dtype=float), 6) + 0.0 for array in (frame.cell.array, frame.positions)]
    return (tuple(int(z) for z in frame.numbers),) + tuple(array.tobytes() for array in rounded)


def _trajectory_position(frame: Atoms) -> tuple[str, int] | None:
    """(trajectory id, frame index) from `info['origin']` = "<trajectory UUID>:<frame index>", or None."""
    origin = frame.info.get("origin")
    if origin is None or ":" not in str(origin):
        return None
    trajectory, _, index = str(origin).rpartition(":")
    try:
        return trajectory, int(index)
    except ValueError:
        return None


def _move_dipole(frame: Atoms, shift: NDArray[np.float64]) -> None:
    """Move a frame's dipole label by `shift` (whole quanta) and its enthalpy with it: pw.x's E contains −ε·ΩP on
    the branch ΩP is reported on, so E changes by −ε·shift."""
    frame.info["dipole"] = _dipole_of(frame) + shift
    energy = frame_energy(frame)
    if energy is not None:
        frame.info["energy"] = energy - float(frame_efield(frame) @ shift)


def _dipole_of(frame: Atoms) -> NDArray[np.float64]:
    """The dipole label of a frame known to carry one."""
    return cast("NDArray[np.float64]", frame_dipole(frame))


def align_dipole_branches(frames: Iterable[Atoms]) -> list[Atoms]:
    """Copies of `frames` with the dipole labels of each structure, and of each trajectory, on one branch.

    The reference never depends on a model (docs/design.md "Branch alignment of dipoles"):
    - frames of one structure (`structure_key`: the zero-field and ±ε runs) are moved onto the branch of its
      zero-field frame (else its first dipole frame): their dipoles differ by α·ε, far less than a quantum, so the
      minimum image of the difference is unambiguous;
    - structures of one MD trajectory (`info['origin']` = "<trajectory UUID>:<frame index>", as the exploration
      writes it) are moved, all frames of a structure together, onto the branch of the nearest earlier labelled
      structure of the same trajectory, which chains the whole trajectory onto one branch (this assumes the dipole
      changes by less than half a quantum between neighbouring labelled frames).
    A moved dipole moves its frame's finite-field energy by −ε·shift. Every dipole frame gets
    `info['dipole_branch']`, an integer shared by the frames known to be on one branch; the loss moves such frames
    onto the model's branch together (polmodel.training.losses). Which branch a whole group is on relative to the
    model is still decided against the model's prediction: that part is the fallback, as no model-free reference
    exists.
    """
    from polmodel.data.polarization import fold_dipole_difference  # imports torch; the rest of frames.py is numpy

    frames = [frame.copy() for frame in frames]
    groups: dict[tuple[tuple[int, ...] | bytes, ...], list[Atoms]] = {}
    for frame in frames:
        if frame_dipole(frame) is not None and frame_polarization_quantum(frame) is not None:
            groups.setdefault(structure_key(frame), []).append(frame)
    references = []
    for group in groups.values():
        reference = next((frame for frame in group if not np.any(frame_efield(frame))), group[0])
        for frame in group:
            if frame is not reference:
                difference = _dipole_of(frame) - _dipole_of(reference)
                _move_dipole(frame, fold_dipole_difference(difference, frame_polarization_quantum(frame)) - difference)
        position = next(filter(None, map(_trajectory_position, group)), None)
        references.append((position, reference, group))

    branch_of_group = list(range(len(references)))
    trajectories: dict[str, list[tuple[int, int]]] = {}
    for index, (position, _, _) in enumerate(references):
        if position is not None:
            trajectories.setdefault(position[0], []).append((position[1], index))
    for members in trajectories.values():
        members.sort()
        for (_, previous), (_, current) in zip(members, members[1:]):
            _, anchor, _ = references[previous]
            _, reference, group = references[current]
            difference = _dipole_of(reference) - _dipole_of(anchor)
            shift = fold_dipole_difference(difference, frame_polarization_quantum(reference)) - difference
            for frame in group:
                _move_dipole(frame, shift)
            branch_of_group[current] = branch_of_group[previous]
    for (_, _, group), branch in zip(references, branch_of_group):
        for frame in group:
            frame.info["dipole_branch"] = int(branch)
    return frames


# --- normalisation and validation ----------------------------------------------------------------------------
def _where(index: int | None) -> str:
    return "frame" if index is None else f"frame {index}"


def _as_label_array(value: object, name: str, shape: tuple[int, ...], index: int | None) -> NDArray[np.float64]:
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise FrameError(f"{_where(index)}: label {name!r} is not numeric ({value!r})") from error
    if name == "stress" and array.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        array = voigt_6_to_full_3x3_stress(array)
    if name in ("stress", "polarization_quantum", "polarizability") and array.shape == (9,):
        array = array.reshape(3, 3)
    if name == "born_effective_charges" and array.ndim == 3 and array.shape[1:] == (3, 3):
        array = array.reshape(len(array), 9)
    if array.shape != shape:
        raise FrameError(f"{_where(index)}: label {name!r} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
        raise FrameError(f"{_where(index)}: label {name!r} contains NaN or infinite values")
    return array


def normalize_frame(atoms: Atoms, index: int | None = None) -> Atoms:
    """Return a validated copy of `atoms` with every label in `info`/`arrays` as docs/conventions.md specifies.

    Accepts the Atoms that `ase.io.read` returns (labels inside a SinglePointCalculator, stress in Voigt order)
    as well as Atoms built in memory. Raises `FrameError` naming the frame and the label for a wrong shape,
    a non-finite value, missing or non-finite positions, or a singular polarization quantum.
    """
    frame = atoms.copy()  # Atoms.copy drops the calculator, keeps info and arrays
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    for name in list(INFO_LABELS) + list(ARRAY_LABELS) + list(_OTHER_CALCULATOR_RESULTS):
        if name in results and name not in frame.info and name not in frame.arrays:
            if name in ARRAY_LABELS or name == "charges":
                frame.arrays[name] = np.asarray(results[name], dtype=float).reshape(len(frame), -1)
            else:
                frame.info[name] = results[name]

    positions = frame.arrays.get("positions")
    if positions is None or positions.shape != (len(frame), 3):
        raise FrameError(f"{_where(index)}: missing or malformed positions")
    if len(frame) == 0:
        raise FrameError(f"{_where(index)}: has no atoms")
    if not np.all(np.isfinite(positions)):
        raise FrameError(f"{_where(index)}: positions contain NaN or infinite values")
    if not np.all(np.isfinite(frame.cell.array)):
        raise FrameError(f"{_where(index)}: cell contains NaN or infinite values")
    if frame.pbc.any() and abs(frame.cell.volume) < 1e-8:
        raise FrameError(f"{_where(index)}: periodic frame with a zero-volume cell")

    for name, shape in INFO_LABELS.items():
        if name in frame.info:
            array = _as_label_array(frame.info[name], name, shape, index)
            frame.info[name] = float(array) if shape == () else array
    for name, (_, width) in ARRAY_LABELS.items():
        if name in frame.arrays:
            frame.arrays[name] = _as_label_array(frame.arrays[name], name, (len(frame), width), index)
    if "stress" in frame.info and not frame.pbc.all():
        raise FrameError(f"{_where(index)}: stress label on a frame that is not periodic in all directions")
    quantum = frame.info.get("polarization_quantum")
    if quantum is not None and abs(np.linalg.det(quantum)) < 1e-10:
        raise FrameError(f"{_where(index)}: polarization_quantum is singular (its rows must span space)")
    if "source" in frame.info:
        frame.info["source"] = str(frame.info["source"])
    return frame


def normalize_frames(frames: Iterable[Atoms]) -> list[Atoms]:
    """`normalize_frame` on every frame; errors name the frame's position in the list."""
    return [normalize_frame(atoms, index) for index, atoms in enumerate(frames)]


# --- files ---------------------------------------------------------------------------------------------------
def read_frames(path: str | os.PathLike[str]) -> list[Atoms]:
    """Read labelled frames from an extended-XYZ file, validated (raises `FrameError` with the reason)."""
    import ase.io

    if not os.path.exists(path):
        raise FrameError(f"frames file {path!s} does not exist")
    with open(path) as handle:
        text = handle.read()
    if not text.strip():
        raise FrameError(f"frames file {path!s} is empty")
    _check_position_columns(text, path)
    try:
        frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    except Exception as error:  # ASE raises a zoo of types for corrupt files; one clear error for the caller
        raise FrameError(f"frames file {path!s} is not valid extended XYZ: {error}") from error
    try:
        return normalize_frames(frames)
    except FrameError as error:
        raise FrameError(f"{path!s}: {error}") from error


def _check_position_columns(text: str, path: str | os.PathLike[str]) -> None:
    """ASE fills absent positions with zeros; a frame whose Properties lack `pos` must fail instead."""
    lines = text.splitlines()
    line, frame = 0, 0
    while line < len(lines):
        if not lines[line].strip():
            line += 1
            continue
        try:
            natoms = int(lines[line].split()[0])
        except ValueError:
            return  # not an atom count: let the extxyz reader report the corruption
        comment = lines[line + 1] if line + 1 < len(lines) else ""
        match = re.search(r"properties=(\S+)", comment, flags=re.IGNORECASE)
        if match and not re.search(r"(^|:)pos:R:3(:|$)", match.group(1), flags=re.IGNORECASE):
            raise FrameError(f"frames file {path!s}: frame {frame} has no positions (Properties={match.group(1)})")
        line += natoms + 2
        frame += 1


def write_frames(path: str | os.PathLike[str], frames: Iterable[Atoms]) -> None:
    """Write labelled frames as extended XYZ with the labels in `info`/`arrays` (validated first)."""
    import ase.io

    frames = normalize_frames(frames)
    temporary = f"{path}.{os.getpid()}.partial"      # moved into place when complete: no half-written file
    try:
        ase.io.write(temporary, frames, format="extxyz", write_results=False)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)

