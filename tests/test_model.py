"""Neighbour lists, graph construction and the PolModel architecture."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mixins_model import TEST_FIELD, distorted_perovskite, make_test_model, model_response, open_molecule
from polmodel import keys
from polmodel.data import UnknownSpeciesError, atoms_to_graph, average_num_neighbors, collate
from polmodel.model import PolModel
from polmodel.neighbors import neighbor_list


# --- neighbour lists -------------------------------------------------------------------------------------------------
def _triclinic_small():
    atoms = Atoms("SiO", cell=[[2.6, 0.0, 0.0], [0.9, 2.4, 0.0], [0.4, -0.7, 2.9]], pbc=True,
                  scaled_positions=[[0.1, 0.05, 0.0], [0.55, 0.4, 0.6]])
    return atoms


def _slab():
    atoms = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    atoms.center(vacuum=6.0, axis=2)
    atoms.pbc = [True, True, False]
    return atoms


NEIGHBOUR_CASES = {
    "perovskite": (distorted_perovskite(), 5.0),
    "triclinic-cutoff-beyond-cell": (_triclinic_small(), 6.0),     # many images, including of the atom itself
    "rocksalt-supercell": (bulk("NaCl", "rocksalt", a=5.6).repeat((2, 2, 2)), 4.5),
    "open-molecule": (molecule("CH3CH2OH"), 2.5),
    "slab": (_slab(), 4.0),
}


@pytest.mark.parametrize("name", sorted(NEIGHBOUR_CASES))
def test_neighbor_list_matches_ase(name):
    atoms, cutoff = NEIGHBOUR_CASES[name]
    cell = atoms.get_cell()[:] if atoms.pbc.any() else np.zeros((3, 3))
    edge_index, shifts = neighbor_list(atoms.positions, cell, atoms.pbc, cutoff)
    ours = {(int(i), int(j), *map(int, s)) for (i, j), s in zip(edge_index.T, shifts)}
    i, j, s = ase_neighbor_list("ijS", atoms, cutoff)
    theirs = {(int(a), int(b), *map(int, c)) for a, b, c in zip(i, j, s)}
    assert len(ours) == edge_index.shape[1], "duplicate edges"
    assert ours == theirs
    assert not any(edge[0] == edge[1] and edge[2:] == (0, 0, 0) for edge in ours), "self-edge at zero shift"
    # the stored shift reproduces the distance convention r_ij = r_j - r_i + S @ cell
    vectors = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shifts @ cell
    assert np.all(np.linalg.norm(vectors, axis=1) < cutoff)
    assert np.all(np.diff(edge_index[0]) >= 0), "edges are sorted by receiver"


def test_neighbor_list_rejects_bad_input():
    with pytest.raises(ValueError, match="degenerate"):
        neighbor_list(np.zeros((2, 3)), np.zeros((3, 3)), [True, True, True], 3.0)
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list(np.zeros((2, 3)), np.eye(3) * 5, [True] * 3, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(np.full((2, 3), np.nan), np.eye(3) * 5, [True] * 3, 3.0)


def test_neighbor_list_scales_linearly():
    """Edges per atom stay constant as the supercell grows (no O(N²) all-pairs list)."""
    base = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    per_atom = []
    for repeat in (2, 4):
        atoms = base.repeat(repeat)
        edge_index, _ = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, 4.5)
        per_atom.append(edge_index.shape[1] / len(atoms))
    assert per_atom[0] == per_atom[1]


# --- graphs ------------------------------------------------------------------------------------------------------------
def test_atoms_to_graph_layout():
    atoms = distorted_perovskite()
    atoms.info["efield"] = [0.0, 0.0, 0.05]
    graph = atoms_to_graph(atoms, ["O", "Ti", "Ba"], 4.5)
    assert graph[keys.POSITIONS].shape == (5, 3) and graph[keys.POSITIONS].dtype == torch.float32
    assert graph[keys.CELL].shape == (1, 3, 3) and graph[keys.PBC].tolist() == [[True, True, True]]
    assert graph[keys.SPECIES_INDEX].tolist() == [2, 1, 0, 0, 0]
    assert graph[keys.EFIELD].tolist() == [[0.0, 0.0, pytest.approx(0.05)]], "falls back to atoms.info['efield']"
    assert atoms_to_graph(atoms, ["O", "Ti", "Ba"], 4.5, efield=[1, 2, 3])[keys.EFIELD].tolist() == [[1, 2, 3]]
    assert graph[keys.NUM_ATOMS].tolist() == [5] and graph[keys.BATCH].tolist() == [0] * 5
    open_graph = atoms_to_graph(open_molecule(), ["O", "Ti", "Ba"], 4.5, dtype=torch.float64)
    assert torch.all(open_graph[keys.CELL] == 0) and open_graph[keys.POSITIONS].dtype == torch.float64


def test_unknown_species_is_named():
    atoms = Atoms("BaTiO2F", positions=np.random.default_rng(0).uniform(0, 4, (5, 3)))
    with pytest.raises(UnknownSpeciesError, match="unknown species F") as info:
        atoms_to_graph(atoms, ["Ba", "Ti", "O"], 4.0)
    assert info.value.unknown == ["F"] and info.value.species == ["Ba", "Ti", "O"]
    assert isinstance(info.value, ValueError)


def test_bad_field_is_rejected():
    with pytest.raises(ValueError, match="efield"):
        atoms_to_graph(distorted_perovskite(), ["Ba", "Ti", "O"], 4.0, efield=[0.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="efield"):
        atoms_to_graph(distorted_perovskite(), ["Ba", "Ti", "O"], 4.0, efield=[0.0, 1.0])


def test_collate_offsets_and_labels():
    species = ["Ba", "Ti", "O"]
    first = atoms_to_graph(distorted_perovskite(), species, 4.5)
    second = atoms_to_graph(open_molecule(), species, 4.5)
    for graph, atoms in ((first, distorted_perovskite()), (second, open_molecule())):
        graph["forces_label"] = torch.zeros(len(atoms), 3)
    batch = collate([first, second])
    assert batch[keys.BATCH].tolist() == [0] * 5 + [1] * 5
    assert batch[keys.CELL].shape == (2, 3, 3) and batch[keys.EFIELD].shape == (2, 3)
    assert batch[keys.NUM_ATOMS].tolist() == [5, 5]
    assert batch["forces_label"].shape == (10, 3)
    second_edges = batch[keys.EDGE_INDEX][:, first[keys.EDGE_INDEX].shape[1]:]
    assert torch.equal(second_edges, second[keys.EDGE_INDEX] + 5)
    assert average_num_neighbors([first, second]) == pytest.approx(batch[keys.EDGE_INDEX].shape[1] / 10)
    with pytest.raises(ValueError, match="different entries"):
        collate([first, atoms_to_graph(open_molecule(), species, 4.5)])


# --- the model ---------------------------------------------------------------------------------------------------------
def test_hyperparameters_rebuild_the_model():
    model = make_test_model(seed=4)
    assert json.loads(json.dumps(model.hyperparameters)) == model.hyperparameters
    rebuilt = PolModel(model.species, model.cutoff, **model.hyperparameters).to(torch.float64)
    rebuilt.load_state_dict(model.state_dict())
    atoms = distorted_perovskite()
    assert model_response(model, atoms, TEST_FIELD)[keys.ENERGY] == model_response(rebuilt, atoms, TEST_FIELD)[keys.ENERGY]


def test_constructor_rejects_bad_settings():
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        PolModel(["Ba"], 4.0, num_feature=8)
    with pytest.raises(ValueError, match="distinct"):
        PolModel(["Ba", "Ba"], 4.0)
    with pytest.raises(ValueError, match="cutoff"):
        PolModel(["Ba"], -1.0)
    with pytest.raises(ValueError, match="num_layers"):
        PolModel(["Ba"], 4.0, num_layers=0)
    with pytest.raises(ValueError, match="field_layers"):
        PolModel(["Ba"], 4.0, field_layers=0)
    with pytest.raises(ValueError, match="cannot exceed num_layers"):
        PolModel(["Ba"], 4.0, num_layers=2, field_layers=3)


def test_field_layers_choose_the_layers_that_couple_the_field():
    """By default only the last layer couples the field; field_layers=num_layers couples it in every layer, and
    then the first layer's coupling changes the energy."""
    default = PolModel(["Ba", "O"], 4.0, num_layers=3)
    assert [layer.couple_field for layer in default.layers] == [False, False, True]
    field_modules = {name.split(".")[1] for name in default.state_dict()
                     if name.split(".")[2:3] in (["field_tp"], ["linear_field"])}
    assert field_modules == {"2"}
    every = make_test_model(seed=3, num_layers=2, field_layers=2)
    assert [layer.couple_field for layer in every.layers] == [True, True]
    atoms = distorted_perovskite()
    before = model_response(every, atoms, TEST_FIELD, born_charges=True)
    with torch.no_grad():
        every.layers[0].linear_field.weight.mul_(2.0)
    after = model_response(every, atoms, TEST_FIELD, born_charges=True)
    assert np.abs(after[keys.BORN_CHARGES] - before[keys.BORN_CHARGES]).max() > 1e-6


