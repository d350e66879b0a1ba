"""An analytic, field-dependent toy potential for a rocksalt-like binary ionic crystal, and labelled toy frames.

The electric enthalpy of a cell with positions R, cell h and field ε is

    E(R, h, ε) = E_pair(R, h) - ε · D(R, h) - ½ εᵀ α(R, h) ε

    E_pair = ½ Σ_{i≠j} φ_{s_i s_j}(r_ij)                       Morse pairs with a smooth cutoff
    D      = Σ_i q_{s_i} u_i + c Σ_{i≠j} q_{s_i} g(r_ij) r_ij     cell dipole ΩP at zero field (e·Å)
    α      = Σ_i a_{s_i} 1 + b Σ_{i≠j} g(r_ij) r̂_ij r̂_ijᵀ          clamped-ion polarizability (e·Å²/V)

with u_i the displacement of atom i from its site of a reference lattice (fractional reference positions, the
nearest periodic image), r_ij = r_j - r_i over periodic images within the cutoff, Σ q = 0 (neutral cell).
D is translation invariant (so Σ_i Z*_i = 0 exactly), rotation covariant and not linear in R, so Z* depends on
the geometry; α is symmetric and geometry dependent, which makes Z* field dependent as well.

Everything is written in torch float64; forces, stress, dipole, Z* and α are exact derivatives of that closed
form by automatic differentiation (independent of polmodel.nn.response), and tests/test_frames.py checks them
against central finite differences of the energy.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import primitive_neighbor_list

SPECIES = ("Na", "Cl")
LATTICE_CONSTANT = 5.6  # Å, conventional rocksalt cell; nearest neighbours at 2.8 Å


@dataclass(frozen=True)
class ToyParameters:
    charges: dict = field(default_factory=lambda: {"Na": 1.0, "Cl": -1.0})              # e
    # Morse (depth eV, stiffness 1/Å, minimum Å) per unordered species pair
    morse: dict = field(default_factory=lambda: {
        ("Cl", "Na"): (0.6, 1.4, 2.8),
        ("Na", "Na"): (0.08, 1.2, 3.9),
        ("Cl", "Cl"): (0.12, 1.2, 3.9),
    })
    cutoff: float = 5.0            # Å, where every pair term goes smoothly (C2) to zero
    dipole_coupling: float = 0.25  # c, dimensionless
    decay_length: float = 1.5      # Å, range of g(r)
    onsite_polarizability: dict = field(default_factory=lambda: {"Na": 0.4, "Cl": 1.2})  # e·Å²/V per atom
    bond_polarizability: float = 0.6  # b, e·Å²/V


def _smooth_cutoff(r, cutoff):
    x = (r / cutoff).clamp(max=1.0)
    return (1.0 - x * x) ** 3


def toy_enthalpy(positions, cell, efield, symbols, reference_scaled_positions, params=ToyParameters()):
    """E(R, h, ε) in eV as a differentiable torch scalar; `positions` (N, 3), `cell` (3, 3), `efield` (3,)."""
    positions_np = positions.detach().numpy()
    cell_np = cell.detach().numpy()
    i, j, shifts = primitive_neighbor_list("ijS", (True, True, True), cell_np, positions_np, params.cutoff)
    i = torch.as_tensor(i)
    j = torch.as_tensor(j)
    shifts = torch.as_tensor(shifts, dtype=positions.dtype)
    vectors = positions[j] - positions[i] + shifts @ cell
    r = vectors.norm(dim=-1)
    cutoff = _smooth_cutoff(r, params.cutoff)

    depth, stiffness, minimum = (torch.tensor([params.morse[tuple(sorted((symbols[a], symbols[b])))][k]
                                               for a, b in zip(i.tolist(), j.tolist())], dtype=positions.dtype)
                                 for k in range(3))
    morse = depth * ((1.0 - torch.exp(-stiffness * (r - minimum))) ** 2 - 1.0) * cutoff
    pair_energy = 0.5 * morse.sum()

    charges = torch.tensor([params.charges[s] for s in symbols], dtype=positions.dtype)
    reference = torch.as_tensor(np.asarray(reference_scaled_positions), dtype=positions.dtype)
    scaled = torch.linalg.solve(cell.detach().T, positions.detach().T).T
    nearest_site = reference + torch.round(scaled - reference)
    displacements = positions - nearest_site @ cell
    decay = torch.exp(-r / params.decay_length) * cutoff
    dipole = (charges[:, None] * displacements).sum(0)
    dipole = dipole + params.dipole_coupling * (charges[i, None] * decay[:, None] * vectors).sum(0)

    onsite = torch.tensor([params.onsite_polarizability[s] for s in symbols], dtype=positions.dtype).sum()
    unit = vectors / r[:, None]
    polarizability = onsite * torch.eye(3, dtype=positions.dtype)
    polarizability = polarizability + params.bond_polarizability * torch.einsum("e,ea,eb->ab", decay, unit, unit)

    return pair_energy - efield @ dipole - 0.5 * efield @ polarizability @ efield


def toy_labels(atoms, reference_scaled_positions, efield=(0.0, 0.0, 0.0), params=ToyParameters()):
    """Exact energy, forces, stress (ASE sign), dipole, Born charges (N, 3, 3) and polarizability of `atoms`."""
    dtype = torch.float64
    positions = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    field_vector = torch.tensor(np.asarray(efield, dtype=float), dtype=dtype, requires_grad=True)
    strain = torch.zeros(3, 3, dtype=dtype, requires_grad=True)
    deformation = torch.eye(3, dtype=dtype) + strain
    energy = toy_enthalpy(positions @ deformation, cell @ deformation, field_vector, atoms.get_chemical_symbols(),
                          reference_scaled_positions, params)
    grad_positions, grad_field, grad_strain = torch.autograd.grad(
        energy, (positions, field_vector, strain), create_graph=True)
    dipole = -grad_field
    born_rows, polarizability_rows = [], []
    for a in range(3):
        d_positions, d_field = torch.autograd.grad(dipole[a], (positions, field_vector), retain_graph=True)
        born_rows.append(d_positions)        # ∂D_a/∂R_ib = ∂F_ib/∂ε_a
        polarizability_rows.append(d_field)  # ∂D_a/∂ε_b
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    stress = grad_strain.detach().numpy() / volume
    return {
        "energy": float(energy.detach()),
        "forces": -grad_positions.detach().numpy(),
        "stress": 0.5 * (stress + stress.T),
        "dipole": dipole.detach().numpy(),
        "born_effective_charges": torch.stack(born_rows, dim=1).detach().numpy(),
        "polarizability": torch.stack(polarizability_rows).detach().numpy(),
    }


class ToyIonicCalculator(Calculator):
    """ASE calculator for the toy enthalpy at a fixed field; `reference_scaled_positions` fixes the lattice sites."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "dipole", "born_effective_charges",
                              "polarizability"]

    def __init__(self, reference_scaled_positions, efield=(0.0, 0.0, 0.0), params=ToyParameters(), **kwargs):
        super().__init__(**kwargs)
        self.reference_scaled_positions = np.asarray(reference_scaled_positions, dtype=float)
        self.efield = np.asarray(efield, dtype=float)
        self.params = params

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if not self.atoms.pbc.all():
            raise ValueError("the toy potential is defined for cells periodic in all three directions")
        if len(self.atoms) != len(self.reference_scaled_positions):
            raise ValueError(f"{len(self.atoms)} atoms but {len(self.reference_scaled_positions)} reference sites")
        unknown = set(self.atoms.get_chemical_symbols()) - set(self.params.charges)
        if unknown:
            raise ValueError(f"the toy potential knows {sorted(self.params.charges)}, not {sorted(unknown)}")
        if abs(sum(self.params.charges[s] for s in self.atoms.get_chemical_symbols())) > 1e-12:
            raise ValueError("the toy potential needs a neutral cell (Σ q = 0) for a translation-invariant dipole")
        labels = toy_labels(self.atoms, self.reference_scaled_positions, self.efield, self.params)
        self.results.update(labels)
        self.results["free_energy"] = labels["energy"]


