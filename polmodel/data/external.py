"""Labelled frames written by another code: its names, units, signs, polarization quantum and Z* index order.

`LabelMapping` says how a foreign extended-XYZ file writes each label; `read_external_frames(path, mapping)` reads
it into polmodel frames (docs/conventions.md), checked like our own frames (`normalize_frames`) and against facts
every such data set must obey:
- Born charges sum to zero over the atoms of a frame (acoustic sum rule), whatever their index order;
- the polarizability is symmetric;
- where two frames of the same cell lie close to each other, their dipole difference (folded on the quantum
  lattice) is the Born charges times the displacements in the declared index order, and fits worse in the other
  (`born_charge_order_misfit`): a transposed Z* is refused, naming `born_charge_order`.
A key the mapping names but a frame lacks, or that holds the wrong shape, is refused with a message naming it.

`ALLEGRO_POL` is the mapping of Allegro-pol's parity files (its parser `scripts/2.ParseQE/parse_QE.py`): energy
`total_energy` (eV), stress already on ASE's sign (the parser flips pw.x's), the zero-field cell dipole in e·Å
under `polarization`, folded into one cell of the lattice e·R (quantum factor 1, not 2), `born_charge` (N, 9) with
the field index first, `polarizability` (9,) per cell in e·Å²/V.
"""
import dataclasses
import io
import os

import numpy as np

from polmodel.data.frames import FrameError, normalize_frames
from polmodel.data.polarization import fold_dipole_difference

BORN_CHARGE_ORDERS = ("field_force", "force_field")
# |ΣZ*| per component over a frame's atoms above which the labels break the acoustic sum rule (e)
ACOUSTIC_SUM_TOLERANCE = 0.05
# largest |α - αᵀ| relative to the largest |α| of a frame
POLARIZABILITY_ASYMMETRY_TOLERANCE = 0.02
# the Z* order check uses the closest frame pairs, at most this many and closer than this rms displacement (Å): the
# dipole is linear in the displacements only for small ones
ORDER_CHECK_PAIRS = 20
ORDER_CHECK_MAX_RMS_DISPLACEMENT = 0.3
# a declared Z* order that fits the dipole differences this much worse than the transposed one is refused
ORDER_CHECK_MIN_RATIO = 1.5


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    """Where and in which units a foreign file keeps each label (None: the file has no such label).

    Keys are looked up in the frame's `info`, then `arrays`, then the results that ASE's extxyz reader moves into
    a calculator (it does that for `forces`, `stress`, `energy`, `polarization`, ...). Units are the factors that
    turn the file's numbers into polmodel's (eV, Å, e·Å, e·Å²/V, eV/Å³).
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    dipole: str = "dipole"
    born_effective_charges: str = "born_effective_charges"
    polarizability: str = "polarizability"
    energy_unit: float = 1.0            # eV per file unit (also forces' energy part)
    length_unit: float = 1.0            # Å per file unit (positions, cell, forces' length part)
    stress_sign: int = 1                # +1: ASE's sign (positive when the cell wants to shrink); -1: pw.x's
    dipole_unit: float = 1.0            # e·Å per file unit
    polarization_quantum_factor: float = 2.0   # the dipole is known modulo factor·e·R (R a lattice vector)
    born_charge_order: str = "field_force"     # Z*[n, i, j] = ∂F_j/∂ε_i ("field_force") or ∂F_i/∂ε_j
    polarizability_unit: float = 1.0    # e·Å²/V per file unit, per cell

    def __post_init__(self):
        if self.born_charge_order not in BORN_CHARGE_ORDERS:
            raise ValueError(f"born_charge_order must be one of {BORN_CHARGE_ORDERS}, got {self.born_charge_order!r}")
        if self.stress_sign not in (1, -1):
            raise ValueError(f"stress_sign must be +1 or -1, got {self.stress_sign!r}")
        for name in ("energy_unit", "length_unit", "dipole_unit", "polarization_quantum_factor",
                     "polarizability_unit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, values):
        """From a JSON/YAML mapping; an unknown name is refused, naming it (a typo would silently drop a label)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown label mapping option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_convention(cls, convention, overrides=None):
        """The named convention of CONVENTIONS with the fields in `overrides` changed (a source card's `mapping`)."""
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {convention!r}; known: {sorted(CONVENTIONS)}")
        return cls.from_dict({**CONVENTIONS[convention].as_dict(), **(overrides or {})})

    def as_dict(self):
        return dataclasses.asdict(self)


ALLEGRO_POL = LabelMapping(energy="total_energy", dipole="polarization", born_effective_charges="born_charge",
                           polarization_quantum_factor=1.0)
