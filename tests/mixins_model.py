"""Reusable checks of a field-aware energy model's response (nequip-style test mixins).

Subclass `ResponseConsistencyMixin` in a test class, provide a `structure` fixture (an ase.Atoms, periodic or
open) and implement `response(self, atoms, efield, born_charges, polarizability)` returning a dict of numpy
arrays for that single frame under polmodel.data.keys names: ENERGY (scalar), FORCES (N, 3), DIPOLE (3,), and for
periodic cells STRESS (3, 3) and POLARIZATION (3,); BORN_CHARGES (N, 3, 3) and POLARIZABILITY (3, 3) when asked.
The mixin then checks rotation/translation/permutation symmetry, every derivative against central finite
differences of the model's own energy, the acoustic sum rule and the symmetry of α. Run it in float64.
The helpers (`central_difference`, `rotate`, `strained`, the structures) are importable on their own.
"""
import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.data import keys

# a field large enough that every order of the field coupling contributes
TEST_FIELD = np.array([0.08, -0.05, 0.11])


# --- structures ---------------------------------------------------------------------------------------------------
def distorted_perovskite(seed=0, displacement=0.12):
    """5-atom BaTiO3-like cell: triclinic, atoms displaced randomly (so it is polar and has no symmetry)."""
    rng = np.random.default_rng(seed)
    cell = np.diag([4.0, 4.1, 3.95]) + rng.uniform(-0.25, 0.25, (3, 3))
    atoms = Atoms("BaTiO3", cell=cell, pbc=True,
                  scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    atoms.positions += rng.normal(scale=displacement, size=(5, 3))
    return atoms


def open_molecule(seed=1):
    """A small open-boundary 'TiO3Ba' cluster (pbc False, no cell)."""
    rng = np.random.default_rng(seed)
    positions = np.array([[0, 0, 0], [1.9, 0.1, 0], [-0.1, 1.95, 0.2], [0.1, -0.2, 1.85], [2.2, 2.1, 1.9]])
    return Atoms("TiOOOBa", positions=positions + rng.normal(scale=0.05, size=(5, 3)), pbc=False)


def random_rotation(seed=7):
    """A proper rotation matrix (det +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return q if np.linalg.det(q) > 0 else -q


# --- transformations -----------------------------------------------------------------------------------------------
def rotate(atoms, rotation):
    """Rigidly rotate positions and cell: r → R r."""
    rotated = atoms.copy()
    rotated.set_cell(atoms.get_cell()[:] @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    return rotated


def strained(atoms, strain):
    """Positions and cell multiplied by (1 + strain) (row vectors: r → r (1 + strain))."""
    deformed = atoms.copy()
    deformation = np.eye(3) + strain
    deformed.set_cell(atoms.get_cell()[:] @ deformation, scale_atoms=False)
    deformed.positions = atoms.positions @ deformation
    return deformed


def displaced(atoms, index, direction, step):
    moved = atoms.copy()
    moved.positions[index, direction] += step
    return moved


def central_difference(function, step):
    """(f(+h) - f(-h)) / 2h for a function of the signed step (arrays allowed)."""
    return (np.asarray(function(step)) - np.asarray(function(-step))) / (2.0 * step)


def symmetric_unit_strain(a, b):
    """Strain whose derivative gives Ω·stress[a, b] (ASE's symmetric convention)."""
    strain = np.zeros((3, 3))
    strain[a, b] += 0.5
    strain[b, a] += 0.5
    return strain


# --- the mixin -----------------------------------------------------------------------------------------------------
class ResponseConsistencyMixin:
    """Symmetry and derivative-consistency checks; see the module docstring for what to provide."""

    symmetry_tolerance = 1e-10        # absolute, float64
    finite_difference_step = 1e-4     # Å, strain, V/Å
    finite_difference_tolerance = 1e-6

    def response(self, atoms, efield, born_charges=False, polarizability=False):
        raise NotImplementedError

    def _energy(self, atoms, efield):
        return float(self.response(atoms, efield)[keys.ENERGY])

    @staticmethod
    def _periodic(atoms):
        return bool(np.all(atoms.pbc))

    def _assert_close(self, actual, expected, tolerance, what):
        """Absolute tolerance for values of order one, relative to the largest entry for larger ones."""
        actual, expected = np.asarray(actual), np.asarray(expected)
        if not actual.size:
            return
        tolerance = tolerance * max(1.0, float(np.abs(expected).max()))
        error = np.max(np.abs(actual - expected))
        assert error <= tolerance, f"{what}: max deviation {error:.3g} > {tolerance:.3g}"

    # symmetry ------------------------------------------------------------------------------------------------------
    def test_rotation_equivariance(self, structure):
        rotation = random_rotation()
        before = self.response(structure, TEST_FIELD, born_charges=True, polarizability=True)
        after = self.response(rotate(structure, rotation), rotation @ TEST_FIELD, born_charges=True,
                              polarizability=True)
        tol = self.symmetry_tolerance
        self._assert_close(after[keys.ENERGY], before[keys.ENERGY], tol, "energy")
        self._assert_close(after[keys.FORCES], before[keys.FORCES] @ rotation.T, tol, "forces")
        self._assert_close(after[keys.DIPOLE], rotation @ before[keys.DIPOLE], tol, "dipole")
        self._assert_close(after[keys.BORN_CHARGES], rotation @ before[keys.BORN_CHARGES] @ rotation.T, tol,
                           "Born charges")
        self._assert_close(after[keys.POLARIZABILITY], rotation @ before[keys.POLARIZABILITY] @ rotation.T, tol,
                           "polarizability")
        if self._periodic(structure):
            self._assert_close(after[keys.STRESS], rotation @ before[keys.STRESS] @ rotation.T, tol, "stress")
            self._assert_close(after[keys.POLARIZATION], rotation @ before[keys.POLARIZATION], tol, "polarization")

    def test_translation_invariance(self, structure):
        moved = structure.copy()
        moved.positions += np.array([0.37, -1.21, 2.05])
        before = self.response(structure, TEST_FIELD, born_charges=True)
        after = self.response(moved, TEST_FIELD, born_charges=True)
        for name in (keys.ENERGY, keys.FORCES, keys.DIPOLE, keys.BORN_CHARGES):
            self._assert_close(after[name], before[name], self.symmetry_tolerance, name)

    def test_permutation_equivariance(self, structure):
        order = np.random.default_rng(3).permutation(len(structure))
        before = self.response(structure, TEST_FIELD, born_charges=True)
        after = self.response(structure[order], TEST_FIELD, born_charges=True)
        self._assert_close(after[keys.ENERGY], before[keys.ENERGY], self.symmetry_tolerance, "energy")
        self._assert_close(after[keys.DIPOLE], before[keys.DIPOLE], self.symmetry_tolerance, "dipole")
        self._assert_close(after[keys.FORCES], before[keys.FORCES][order], self.symmetry_tolerance, "forces")
        self._assert_close(after[keys.BORN_CHARGES], before[keys.BORN_CHARGES][order], self.symmetry_tolerance,
                           "Born charges")

    # derivatives ---------------------------------------------------------------------------------------------------
    def test_forces_are_minus_energy_gradient(self, structure):
        h = self.finite_difference_step
        forces = self.response(structure, TEST_FIELD)[keys.FORCES]
        numeric = np.array([[-central_difference(lambda s: self._energy(displaced(structure, i, b, s), TEST_FIELD), h)
                             for b in range(3)] for i in range(len(structure))])
        self._assert_close(forces, numeric, self.finite_difference_tolerance, "forces vs -dE/dR")

    def test_stress_is_strain_derivative(self, structure):
        if not self._periodic(structure):
            assert keys.STRESS not in self.response(structure, TEST_FIELD), "open boundaries have no stress"
            return
        h = self.finite_difference_step
        stress = self.response(structure, TEST_FIELD)[keys.STRESS]
        volume = structure.get_volume()
        numeric = np.array([[central_difference(
            lambda s: self._energy(strained(structure, s * symmetric_unit_strain(a, b)), TEST_FIELD), h) / volume
            for b in range(3)] for a in range(3)])
        self._assert_close(stress, numeric, self.finite_difference_tolerance, "stress vs (1/Ω) dE/dstrain")

    def test_dipole_is_minus_field_derivative(self, structure):
        h = self.finite_difference_step
        result = self.response(structure, TEST_FIELD)
        numeric = np.array([-central_difference(lambda s: self._energy(structure, TEST_FIELD + s * np.eye(3)[a]), h)
                            for a in range(3)])
        self._assert_close(result[keys.DIPOLE], numeric, self.finite_difference_tolerance, "dipole vs -dE/dε")
        if self._periodic(structure):
            self._assert_close(result[keys.POLARIZATION], result[keys.DIPOLE] / structure.get_volume(), 1e-12,
                               "polarization vs dipole/Ω")
        else:
            assert keys.POLARIZATION not in result, "open boundaries have no polarization"

    def test_born_charges_are_force_field_derivative(self, structure):
        h = self.finite_difference_step
        born = self.response(structure, TEST_FIELD, born_charges=True)[keys.BORN_CHARGES]
        numeric = np.stack([central_difference(
            lambda s: self.response(structure, TEST_FIELD + s * np.eye(3)[a])[keys.FORCES], h) for a in range(3)],
            axis=1)                                                          # [i, a, b] = dF_ib/dε_a
        self._assert_close(born, numeric, self.finite_difference_tolerance, "Z* vs dF/dε")

    def test_born_charges_are_dipole_position_derivative(self, structure):
        h = self.finite_difference_step
        born = self.response(structure, TEST_FIELD, born_charges=True)[keys.BORN_CHARGES]
        numeric = np.array([[central_difference(
            lambda s: self.response(displaced(structure, i, b, s), TEST_FIELD)[keys.DIPOLE], h)
            for b in range(3)] for i in range(len(structure))])              # [i, b, a] = d(ΩP_a)/dR_ib
        self._assert_close(born, numeric.transpose(0, 2, 1), self.finite_difference_tolerance, "Z* vs d(ΩP)/dR")

    def test_polarizability_is_field_derivative(self, structure):
        h = self.finite_difference_step
        alpha = self.response(structure, TEST_FIELD, polarizability=True)[keys.POLARIZABILITY]
        numeric = np.stack([central_difference(
            lambda s: self.response(structure, TEST_FIELD + s * np.eye(3)[b])[keys.DIPOLE], h) for b in range(3)],
            axis=1)                                                          # [a, b] = d(ΩP_a)/dε_b
        self._assert_close(alpha, numeric, self.finite_difference_tolerance, "α vs d(ΩP)/dε")
        # and directly as -d²E/dε_a dε_b from energies alone
        e0 = self._energy(structure, TEST_FIELD)
        second = np.empty((3, 3))
        hh = 2e-4
        for a in range(3):
            for b in range(3):
                ea, eb = hh * np.eye(3)[a], hh * np.eye(3)[b]
                second[a, b] = (self._energy(structure, TEST_FIELD + ea + eb) - self._energy(structure, TEST_FIELD + ea - eb)
                                - self._energy(structure, TEST_FIELD - ea + eb)
                                + self._energy(structure, TEST_FIELD - ea - eb)) / (4 * hh * hh)
        assert np.isfinite(e0)
        self._assert_close(alpha, -second, 1e-5, "α vs -d²E/dε²")

    def test_acoustic_sum_rule_and_symmetric_polarizability(self, structure):
        result = self.response(structure, TEST_FIELD, born_charges=True, polarizability=True)
        self._assert_close(result[keys.BORN_CHARGES].sum(axis=0), np.zeros((3, 3)), self.symmetry_tolerance,
                           "Σ_i Z*_i")
        alpha = result[keys.POLARIZABILITY]
        self._assert_close(alpha, alpha.T, self.symmetry_tolerance, "α - αᵀ")


@pytest.fixture(params=["perovskite", "molecule"])
def structure(request):
    """The two structures every ResponseConsistencyMixin test runs on."""
    return distorted_perovskite() if request.param == "perovskite" else open_molecule()


# --- a small random model with a non-trivial field coupling ----------------------------------------------------------
def make_test_model(seed=0, dtype=None, species=("Ba", "Ti", "O"), cutoff=4.5, energy_scale=5.0, field_scale=1.0,
                    **hyperparameters):
    """A small PolModel with random weights (fast enough for finite differences; float64 by default). The field
    scale defaults to 1 V/Å, so that TEST_FIELD and the finite-difference steps mean what they did before the
    scale existed; tests of the scale itself pass their own."""

    from polmodel.nn.model import PolModel

    torch.manual_seed(seed)
    settings = dict(num_features=8, radial_hidden=16, readout_hidden=8, num_radial=6)
    settings.update(hyperparameters)
    model = PolModel(list(species), cutoff, **settings)
    model = model.to(dtype or torch.float64)
    model.set_energy_scale(energy_scale)
    model.set_field_scale(field_scale)      # after the cast: a scale of 0.2 is not rounded to float32 first
    return model


def model_response(model, atoms, efield, born_charges=False, polarizability=False):
    """compute_response of one frame as numpy arrays (per-graph entries without the graph axis)."""

    from polmodel.data.graphs import atoms_to_graph
    from polmodel.nn.response import compute_response

    dtype = next(model.parameters()).dtype
    graph = atoms_to_graph(atoms, model.species, model.cutoff, efield=efield, dtype=dtype)
    result = compute_response(model, graph, stress=True, born_charges=born_charges, polarizability=polarizability)
    per_graph = {keys.ENERGY, keys.STRESS, keys.VIRIAL, keys.DIPOLE, keys.POLARIZATION, keys.POLARIZABILITY,
                 keys.DIELECTRIC}
    return {name: (value[0] if name in per_graph else value).detach().cpu().numpy() for name, value in result.items()
            if isinstance(value, torch.Tensor)}


class BranchShifted(torch.nn.Module):
    """A member whose dipole is its base model's plus whole quanta 2e·(n @ R): its energy gains −ε·(n @ 2R)."""

    def __init__(self, base, integers):
        super().__init__()
        self.base = base
        self.integers = torch.tensor(integers, dtype=torch.float64)
        self.species, self.cutoff = base.species, base.cutoff

    def forward(self, data):
        out = self.base(data)
        shift = 2.0 * torch.einsum("i,gij->gj", self.integers.to(data[keys.CELL]), data[keys.CELL])
        out[keys.ENERGY] = out[keys.ENERGY] - (data[keys.EFIELD] * shift).sum(-1)
        return out