def reference_crystal(repeat=(1, 1, 1)):
    """The rocksalt primitive cell (2 atoms) repeated `repeat` times: the lattice the toy dipole is measured from."""
    from ase.build import bulk

    return bulk("NaCl", "rocksalt", a=LATTICE_CONSTANT).repeat(repeat)


DEFAULT_FIELDS = ((0.1, 0.0, 0.0), (0.0, -0.1, 0.0), (0.0, 0.0, 0.1))


def make_toy_frames(n, seed, fields=DEFAULT_FIELDS, *, repeat=(1, 1, 1), displacement=0.12, strain=0.02,
                    response_fraction=0.6, branch_shift_fraction=0.3, params=ToyParameters()):
    """Labelled frames (docs/conventions.md) for `n` randomly displaced and strained toy structures.

    Each structure gives one zero-field frame (energy, forces, stress, dipole, polarization quantum; with
    probability `response_fraction` also Born charges and polarizability, as if it had been run at ±ε) and one
    frame per field in `fields` (energy, forces, dipole, quantum; no stress, no Z*/α). With probability
    `branch_shift_fraction` a frame's dipole is moved by a random integer combination K of the quanta, as a
    Berry-phase calculation may report it on another branch, and its enthalpy by -ε·K, as pw.x's lelfield energy
    contains -ε·ΩP on that branch. The quantum rows are f·e·R_i with f = 2.
    """
    rng = np.random.default_rng(seed)
    reference = reference_crystal(repeat)
    reference_scaled = reference.get_scaled_positions()
    frames = []
    for structure in range(n):
        atoms = reference.copy()
        deformation = np.eye(3) + strain * rng.uniform(-1.0, 1.0, (3, 3))
        deformation = 0.5 * (deformation + deformation.T)
        atoms.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
        atoms.positions += displacement * rng.standard_normal(atoms.positions.shape)
        quantum = 2.0 * atoms.cell.array
        with_response = rng.uniform() < response_fraction
        for efield in [(0.0, 0.0, 0.0)] + [tuple(f) for f in fields]:
            labels = toy_labels(atoms, reference_scaled, efield, params)
            frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
            dipole, energy = labels["dipole"], labels["energy"]
            if rng.uniform() < branch_shift_fraction:
                branch = rng.integers(-2, 3, size=3) @ quantum
                dipole, energy = dipole + branch, energy - np.dot(efield, branch)
            frame.info["energy"] = energy
            frame.info["efield"] = np.asarray(efield, dtype=float)
            frame.info["dipole"] = dipole
            frame.info["polarization_quantum"] = quantum.copy()
            frame.info["source"] = f"toy-seed{seed}-structure{structure}"
            frame.arrays["forces"] = labels["forces"]
            if not any(efield):
                frame.info["stress"] = labels["stress"]
                if with_response:
                    frame.info["polarizability"] = labels["polarizability"]
                    frame.arrays["born_effective_charges"] = labels["born_effective_charges"].reshape(len(frame), 9)
            frames.append(frame)
    return frames


