"""Neighbour lists, graph construction and the PolModel architecture."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mixins_model import TEST_FIELD, distorted_perovskite, make_test_model, model_response, open_molecule
from polmodel.data import keys
from polmodel.data.graphs import UnknownSpeciesError, atoms_to_graph, average_num_neighbors, collate
from polmodel.data.neighbors import neighbor_list
from polmodel.nn.model import PolModel


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


# --- the field coupling: every weight reaches E, the field scale ----------------------------------------------------
NO_DEAD_WEIGHT_SETTINGS = [dict(), dict(feature_lmax=2), dict(num_layers=1), dict(num_layers=3, field_layers=3),
                           dict(feature_lmax=2, num_layers=3), dict(feature_lmax=2, num_layers=2, field_layers=2),
                           dict(lmax=1, num_layers=2, field_layers=2)]


def _energy_gradients(model, atoms, efield):
    graph = atoms_to_graph(atoms, model.species, model.cutoff, efield=efield, dtype=torch.float64)
    energy = model(graph)[keys.ENERGY].sum()
    names, parameters = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(energy, parameters, allow_unused=True)))


# every setting of the irreps a user can choose: lmax (edge harmonics), feature_lmax, and which layers see the field
EVERY_IRREPS_SETTING = [dict(lmax=lmax, feature_lmax=feature_lmax, num_layers=layers, field_layers=field_layers)
                        for lmax in (1, 2, 3) for feature_lmax in (1, 2) for layers in (1, 2)
                        for field_layers in range(1, layers + 1)]


@pytest.mark.parametrize("settings", NO_DEAD_WEIGHT_SETTINGS + [
    pytest.param(settings, marks=pytest.mark.slow) for settings in EVERY_IRREPS_SETTING])
def test_every_weight_element_changes_the_energy(settings):
    """At a generic structure and field, every element of every parameter tensor has a non-zero gradient of E:
    no path of the field coupling (nor any other) ends in features that the energy never sees. Before the layers
    kept only the irreps they can produce, feature_lmax 2 with lmax 1 had 480-640 dead elements (2e features no
    message made, and the field products and mixes that read them)."""
    model = make_test_model(seed=7, field_scale=0.1, **settings)
    gradients = _energy_gradients(model, distorted_perovskite(seed=4), TEST_FIELD)
    dead = {name: int((gradient == 0).sum()) if gradient is not None else "all"
            for name, gradient in gradients.items() if gradient is None or bool((gradient == 0).any())}
    assert not dead, f"parameters with elements that cannot change E: {dead}"


def test_the_layout_before_the_field_readout_had_dead_field_weights():
    """Why the readout contracts the field: with field_readout 0 (files written before it) the field product's
    vector outputs in the last layer feed only gated vectors that the scalar readout drops."""
    model = make_test_model(seed=7, field_readout=0)
    gradients = _energy_gradients(model, distorted_perovskite(seed=4), TEST_FIELD)
    assert int((gradients["layers.1.field_tp.weight"] == 0).sum()) > 0
    assert all(int((gradient == 0).sum()) == 0 for name, gradient in gradients.items() if "layers.0" in name)


def test_field_product_is_e3nn_tensor_product():
    """FieldProduct is e3nn's shared-weight uvu TensorProduct, with exact Wigner symbols."""
    from polmodel.nn.edge_messages import uvu_paths
    from e3nn import o3
    from polmodel.nn.model import FieldProduct

    irreps_in, irreps_field = o3.Irreps("4x0e + 4x1o + 4x2e"), o3.Irreps("0e + 1o + 2e")
    allowed = {ir for _, ir in irreps_in}
    torch.manual_seed(0)
    ours = FieldProduct(irreps_in, irreps_field, allowed).to(torch.float64)
    irreps_out, instructions = uvu_paths(irreps_in, irreps_field, allowed)
    theirs = o3.TensorProduct(irreps_in, irreps_field, irreps_out, instructions, shared_weights=True,
                              internal_weights=True).to(torch.float64)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight.reshape(-1))
    features = torch.randn(6, irreps_in.dim, dtype=torch.float64)
    field = torch.randn(6, irreps_field.dim, dtype=torch.float64)
    assert ours.irreps_out == irreps_out and len(ours.paths) == 11
    torch.testing.assert_close(ours(features, field), theirs(features, field), rtol=0, atol=1e-6)


def test_the_network_sees_the_field_divided_by_the_field_scale():
    """A model with field scale s at field ε is the same model with scale 1 at ε/s: E equal, ΩP and Z* scaled by
    1/s, α by 1/s² (inputs and outputs stay in V/Å)."""
    scaled = make_test_model(seed=3, field_scale=0.2)
    plain = make_test_model(seed=3, field_scale=1.0)
    atoms = distorted_perovskite(seed=1)
    a = model_response(scaled, atoms, TEST_FIELD, born_charges=True, polarizability=True)
    b = model_response(plain, atoms, TEST_FIELD / 0.2, born_charges=True, polarizability=True)
    assert a[keys.ENERGY] == pytest.approx(b[keys.ENERGY], abs=1e-10)
    np.testing.assert_allclose(a[keys.DIPOLE], b[keys.DIPOLE] / 0.2, atol=1e-9)
    np.testing.assert_allclose(a[keys.BORN_CHARGES], b[keys.BORN_CHARGES] / 0.2, atol=1e-8)
    np.testing.assert_allclose(a[keys.POLARIZABILITY], b[keys.POLARIZABILITY] / 0.04, atol=1e-7)
    assert np.abs(a[keys.BORN_CHARGES] - model_response(plain, atoms, TEST_FIELD, born_charges=True)[
        keys.BORN_CHARGES]).max() > 1e-3
    with pytest.raises(ValueError, match="field_scale"):
        scaled.set_field_scale(0.0)