CONVENTIONS = {"polmodel": LabelMapping(), "allegro-pol": ALLEGRO_POL}


def read_file_bytes(path):
    """A file's bytes as published: a .gz copy is decompressed (a recorded sha256 is that of the original)."""
    import gzip

    with open(path, "rb") as handle:
        content = handle.read()
    return gzip.decompress(content) if os.fspath(path).endswith(".gz") else content


def _lookup(atoms, key):
    """The value stored under `key` in info, arrays or the reader's calculator results, or None."""
    for store in (atoms.info, atoms.arrays, atoms.calc.results if atoms.calc is not None else {}):
        if key in store:
            return store[key]
    return None


def _present_keys(atoms):
    results = atoms.calc.results if atoms.calc is not None else {}
    return sorted(set(atoms.info) | set(atoms.arrays) | set(results))


def _label(atoms, mapping, name, shape, index):
    """The file's value of label `name` as float array of `shape` ("N" for atoms), or None if not mapped."""
    key = getattr(mapping, name)
    if key is None:
        return None
    value = _lookup(atoms, key)
    if value is None:
        raise FrameError(f"frame {index}: key {key!r} (mapped to {name}) is missing; the frame has "
                         f"{_present_keys(atoms)}")
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise FrameError(f"frame {index}: key {key!r} (mapped to {name}) is not numeric") from error
    if name == "stress" and array.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        array = voigt_6_to_full_3x3_stress(array)
    shape = tuple(len(atoms) if size == "N" else size for size in shape)
    if array.size != int(np.prod(shape)):
        raise FrameError(f"frame {index}: key {key!r} (mapped to {name}) has shape {array.shape}, expected {shape}")
    return array.reshape(shape)


def convert_frame(atoms, mapping, index=0):
    """One foreign frame as a polmodel frame (unvalidated): labels renamed, in polmodel's units, signs and order."""
    frame = atoms.copy()   # drops the calculator; info and arrays stay, foreign keys are removed below
    scale = mapping.length_unit
    frame.set_cell(atoms.cell.array * scale)
    frame.set_positions(atoms.positions * scale)
    mapped_keys = {getattr(mapping, name) for name in ("energy", "forces", "stress", "dipole",
                                                       "born_effective_charges", "polarizability")} - {None}
    for key in mapped_keys:
        frame.info.pop(key, None)
        frame.arrays.pop(key, None)
    energy = _label(atoms, mapping, "energy", (), index)
    if energy is not None:
        frame.info["energy"] = float(energy) * mapping.energy_unit
    forces = _label(atoms, mapping, "forces", ("N", 3), index)
    if forces is not None:
        frame.arrays["forces"] = forces * mapping.energy_unit / scale
    stress = _label(atoms, mapping, "stress", (3, 3), index)
    if stress is not None:
        frame.info["stress"] = mapping.stress_sign * stress * mapping.energy_unit / scale**3
    dipole = _label(atoms, mapping, "dipole", (3,), index)
    if dipole is not None:
        frame.info["dipole"] = dipole * mapping.dipole_unit
        frame.info["polarization_quantum"] = mapping.polarization_quantum_factor * frame.cell.array
    born = _label(atoms, mapping, "born_effective_charges", ("N", 3, 3), index)
    if born is not None:
        if mapping.born_charge_order == "force_field":
            born = born.transpose(0, 2, 1)
        frame.arrays["born_effective_charges"] = born.reshape(len(atoms), 9)
    polarizability = _label(atoms, mapping, "polarizability", (3, 3), index)
    if polarizability is not None:
        frame.info["polarizability"] = polarizability * mapping.polarizability_unit
    return frame


def check_label_facts(frames):
    """Refuse labels that break what every Born-charge and polarizability label obeys (FrameError naming the key)."""
    for index, frame in enumerate(frames):
        born = frame.arrays.get("born_effective_charges")
        if born is not None:
            residual = np.abs(born.sum(axis=0)).max()
            if residual > ACOUSTIC_SUM_TOLERANCE:
                raise FrameError(f"frame {index}: the Born charges (born_effective_charges) sum to {residual:.3g} e "
                                 f"over the atoms, not zero: a wrong key, unit or per-atom order")
        alpha = frame.info.get("polarizability")
        if alpha is not None:
            asymmetry = np.abs(alpha - alpha.T).max()
            if asymmetry > POLARIZABILITY_ASYMMETRY_TOLERANCE * max(np.abs(alpha).max(), 1e-12):
                raise FrameError(f"frame {index}: the polarizability is not symmetric (|α - αᵀ| {asymmetry:.3g} "
                                 f"e·Å²/V): a wrong key or index order")


