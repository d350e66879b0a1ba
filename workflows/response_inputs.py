"""Checks of a pw.x response workchain's inputs, made before any run (FieldResponseWorkChain's validator; the
DFPT chain shares the ground-state part): each returns None or a message that names what is wrong."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from aiida import orm

from polmodel.active_learning.selection import TIERS, closest_pair
from polmodel.data.domain import MIN_INTERATOMIC_DISTANCE

if TYPE_CHECKING:
    from aiida_pseudo.data.pseudo import PseudoPotentialData


def validate_structure(structure: orm.StructureData, _: object = None) -> str | None:
    """Refuse structures with overlapping atoms or without full periodicity."""
    if not all(structure.pbc):
        return "the structure must be periodic in all three directions for Berry-phase polarization"
    atoms = structure.get_ase()
    closest, i, j = closest_pair(atoms)
    if closest < MIN_INTERATOMIC_DISTANCE:
        return (
            f"atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are {closest:.3f} Å apart "
            f"(< {MIN_INTERATOMIC_DISTANCE} Å): overlapping atoms"
        )
    return None


def validate_pw_code(code: orm.AbstractCode, _: object = None) -> str | None:
    """The code must run pw.x through the `quantumespresso.pw` plugin."""
    plugin = code.default_calc_job_plugin if code is not None else None
    if plugin != "quantumespresso.pw":
        return f"code `{code.full_label}` runs `{plugin}`, but `quantumespresso.pw` (pw.x) is needed"
    return None


def validate_pseudos(structure: orm.StructureData, pseudos: Mapping[str, PseudoPotentialData]) -> str | None:
    """Every kind needs a pseudopotential whose element matches."""
    missing = sorted(set(structure.get_kind_names()) - set(pseudos))
    if missing:
        return f"no pseudopotential for kind(s) {', '.join(missing)}"
    for kind in structure.kinds:
        element = getattr(pseudos[kind.name], "element", None)
        if element is not None and element != kind.symbol:
            return f"pseudopotential for kind `{kind.name}` is for element {element}, not {kind.symbol}"
    return None


def validate_ground_state_inputs(inputs: Mapping[str, Any]) -> str | None:
    """The checks every pw.x-based response workchain shares: structure, pw code, pseudopotentials."""
    structure = inputs["structure"]
    for message in (
        validate_structure(structure),
        validate_pw_code(inputs["scf"]["pw"]["code"]),
        validate_pseudos(structure, inputs["scf"]["pw"].get("pseudos", {})),
    ):
        if message:
            return message
    return None


def validate_field_vectors(field_vectors: Iterable[object] | None, tier: str) -> str | None:
    """Field vectors are finite, non-zero 3-vectors (V/Å); `field_frames` needs at least one, `energy_forces` none."""
    vectors = list(field_vectors) if field_vectors is not None else []
    if tier == "energy_forces" and vectors:
        return "the `energy_forces` tier runs no field: give no `field_vectors` (or choose `field_frames`)"
    if tier == "field_frames" and not vectors:
        return "the `field_frames` tier needs at least one field vector"
    for index, vector in enumerate(vectors):
        try:
            array = np.asarray(vector, dtype=float)
        except (TypeError, ValueError):
            return f"field vector {index} ({vector!r}) is not three numbers"
        if array.shape != (3,) or not np.all(np.isfinite(array)):
            return f"field vector {index} ({vector!r}) is not three finite numbers (V/Å)"
        if not np.any(array):
            return f"field vector {index} is zero: the zero-field run is always made"
    return None


def number_of_electrons(structure: orm.StructureData, pseudos: Mapping[str, PseudoPotentialData]) -> float:
    """Valence electrons of the cell from the pseudopotentials' z_valence."""
    return sum(float(pseudos[site.kind_name].z_valence) for site in structure.sites)


def validate_electron_count(structure: orm.StructureData, pseudos: Mapping[str, PseudoPotentialData]) -> str | None:
    """Fixed occupations of spin-degenerate bands need an even number of valence electrons."""
    try:
        count = number_of_electrons(structure, pseudos)
    except (AttributeError, KeyError, TypeError):
        return None  # pseudopotentials without z_valence: left to pw.x
    if abs(count - round(count)) > 1e-6 or round(count) % 2:
        return (f"{count:g} valence electrons cannot fill spin-degenerate bands with fixed occupations: metal or open "
                "shell, refused")
    return None


def validate_inputs(inputs: Mapping[str, Any], _: object) -> str | None:
    """Validate the whole input namespace: structure, code, pseudopotentials, electrons, tier, fields, settings."""
    message = validate_ground_state_inputs(inputs)
    if message:
        return message
    message = validate_electron_count(inputs["structure"], inputs["scf"]["pw"].get("pseudos", {}))
    if message:
        return message
    tier = inputs["tier"].value
    if tier not in TIERS:
        return f"unknown tier `{tier}`: one of {', '.join(TIERS)}"
    field_vectors = inputs["field_vectors"].get_list() if "field_vectors" in inputs else None
    message = validate_field_vectors(field_vectors, tier)
    if message:
        return message
    if inputs["field_magnitude"].value <= 0:
        return "`field_magnitude` must be positive"
    if "string_extrapolation_scale" in inputs:
        if not 0 < inputs["string_extrapolation_scale"].value < 1:
            return "`string_extrapolation_scale` must lie strictly between 0 and 1"
        kpoints = inputs["scf"].get("kpoints")
        if kpoints is not None and "mesh" not in kpoints.base.attributes.keys():
            return "`string_extrapolation_scale` needs a k-point mesh (or `kpoints_distance`), not an explicit list"
    parameters = inputs["scf"]["pw"]["parameters"].get_dict()
    if parameters.get("SYSTEM", {}).get("occupations", "fixed") != "fixed":
        return "Berry-phase and finite-field runs need `occupations='fixed'` (insulators only)"
    if parameters.get("SYSTEM", {}).get("nspin", 1) != 1:
        return "only spin-unpolarized insulators are supported"
    settings = inputs["scf"]["pw"].get("settings")
    cmdline = settings.get_dict().get("cmdline", []) if settings is not None else []
    for flag in ("-nk", "-npools", "-npool"):
        if flag in cmdline and int(cmdline[cmdline.index(flag) + 1]) != 1:
            return "k-point pools are not supported by pw.x's Berry-phase and finite-field code"
    return None
