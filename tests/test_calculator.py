"""PolCalculator: ASE contract, agreement with polmodel.nn.response and with finite differences, ensembles."""
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from mixins_model import BranchShifted
from polmodel.data import keys
from polmodel.data.graphs import atoms_to_graph
from polmodel.dynamics.calculator import PolCalculator
from polmodel.nn.model import PolModel
from polmodel.nn.response import compute_response

warnings.filterwarnings("ignore", category=UserWarning)
SPECIES = ["Ba", "Ti", "O"]


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = PolModel(SPECIES, 4.0, num_features=8, lmax=2, num_layers=2)
    model.set_energy_scale(3.0)
    return model.to(dtype)


def batio3(repeat=(1, 1, 1), rattle=0.08, seed=1):
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    atoms.set_cell(atoms.cell * [1.0, 1.02, 0.98] + 0.05 * np.eye(3)[[1, 2, 0]], scale_atoms=True)
    return atoms


FIELD = np.array([0.01, -0.02, 0.03])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_properties_equal_compute_response(model):
    atoms = batio3()
    calc = PolCalculator(model, efield=FIELD)
    atoms.calc = calc
    graph = atoms_to_graph(atoms, model.species, model.cutoff, efield=FIELD, dtype=torch.float64)
    reference = compute_response(model, graph, stress=True, born_charges=True, polarizability=True)
    as_numpy = lambda key: reference[key].detach().numpy()  # noqa: E731
    assert atoms.get_potential_energy() == pytest.approx(float(as_numpy(keys.ENERGY)[0]), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), as_numpy(keys.FORCES), atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), as_numpy(keys.STRESS)[0], atol=1e-12)
    np.testing.assert_allclose(atoms.get_dipole_moment(), as_numpy(keys.DIPOLE)[0], atol=1e-12)
    np.testing.assert_allclose(calc.get_property("polarization", atoms), as_numpy(keys.POLARIZATION)[0], atol=1e-12)
    assert "born_effective_charges" not in calc.results and "polarizability" not in calc.results, \
        "get_forces must not pay for second derivatives"
    np.testing.assert_allclose(calc.get_property("born_effective_charges", atoms), as_numpy(keys.BORN_CHARGES),
                               atol=1e-12)
    np.testing.assert_allclose(calc.get_property("polarizability", atoms), as_numpy(keys.POLARIZABILITY)[0],
                               atol=1e-12)
    np.testing.assert_allclose(calc.get_property("dielectric_tensor", atoms), as_numpy(keys.DIELECTRIC)[0],
                               atol=1e-12)
    assert calc.get_property("free_energy", atoms) == atoms.get_potential_energy()


def test_forces_and_stress_equal_numerical_derivatives(model):
    atoms = batio3()
    calc = PolCalculator(model, efield=FIELD)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2  # a test on vanishing forces would prove nothing
    np.testing.assert_allclose(calc.calculate_numerical_forces(atoms, d=1e-5), forces, atol=1e-8)
    stress = atoms.get_stress()
    np.testing.assert_allclose(calc.calculate_numerical_stress(atoms, d=1e-6), stress, atol=1e-8)


def test_dipole_is_minus_field_derivative_of_energy(model):
    atoms = batio3()
    calc = PolCalculator(model, efield=FIELD)
    dipole = calc.get_property("dipole", atoms.copy())
    step = 1e-5
    numerical = []
    for axis in range(3):
        energies = []
        for sign in (1, -1):
            calc.set(efield=FIELD + sign * step * np.eye(3)[axis])
            energies.append(calc.get_potential_energy(atoms.copy()))
        numerical.append(-(energies[0] - energies[1]) / (2 * step))
    np.testing.assert_allclose(numerical, dipole, atol=1e-8)
    assert np.abs(dipole).max() > 1e-4


def test_set_efield_resets_and_changes_energy_by_minus_dipole_dot_field(model):
    atoms = batio3()
    calc = PolCalculator(model, efield=FIELD)
    atoms.calc = calc
    energy, dipole = atoms.get_potential_energy(), atoms.get_dipole_moment()
    delta = np.array([2e-5, -1e-5, 3e-5])
    calc.set(efield=FIELD + delta)
    assert calc.results == {}
    change = atoms.get_potential_energy() - energy
    assert change != 0.0
    assert change == pytest.approx(-dipole @ delta, rel=1e-2)
    # to third order in Δε the change is minus the mean of the dipoles at both ends dotted with Δε
    assert change == pytest.approx(-0.5 * (dipole + atoms.get_dipole_moment()) @ delta, rel=1e-6)


def test_efield_validation(model):
    with pytest.raises(ValueError, match="Zener"):
        PolCalculator(model, efield=(0, 0, 3.0))
    calc = PolCalculator(model)
    with pytest.raises(ValueError, match="finite"):
        calc.set(efield=(0, float("nan"), 0))


