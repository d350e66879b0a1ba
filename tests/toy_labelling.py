"""Labelled frames of the analytic toy potential, tier by tier: FOR LOOP-LOGIC TESTS AND BENCHMARKS ONLY.

The toy potential (tests/toy_potential.py) stands in for DFT: `toy_label_frames` answers the question of the DFT
labelling (`polmodel.dft.field_response`, FieldResponseWorkChain) with the same tiers and the same frame format
(docs/design.md "Label tiers"). Pure numpy + torch + ASE, no AiiDA: tests/toy_oracle.py puts it behind the labelling
workchain's interface, and benchmarks/al_efficiency.py calls it directly. Nothing here is the physics of a real
material.

The toy crystal is rocksalt "NaCl" made of `REPEAT` primitive cells (`toy_structure`); the oracle needs structures
whose atoms keep the order of that crystal (MD and the loop never reorder atoms), because the toy cell dipole is
measured from each atom's reference site.
"""
import numpy as np

from polmodel.active_learning.selection import ENERGY_FORCES, FIELD_FRAMES, FULL
from toy_potential import reference_crystal, toy_labels

#: Primitive rocksalt cells in the toy crystal: 8 atoms, cell vectors of about 4 Å (a = 5.6 Å).
REPEAT = (2, 2, 1)
#: |ε| (V/Å) of the ±ε frames of the `full` tier, like FieldResponseWorkChain's field_magnitude.
FULL_FIELD = 0.05
TIERS = (ENERGY_FORCES, FIELD_FRAMES, FULL)


def toy_structure(repeat=REPEAT):
    """The ideal toy crystal (ase.Atoms)."""
    return reference_crystal(repeat)


def _frame(atoms, labels, efield, source, with_stress):
    from ase import Atoms

    frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
    frame.info["energy"] = labels["energy"]
    frame.info["efield"] = np.asarray(efield, dtype=float)
    frame.info["dipole"] = np.asarray(labels["dipole"])
    frame.info["polarization_quantum"] = 2.0 * atoms.cell.array
    frame.info["source"] = source
    frame.arrays["forces"] = np.asarray(labels["forces"])
    if with_stress:
        frame.info["stress"] = np.asarray(labels["stress"])
    return frame


def toy_label_frames(atoms, tier, field_vectors=(), source="toy", repeat=REPEAT):
    """The labelled frames of `atoms` at `tier`, as the DFT labelling would write them (toy numbers, exact).

    energy_forces: one zero-field frame with energy, forces, stress (no dipole: a plain SCF has no Berry phase);
    field_frames: that frame with the dipole, plus one frame (energy, forces, dipole; no stress) per field vector;
    full: the zero-field frame with dipole, Born charges and polarizability, plus frames at ±FULL_FIELD along x, y, z.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
    reference = reference_crystal(repeat)
    if atoms.get_chemical_symbols() != reference.get_chemical_symbols():
        raise ValueError(f"the toy oracle labels {reference.get_chemical_formula()} in the order of its reference "
                         f"crystal, got {atoms.get_chemical_formula()}")
    scaled = reference.get_scaled_positions()
    zero = toy_labels(atoms, scaled)
    frame = _frame(atoms, zero, np.zeros(3), source, with_stress=True)
    if tier == ENERGY_FORCES:
        del frame.info["dipole"], frame.info["polarization_quantum"]
        return [frame]
    frames = [frame]
    if tier == FULL:
        frame.info["polarizability"] = np.asarray(zero["polarizability"])
        frame.arrays["born_effective_charges"] = np.asarray(zero["born_effective_charges"]).reshape(len(atoms), 9)
        field_vectors = [sign * FULL_FIELD * axis for axis in np.eye(3) for sign in (1.0, -1.0)]
    for efield in field_vectors:
        frames.append(_frame(atoms, toy_labels(atoms, scaled, efield), efield, source, with_stress=False))
    return frames
