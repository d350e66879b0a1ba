"""Structures in: StructureData, ase.Atoms or pymatgen Structure objects, and any file ASE or pymatgen reads.

`to_structure_data(obj)` is the one conversion every Python launcher (`get_builder_from_protocol` of the
field-response and active-learning workchains) applies to the structures it is given; `read_structures(path)` is
what `polmodel launch` reads files with: pymatgen for the crystallographic formats it knows best (CIF with its
symmetry operations and partial-occupancy checks, VASP POSCAR/CONTCAR, Materials Project JSON), ASE for
everything else (extended XYZ, Quantum ESPRESSO input/output, ASE trajectories, ...).
"""
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from aiida import orm
from aiida.engine import calcfunction

if TYPE_CHECKING:
    from ase import Atoms
    from pymatgen.core import IStructure

    #: what `to_structure_data` converts (a pymatgen Structure is an IStructure)
    StructureLike = orm.StructureData | Atoms | IStructure

# names pymatgen's Structure.from_file recognises and reads better than ASE (CIF symmetry, VASP, MP JSON)
PYMATGEN_SUFFIXES = (".cif", ".mcif", ".vasp", ".poscar", ".json", ".cssr", ".res")
PYMATGEN_PREFIXES = ("POSCAR", "CONTCAR")


def to_structure_data(structure):
    """A StructureData from a StructureData (returned as is), an `ase.Atoms` or a pymatgen `Structure`."""
    if isinstance(structure, orm.StructureData):
        return structure
    try:
        from ase import Atoms
    except ImportError:  # pragma: no cover - ASE is a dependency
        Atoms = ()
    if isinstance(structure, Atoms):
        if not (np.all(np.isfinite(structure.positions)) and np.all(np.isfinite(structure.cell[:]))):
            raise ValueError(f"{structure.get_chemical_formula()}: NaN or infinite positions or cell")
        if not all(structure.pbc):
            raise ValueError(f"{structure.get_chemical_formula()}: a crystal is needed (periodic along a, b and c); "
                             f"got pbc={structure.pbc.tolist()}")
        return orm.StructureData(ase=structure)
    try:
        from pymatgen.core import IStructure
    except ImportError:
        IStructure = ()
    if isinstance(structure, IStructure):
        if not structure.is_ordered:
            raise ValueError(f"{structure.formula}: a disordered structure (partial occupancies) cannot be computed; "
                             "order it first, e.g. with pymatgen's OrderDisorderedStructureTransformation")
        return orm.StructureData(pymatgen_structure=structure)
    raise TypeError(f"a structure must be a StructureData, an ase.Atoms or a pymatgen Structure, "
                    f"not {type(structure).__name__}")


def _reads_with_pymatgen(path):
    return path.suffix.lower() in PYMATGEN_SUFFIXES or path.name.startswith(PYMATGEN_PREFIXES)


def read_structures(path):
    """The structures in the file `path` as StructureData, atoms wrapped into the cell: every CIF data block or
    every frame of a multi-frame file (extended XYZ, trajectory). ValueError with the reader's message when the
    file cannot be read."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".cif", ".mcif"):
            from pymatgen.io.cif import CifParser

            objects = CifParser(path).parse_structures(primitive=False)
        elif _reads_with_pymatgen(path):
            from pymatgen.core import Structure

            objects = [Structure.from_file(path)]
        else:
            import ase.io

            objects = ase.io.read(path, index=":")
    except Exception as error:  # the readers raise anything from ValueError to StopIteration on a bad file
        reader = "pymatgen" if _reads_with_pymatgen(path) else "ASE"
        raise ValueError(f"{path}: {reader} could not read a structure from it ({type(error).__name__}: {error})")
    if not objects:
        raise ValueError(f"{path}: the file holds no structure")
    return [_wrapped(to_structure_data(structure)) for structure in objects]


def _wrapped(structure):
    """`structure` with every atom inside its cell: a CIF stores wrapped fractional coordinates, an extended XYZ
    whatever positions it was given; wrapped, the same crystal read from either gives the same inputs."""
    atoms = structure.get_ase()
    atoms.wrap()
    return orm.StructureData(ase=atoms)


def structure_key(structure, index):
    """A link label for the `index`-th structure: its formula and index (e.g. `BaTiO3_000`)."""
    return f"{structure.get_formula(mode='hill_compact')}_{index:03d}"


def as_structure_namespace(structures):
    """`{key: StructureData}` from one structure, a list of them or a dict (keys kept), each converted."""
    if isinstance(structures, dict):
        return {key: to_structure_data(value) for key, value in structures.items()}
    if not isinstance(structures, (list, tuple)):
        structures = [structures]
    converted = [to_structure_data(structure) for structure in structures]
    seen = {}
    for index, structure in enumerate(converted):
        atoms = structure.get_ase()
        identity = (tuple(atoms.numbers), np.round(atoms.cell[:], 6).tobytes(), np.round(atoms.positions, 6).tobytes())
        if identity in seen:
            raise ValueError(f"structures {seen[identity] + 1} and {index + 1} ({structure.get_formula()}) are the same: "
                             "give each starting structure once")
        seen[identity] = index
    return {structure_key(structure, index): structure for index, structure in enumerate(converted)}


# Structures made from other nodes are made by calcfunctions, so that the graph links each to what it came from
# (a held-out label then traces back to the MD run that produced its structure).

def _periodic_copy(atoms):
    """`atoms` with only its species, positions and cell, periodic along a, b and c (no MD arrays or info)."""
    from ase import Atoms
    return Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)


@calcfunction
def trajectory_frame(trajectory, index):
    """Step `index` of a TrajectoryData (an MD run's frames) as a periodic StructureData of its own."""
    return orm.StructureData(ase=_periodic_copy(trajectory.get_step_structure(index.value).get_ase()))


@calcfunction
def strained_structure(structure, strain, displacement_A, seed):
    """`structure` with its cell multiplied by the 3×3 `strain` (atoms following, fractional coordinates kept), then
    every coordinate moved by a uniform random amount in ±`displacement_A` from generator `seed`."""
    atoms = _periodic_copy(structure.get_ase())
    atoms.set_cell(atoms.cell.array @ np.asarray(strain.get_list(), dtype=float), scale_atoms=True)
    atoms.positions += np.random.default_rng(seed.value).uniform(-displacement_A.value, displacement_A.value,
                                                                 size=atoms.positions.shape)
    return orm.StructureData(ase=atoms)


@calcfunction
def structure_difference(made, existing):
    """Record that `existing`, a structure made before structures were made by calcfunctions, equals `made` (one
    made now by a calcfunction from what `existing` came from): the largest differences of positions and cell (Å).
    The record links the two in the graph; it does not claim they are equal, it says by how much they are not."""
    first, second = made.get_ase(), existing.get_ase()
    if first.get_chemical_symbols() != second.get_chemical_symbols():
        raise ValueError(f"structures {made.uuid} and {existing.uuid} have different atoms")
    return orm.Dict({"max_position_difference_A": float(np.max(np.abs(first.positions - second.positions))),
                     "max_cell_difference_A": float(np.max(np.abs(first.cell.array - second.cell.array)))})