def test_unknown_species_is_a_clear_error(model):
    atoms = batio3()
    atoms[0].symbol = "Sr"
    atoms.calc = PolCalculator(model)
    with pytest.raises(ValueError, match="Sr"):
        atoms.get_forces()


def test_open_cluster_has_forces_and_dipole_but_no_stress(model):
    atoms = batio3()
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    calc = PolCalculator(model, efield=FIELD)
    atoms.calc = calc
    assert atoms.get_forces().shape == (5, 3)
    np.testing.assert_allclose(calc.calculate_numerical_forces(atoms, d=1e-5), atoms.get_forces(), atol=1e-8)
    assert atoms.get_dipole_moment().shape == (3,)
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        calc.get_property("polarization", atoms)


def test_single_model_has_no_spread(model):
    calc = PolCalculator(model)
    with pytest.raises(PropertyNotImplementedError, match="ensemble"):
        calc.get_property("forces_std", batio3())


def test_dtype_conversion_leaves_the_callers_model_alone():
    model = tiny_model(dtype=torch.float32)
    calc = PolCalculator(model, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float32
    assert next(calc.model.parameters()).dtype == torch.float64
    atoms = batio3()
    e64 = calc.get_potential_energy(atoms)
    e32 = PolCalculator(model).get_potential_energy(atoms)
    assert e64 == pytest.approx(e32, abs=1e-4)


def test_ensemble_mean_and_std_equal_members():
    from polmodel.nn.ensemble import PolEnsemble
    members = [tiny_model(seed) for seed in (1, 2, 3)]
    atoms = batio3()
    calc = PolCalculator(PolEnsemble(members), efield=FIELD)
    atoms.calc = calc
    singles = [PolCalculator(member, efield=FIELD) for member in members]
    for name in ("energy", "forces", "dipole", "polarization", "born_effective_charges", "polarizability"):
        values = np.array([single.get_property(name, atoms.copy()) for single in singles])
        np.testing.assert_allclose(calc.get_property(name, atoms), values.mean(axis=0), atol=1e-10)
        np.testing.assert_allclose(calc.get_property(f"{name}_std", atoms), values.std(axis=0), atol=1e-10)
    assert calc.get_property("forces_std", atoms).max() > 1e-4


def test_ensemble_averages_member_dipoles_on_one_branch():
    from polmodel.nn.ensemble import PolEnsemble

    first, second = tiny_model(1), tiny_model(2)
    atoms = batio3()
    aligned = PolCalculator(PolEnsemble([first, second]), efield=FIELD)
    shifted = PolCalculator(PolEnsemble([first, BranchShifted(second, [1, 0, -2])]), efield=FIELD)
    single = PolCalculator(BranchShifted(second, [1, 0, -2]), efield=FIELD)
    # the shifted member alone really is on another branch (by 2e·(R_1 − 2R_3), several e·Å)
    offset = single.get_property("dipole", atoms.copy()) - PolCalculator(second, efield=FIELD).get_property(
        "dipole", atoms.copy())
    assert offset == pytest.approx(2.0 * (atoms.cell[0] - 2 * atoms.cell[2]), abs=1e-8)
    for name in ("dipole", "polarization", "dipole_std", "polarization_std", "forces", "born_effective_charges"):
        np.testing.assert_allclose(shifted.get_property(name, atoms.copy()), aligned.get_property(name, atoms.copy()),
                                   atol=1e-8, err_msg=name)


def test_calculator_loads_a_saved_model_file(model, tmp_path):
    from polmodel.nn.serialization import save
    path = tmp_path / "model.pt"
    save(model, path)
    atoms = batio3()
    from_file = PolCalculator(str(path), dtype=torch.float64, efield=FIELD)
    assert from_file.get_potential_energy(atoms) == pytest.approx(
        PolCalculator(model, efield=FIELD).get_potential_energy(atoms), abs=1e-10)


def test_unknown_keywords_are_errors_naming_the_keyword(model):
    # ASE's base class would keep `efeild` as a parameter and compute at zero field
    with pytest.raises(TypeError, match=r"'efeild' \(did you mean 'efield'\?\)"):
        PolCalculator(model, efeild=(0, 0, 0.05))
    calc = PolCalculator(model, efield=FIELD, label="kept")   # ASE's own arguments still pass through
    with pytest.raises(TypeError, match="'efeild'"):
        calc.set(efeild=(0, 0, 0.05))
    assert np.array_equal(calc.efield, FIELD) and "efeild" not in calc.parameters


def test_overlapping_atoms_are_an_error_not_a_number(model):
    from polmodel.dynamics.calculator import OverlappingAtomsError
    atoms = batio3(rattle=0.0)
    # through the periodic boundary: atom 0 at the origin, atom 1 moved to 0.01 Å from its image
    atoms.positions[1] = atoms.cell[0] + atoms.cell[1] + [0.01, 0.0, 0.0]
    atoms.calc = PolCalculator(model)
    with pytest.raises(OverlappingAtomsError, match=r"atoms 0 \(Ba\) and 1 \(Ti\) are 0\.010 Å apart"):
        atoms.get_forces()
    atoms.positions[1] += [0.6, 0.0, 0.0]       # 0.61 Å: above the default limit, so a number again
    assert np.all(np.isfinite(atoms.get_forces()))
    atoms.calc = PolCalculator(model, min_distance=0.7)
    with pytest.raises(OverlappingAtomsError, match="0.610 Å"):
        atoms.get_forces()
    with pytest.raises(ValueError, match="below the model's cutoff"):   # pairs beyond it are not in the graph
        PolCalculator(model, min_distance=4.0)


def test_first_order_coupling_adds_born_charges_and_polarizability_times_field(model):
    """Allegro-pol's coupling: at field ε the forces are F(0) + Z*ᵀε and the dipole ΩP(0) + αε, with Z* and α the
    full second derivatives at zero field (float64), while the network coupling at the same field differs."""
    atoms = batio3(repeat=(2, 1, 1))
    field = np.array([0.05, -0.08, 0.12])
    zero = PolCalculator(model)
    atoms.calc = zero
    forces0, dipole0 = atoms.get_forces(), atoms.get_dipole_moment()
    born = zero.get_property("born_effective_charges", atoms)          # [i, a, b] = ∂(ΩP_a)/∂R_ib
    alpha = zero.get_property("polarizability", atoms)
    first_order = PolCalculator(model, efield=field, coupling="first-order")
    atoms.calc = first_order
    np.testing.assert_allclose(atoms.get_forces(), forces0 + np.einsum("iab,a->ib", born, field), rtol=0, atol=1e-10)
    np.testing.assert_allclose(atoms.get_dipole_moment(), dipole0 + alpha @ field, rtol=0, atol=1e-10)
    np.testing.assert_allclose(first_order.get_property("polarization", atoms),
                               (dipole0 + alpha @ field) / atoms.get_volume(), rtol=0, atol=1e-12)
    assert np.isclose(atoms.get_potential_energy(), zero.get_property("energy", atoms) - dipole0 @ field,
                      rtol=0, atol=1e-10)
    np.testing.assert_allclose(first_order.get_property("born_effective_charges", atoms), born, rtol=0, atol=1e-10)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    network = PolCalculator(model, efield=field)
    atoms.calc = network
    assert np.abs(atoms.get_forces() - forces0 - np.einsum("iab,a->ib", born, field)).max() > 1e-6


def test_first_order_coupling_of_an_ensemble_is_the_mean_of_its_members():
    from polmodel.nn.ensemble import PolEnsemble
    ensemble = PolEnsemble([tiny_model(seed=1), tiny_model(seed=2)])
    atoms = batio3()
    members = []
    for member in ensemble.members:
        atoms.calc = PolCalculator(member, efield=FIELD, coupling="first-order")
        members.append(atoms.get_forces())
    atoms.calc = PolCalculator(ensemble, efield=FIELD, coupling="first-order")
    np.testing.assert_allclose(atoms.get_forces(), np.mean(members, axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(atoms.calc.get_property("forces_std", atoms), np.std(members, axis=0), rtol=0,
                               atol=1e-12)


def test_unknown_coupling_is_refused(model):
    with pytest.raises(ValueError, match="coupling must be one of network, first-order"):
        PolCalculator(model, coupling="second-order")


@pytest.mark.parametrize("dtype", [torch.float16, "float16", torch.int64, "double"])
def test_a_dtype_without_second_derivatives_is_refused(model, dtype):
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        PolCalculator(model, dtype=dtype)
    assert PolCalculator(model, dtype="float32").dtype == torch.float32


def test_a_list_of_structures_is_refused(model):
    calculator = PolCalculator(model)
    with pytest.raises(TypeError, match="one ase.Atoms at a time, got list"):
        calculator.get_potential_energy([batio3(), batio3()])


def test_first_order_coupling_is_the_same_through_positions_and_through_edge_inputs(model):
    """The edge-input path (the default for PolModel) and the plain reverse passes through the positions (any
    energy module) give the same first-order forces and dipole."""
    from polmodel.nn.response import first_order_field_response

    class WithoutEdgeInputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, data):
            return self.inner(data)

    atoms = batio3(repeat=(2, 1, 1))
    graph = atoms_to_graph(atoms, SPECIES, model.cutoff, efield=np.array([0.05, -0.08, 0.12]), dtype=torch.float64)
    through_edges = first_order_field_response(model, graph)
    through_positions = first_order_field_response(WithoutEdgeInputs(model), graph)
    for key in (keys.FORCES, keys.DIPOLE, keys.ENERGY, keys.POLARIZATION):
        np.testing.assert_allclose(through_edges[key].numpy(), through_positions[key].numpy(), rtol=0, atol=1e-11)