def close_frame_pairs(frames, max_rms_displacement=ORDER_CHECK_MAX_RMS_DISPLACEMENT, count=ORDER_CHECK_PAIRS):
    """The `count` closest pairs (a, b) of frames with the same species and cell among each frame and its nearest
    such neighbour, all with an rms minimum-image displacement below the limit."""
    pairs = {}
    for a, first in enumerate(frames):
        best = None
        for b, second in enumerate(frames):
            if b == a or len(second) != len(first) or not np.array_equal(first.numbers, second.numbers) \
                    or not np.allclose(first.cell.array, second.cell.array):
                continue
            rms = np.sqrt((minimum_image_displacements(first, second) ** 2).sum(axis=1).mean())
            if rms < max_rms_displacement and (best is None or rms < best[0]):
                best = (rms, b)
        if best is not None:
            pairs[tuple(sorted((a, best[1])))] = best[0]
    return sorted(pairs, key=pairs.get)[:count]


def minimum_image_displacements(first, second):
    cell = first.cell.array
    fractional = (second.positions - first.positions) @ np.linalg.inv(cell)
    return (fractional - np.round(fractional)) @ cell


def born_charge_order_misfit(frames):
    """(median misfit of the declared order, of the transposed order, number of pairs), in e·Å: the folded dipole
    difference of close frame pairs against Σ_n Z̄*_n Δr_n with Z̄* the pair's mean Born charges; None when no
    pair of frames with dipoles and Born charges is close enough."""
    labelled = [frame for frame in frames
                if "dipole" in frame.info and "born_effective_charges" in frame.arrays and frame.pbc.all()]
    pairs = close_frame_pairs(labelled)
    if not pairs:
        return None
    declared, transposed = [], []
    for a, b in pairs:
        first, second = labelled[a], labelled[b]
        displacement = minimum_image_displacements(first, second)
        born = 0.5 * (first.arrays["born_effective_charges"] + second.arrays["born_effective_charges"])
        born = born.reshape(-1, 3, 3)
        change = fold_dipole_difference(second.info["dipole"] - first.info["dipole"],
                                        first.info["polarization_quantum"])
        declared.append(np.linalg.norm(change - np.einsum("nij,nj->i", born, displacement)))
        transposed.append(np.linalg.norm(change - np.einsum("nji,nj->i", born, displacement)))
    return float(np.median(declared)), float(np.median(transposed)), len(pairs)


def check_born_charge_order(frames):
    """Refuse a Z* index order that the data's own dipole changes contradict (FrameError naming the option)."""
    misfit = born_charge_order_misfit(frames)
    if misfit is not None and misfit[0] > ORDER_CHECK_MIN_RATIO * misfit[1]:
        raise FrameError(f"born_charge_order: the dipole changes of {misfit[2]} close frame pairs fit the "
                         f"transposed Born charges ({misfit[1]:.3g} e·Å) better than the declared order "
                         f"({misfit[0]:.3g} e·Å): the file's index order is the other one")
    return misfit


def read_external_frames(path, mapping, source=None):
    """Read a foreign labelled extended-XYZ file into checked polmodel frames.

    `mapping` is a LabelMapping, a name of CONVENTIONS or a dict of LabelMapping fields. Each frame gets
    `info['external_source']` = "<source or path>#<index in the file>" so that a frame can be found in the
    original; `info['source']` stays free for the AiiDA node that imports them.
    """
    import ase.io

    if isinstance(mapping, str):
        mapping = LabelMapping.from_convention(mapping)
    elif isinstance(mapping, dict):
        mapping = LabelMapping.from_dict(mapping)
    if not os.path.isfile(path):
        raise FrameError(f"frames file {path!s} does not exist")
    try:
        text = read_file_bytes(path).decode()
    except (OSError, UnicodeDecodeError) as error:
        raise FrameError(f"frames file {path!s} is not a text (or gzipped text) file: {error}") from error
    if not text.strip():
        raise FrameError(f"frames file {path!s} is empty")
    try:
        foreign = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    except Exception as error:  # ASE raises a zoo of types for corrupt files; one clear error for the caller
        raise FrameError(f"frames file {path!s} is not valid extended XYZ: {error}") from error
    try:
        frames = normalize_frames([convert_frame(atoms, mapping, index) for index, atoms in enumerate(foreign)])
        check_label_facts(frames)
        check_born_charge_order(frames)
    except FrameError as error:
        raise FrameError(f"{path!s}: {error}") from error
    origin = source or os.path.basename(path)
    for index, frame in enumerate(frames):
        frame.info["external_source"] = f"{origin}#{index}"
    return frames