def test_field_scale_from_the_frames_fields():
    """The RMS of the non-zero fields, which then sit at 0.1 field scales."""
    from polmodel.nn.model import DEFAULT_FIELD_SCALE, field_scale_from_fields

    fields = [[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, -0.2, 0.0], [0.0, 0.0, 0.0]]
    assert field_scale_from_fields(fields) == pytest.approx(np.sqrt((0.01 + 0.04) / 2) / 0.1)
    assert field_scale_from_fields(np.zeros((3, 3))) == DEFAULT_FIELD_SCALE
    assert field_scale_from_fields([]) == DEFAULT_FIELD_SCALE


def test_field_readout_settings_are_checked():
    with pytest.raises(ValueError, match="field_readout"):
        PolModel(["Ba"], 4.0, field_readout=2)
    with pytest.raises(ValueError, match="feature_lmax 3"):
        PolModel(["Ba"], 4.0, feature_lmax=3)
    assert PolModel(["Ba"], 4.0, feature_lmax=3, field_readout=0).hyperparameters["field_readout"] == 0


@pytest.mark.slow
def test_anisotropic_polarizability_at_centrosymmetric_sites_is_learned():
    """Rocksalt stretched along one axis keeps every site's inversion centre, so no polar vector of the
    environment exists there; the toy's α still splits (α_∥ ≠ α_⊥, tests/toy_potential.py). A small model with
    the default layout (feature_lmax 1, field in the last layer) trained on α of cells stretched along z and x
    predicts the splitting of cells stretched along y to 20 % (+ 0.02 e·Å²/V) and the trace to 8 %. The layout
    before the field readout can only give an isotropic α there (its energy depends on the field through |ε|²
    alone at such a site)."""
    from polmodel.data.graphs import collate
    from polmodel.nn.response import compute_response
    from toy_potential import tetragonal_frames

    train = tetragonal_frames([-0.08, -0.04, 0.0, 0.04, 0.08]) + tetragonal_frames([-0.06, 0.06], axis=0)
    valid = tetragonal_frames([-0.05, 0.03, 0.07], axis=1)
    model = make_test_model(seed=0, species=("Na", "Cl"), cutoff=4.5, energy_scale=1.0, field_scale=0.3,
                            num_layers=1)

    def batch(frames):
        return collate([atoms_to_graph(f, model.species, model.cutoff, dtype=torch.float64) for f in frames])

    train_batch, valid_batch = batch(train), batch(valid)
    labels = torch.tensor(np.array([f.info["polarizability"] for f in train]))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):
        optimizer.zero_grad()
        alpha = compute_response(model, train_batch, stress=False, polarizability=True, training=True)
        ((alpha[keys.POLARIZABILITY] - labels) ** 2).mean().backward()
        optimizer.step()
    predicted = compute_response(model, valid_batch, stress=False, polarizability=True)[keys.POLARIZABILITY]

    def splitting(alpha):   # α_yy − α_xx (the stretch is along y)
        return alpha[..., 1, 1] - alpha[..., 0, 0]

    expected = torch.tensor(np.array([f.info["polarizability"] for f in valid]))
    assert splitting(expected).abs().min() > 0.1, "the toy's splitting is large enough to be seen"
    np.testing.assert_allclose(splitting(predicted), splitting(expected), rtol=0.2, atol=0.02)
    trace = lambda alpha: alpha.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    np.testing.assert_allclose(trace(predicted), trace(expected), rtol=0.08)


def test_radial_network_is_e3nn_fully_connected_net():
    """RadialNetwork has the parameters, the initialization and, bit for bit, the arithmetic of e3nn's
    FullyConnectedNet with an activation, unit variances and no output activation; its slope pass is the
    derivative of its output."""
    from e3nn.nn import FullyConnectedNet

    from polmodel.nn.model import RadialNetwork

    widths = [6, 16, 12]
    torch.manual_seed(4)
    ours = RadialNetwork(widths, torch.nn.functional.silu).to(torch.float64)
    torch.manual_seed(4)
    theirs = FullyConnectedNet(widths, torch.nn.functional.silu).to(torch.float64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    x = torch.randn(9, widths[0], dtype=torch.float64)
    assert torch.equal(ours(x), theirs(x))
    direction = torch.randn(9, widths[0], dtype=torch.float64)
    hidden, slope = ours.hidden_with_slope(x, direction)
    assert torch.equal(hidden, ours.hidden(x))
    step = 1e-6
    difference = (ours.hidden(x + step * direction) - ours.hidden(x - step * direction)) / (2 * step)
    torch.testing.assert_close(slope, difference, rtol=0, atol=1e-8)
