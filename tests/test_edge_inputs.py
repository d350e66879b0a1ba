"""Born charges through the per-edge inputs (polmodel/nn/edge_inputs.py) equal the plain reverse passes through the
positions, and the per-edge derivatives they use equal autograd's."""
import numpy as np
import pytest
import torch

from mixins_model import TEST_FIELD, BranchShifted, distorted_perovskite, make_test_model, open_molecule
from polmodel.data import keys
from polmodel.data.graphs import atoms_to_graph, collate
from polmodel.nn.edge_inputs import edge_inputs
from polmodel.nn.response import compute_response


def _batch(model):
    frames = [(distorted_perovskite(seed=3), TEST_FIELD), (open_molecule(), -TEST_FIELD)]
    return collate([atoms_to_graph(atoms, model.species, model.cutoff, efield=field, dtype=torch.float64)
                    for atoms, field in frames])


def _columnwise_gradients(outputs, inputs):
    """d outputs[..., k] / d inputs for every column k, by reverse passes: (E, K, *input_shape[1:])."""
    columns = [torch.autograd.grad(outputs[:, k].sum(), inputs, retain_graph=True)[0]
               for k in range(outputs.shape[1])]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("settings", [dict(), dict(lmax=3, num_layers=3, field_layers=2)])
def test_edge_input_derivatives_equal_autograd(settings):
    model = make_test_model(seed=5, **settings)
    data = _batch(model)
    inputs = edge_inputs(model, data)

    vectors = model.edge_vectors(data).detach().requires_grad_(True)
    harmonics = model.edge_harmonics(vectors)
    torch.testing.assert_close(inputs.harmonics, harmonics.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(inputs.harmonics_jacobian, _columnwise_gradients(harmonics, vectors),
                               rtol=0, atol=1e-12)

    lengths = torch.linalg.norm(vectors.detach(), dim=-1).requires_grad_(True)
    weights = model.radial_weights(lengths)
    for layer_weights, layer_ours, layer_slopes in zip(weights, inputs.radial_weights, inputs.radial_slopes):
        for weight, ours, slope in zip(layer_weights, layer_ours, layer_slopes):
            torch.testing.assert_close(ours, weight.detach(), rtol=0, atol=1e-14)
            # each weight depends on its own edge's length only: the column gradients are the slopes
            expected = _columnwise_gradients(weight, lengths)
            torch.testing.assert_close(slope, expected, rtol=0, atol=1e-12)
            assert slope.abs().max() > 1e-3


@pytest.mark.parametrize("settings", [dict(), dict(field_layers=2), dict(feature_lmax=2, field_layers=2)])
def test_born_charges_through_edges_equal_reverse_passes_through_positions(settings):
    """compute_response outside training takes the edge-input path; with training=True it differentiates through
    the positions. Both must give the same energy, forces, stress, dipole, Z* and α."""
    model = make_test_model(seed=2, **settings)
    data = _batch(model)
    flags = dict(born_charges=True, polarizability=True)
    through_edges = compute_response(model, data, **flags)
    through_positions = {name: value.detach() for name, value in
                         compute_response(model, data, training=True, **flags).items()}
    assert set(through_edges) == set(through_positions)
    for name, value in through_positions.items():
        scale = max(1.0, value[~torch.isnan(value)].abs().max().item())
        torch.testing.assert_close(through_edges[name], value, rtol=0, atol=1e-12 * scale, equal_nan=True,
                                   msg=name)
    assert through_edges[keys.BORN_CHARGES].abs().max() > 1e-3


def test_model_without_edge_inputs_takes_the_positions_path():
    """An energy module that adds terms outside the edges (here a dipole moved by the quantum 2e·R_1) keeps exact
    Z* and P."""
    model = make_test_model(seed=1)
    graph = collate([atoms_to_graph(distorted_perovskite(), model.species, model.cutoff, efield=TEST_FIELD,
                                    dtype=torch.float64)])
    plain = compute_response(model, graph, born_charges=True)
    shifted = compute_response(BranchShifted(model, [1, 0, 0]), graph, born_charges=True)
    np.testing.assert_allclose((shifted[keys.DIPOLE] - plain[keys.DIPOLE]).numpy(),
                               2.0 * graph[keys.CELL][:, 0].numpy(), atol=1e-12)
    torch.testing.assert_close(shifted[keys.BORN_CHARGES], plain[keys.BORN_CHARGES], rtol=0, atol=1e-12)