def test_default_model_is_float32_and_casts_to_float64():
    model = PolModel(["Ba", "Ti", "O"], 4.0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.hyperparameters["num_features"] == 32 and model.hyperparameters["lmax"] == 2
    with pytest.raises(ValueError, match="at least 1"):
        PolModel(["Ba"], 4.0, feature_lmax=0)
    assert model.hyperparameters["avg_num_neighbors"] > 0
    graph = atoms_to_graph(distorted_perovskite(), model.species, model.cutoff)
    assert model(graph)[keys.ENERGY].dtype == torch.float32
    model.to(torch.float64)
    graph = atoms_to_graph(distorted_perovskite(), model.species, model.cutoff, dtype=torch.float64)
    assert model(graph)[keys.ENERGY].dtype == torch.float64


def test_reference_energies_and_energy_scale():
    model = make_test_model(seed=2)
    atoms = distorted_perovskite()
    before = model_response(model, atoms, TEST_FIELD)
    model.set_reference_energies({"Ba": -100.0, "O": -7.5})
    shifted = model_response(model, atoms, TEST_FIELD)
    assert shifted[keys.ENERGY] == pytest.approx(before[keys.ENERGY] - 100.0 - 3 * 7.5, abs=1e-9)
    np.testing.assert_allclose(shifted[keys.FORCES], before[keys.FORCES], atol=1e-12)
    model.set_energy_scale(10.0)   # the test model was built with 5.0
    doubled = model_response(model, atoms, TEST_FIELD)
    np.testing.assert_allclose(doubled[keys.FORCES], 2 * before[keys.FORCES], atol=1e-10)
    np.testing.assert_allclose(doubled[keys.DIPOLE], 2 * before[keys.DIPOLE], atol=1e-10)
    with pytest.raises(ValueError, match="Xe"):
        model.set_reference_energies({"Xe": 1.0})


def test_energy_is_smooth_at_the_cutoff():
    """A neighbour leaving the sphere changes E and F continuously (the envelope and its derivatives vanish)."""
    model = make_test_model(seed=1)
    rc = model.cutoff

    def dimer(distance):
        return Atoms("TiO", positions=[[0, 0, 0], [distance, 0, 0]])

    inside = model_response(model, dimer(rc - 1e-6), np.zeros(3))
    outside = model_response(model, dimer(rc + 1e-6), np.zeros(3))
    assert abs(inside[keys.ENERGY] - outside[keys.ENERGY]) < 1e-9
    assert np.abs(inside[keys.FORCES]).max() < 1e-6
    assert np.abs(outside[keys.FORCES]).max() == 0.0
    near = model_response(model, dimer(0.8 * rc), np.zeros(3))
    assert np.abs(near[keys.FORCES]).max() > 1e-4, "the pair does interact inside the cutoff"


@pytest.mark.parametrize("settings", [dict(feature_lmax=2), dict(lmax=3, num_layers=3, field_layers=3),
                                      dict(lmax=1, num_layers=1)])
def test_other_architectures_stay_equivariant(settings):
    from mixins_model import random_rotation, rotate

    model = make_test_model(seed=9, **settings)
    atoms, rotation = distorted_perovskite(seed=2), random_rotation(seed=11)
    before = model_response(model, atoms, TEST_FIELD, born_charges=True, polarizability=True)
    after = model_response(model, rotate(atoms, rotation), rotation @ TEST_FIELD, born_charges=True,
                           polarizability=True)
    expected = {keys.ENERGY: before[keys.ENERGY], keys.FORCES: before[keys.FORCES] @ rotation.T,
                keys.STRESS: rotation @ before[keys.STRESS] @ rotation.T,
                keys.BORN_CHARGES: rotation @ before[keys.BORN_CHARGES] @ rotation.T,
                keys.POLARIZABILITY: rotation @ before[keys.POLARIZABILITY] @ rotation.T}
    for name, value in expected.items():
        scale = max(1.0, np.abs(value).max())
        np.testing.assert_allclose(after[name], value, rtol=0, atol=1e-10 * scale, err_msg=name)
    assert np.abs(before[keys.BORN_CHARGES]).max() > 1e-3