# A toy whose polarizability is anisotropic at centrosymmetric sites: a stronger bond term, so that a tetragonal
# strain of the rocksalt cell (both sites keep their inversion centre) splits α_zz from α_xx by several percent.
ANISOTROPIC_PARAMETERS = ToyParameters(onsite_polarizability={"Na": 0.2, "Cl": 0.6}, bond_polarizability=4.0)


def tetragonal_frames(strains, axis=2, params=ANISOTROPIC_PARAMETERS):
    """Zero-field labelled frames (energy, forces, stress, dipole, quantum, Z*, α) of the rocksalt primitive cell
    stretched by 1 + η along `axis` for each η in `strains`. The atoms stay on their lattice sites, which keep
    their inversion centre: a polar vector of the environment vanishes there, and α's anisotropy comes from the
    rank-2 shape of the neighbourhood alone (α_zz ≠ α_xx for η ≠ 0)."""
    reference = reference_crystal()
    frames = []
    for strain in strains:
        stretch = np.eye(3)
        stretch[axis, axis] += strain
        atoms = reference.copy()
        atoms.set_cell(reference.cell.array @ stretch, scale_atoms=True)
        labels = toy_labels(atoms, reference.get_scaled_positions(), params=params)
        frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
        frame.info.update(energy=labels["energy"], efield=np.zeros(3), stress=labels["stress"],
                          dipole=labels["dipole"], polarization_quantum=2.0 * atoms.cell.array,
                          polarizability=labels["polarizability"], source=f"toy-tetragonal-{strain:+.3f}-axis{axis}")
        frame.arrays["forces"] = labels["forces"]
        frame.arrays["born_effective_charges"] = labels["born_effective_charges"].reshape(len(frame), 9)
        frames.append(frame)
    return frames
