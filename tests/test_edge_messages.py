"""EdgeMessages against e3nn's TensorProduct, its gather/sum pair to second order, and old model files."""
import pytest
import torch

from mixins_model import make_test_model
from e3nn import o3
from polmodel.nn.edge_messages import EdgeMessages, gather_senders, sum_over_receivers, uvu_paths

# (node irreps, edge harmonics lmax, kept output irreps): the model's two layers at feature_lmax 1 and 2, and
# higher harmonics than the model uses, so every branch of EdgeMessages.forward (scalar harmonic, scalar
# features, scalar output, general l1 ⊗ l2 → l3) meets e3nn's generated code
CASES = {
    "first-layer": ("4x0e", 2, "0e + 1o"),
    "second-layer": ("4x0e + 4x1o", 2, "0e + 1o"),
    "feature-lmax-2": ("3x0e + 3x1o + 3x2e", 2, "0e + 1o + 2e"),
    "harmonics-to-l3": ("3x0e + 3x1o + 3x2e", 3, "0e + 1o + 2e + 1e + 2o"),
}


def _random_edges(num_atoms, num_edges, generator):
    receivers = torch.randint(0, num_atoms, (num_edges,), generator=generator)
    senders = torch.randint(0, num_atoms, (num_edges,), generator=generator)
    return receivers, senders


@pytest.mark.parametrize("case", CASES)
def test_edge_messages_equal_e3nn_tensor_product_summed_over_receivers(case):
    irreps_in, lmax, allowed = CASES[case]
    irreps_in, irreps_sh = o3.Irreps(irreps_in), o3.Irreps.spherical_harmonics(lmax)
    allowed = {ir for _, ir in o3.Irreps(allowed)}
    saved_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        messages = EdgeMessages(irreps_in, irreps_sh, allowed)
        irreps_out, instructions = uvu_paths(irreps_in, irreps_sh, allowed)
        reference = o3.TensorProduct(irreps_in, irreps_sh, irreps_out, instructions, shared_weights=False,
                                     internal_weights=False)
    finally:
        torch.set_default_dtype(saved_dtype)
    assert messages.irreps_out == reference.irreps_out and messages.weight_numel == reference.weight_numel

    generator = torch.Generator().manual_seed(7)
    num_atoms, num_edges = 5, 23
    receivers, senders = _random_edges(num_atoms, num_edges, generator)
    features = torch.randn(num_atoms, irreps_in.dim, dtype=torch.float64, generator=generator)
    vectors = torch.randn(num_edges, 3, dtype=torch.float64, generator=generator)
    edge_sh = o3.spherical_harmonics(irreps_sh, vectors, normalize=True, normalization="component")
    weights = torch.randn(num_edges, reference.weight_numel, dtype=torch.float64, generator=generator)

    path_weights = list(weights.split(messages.multiplicity, dim=1))
    ours = messages(features, edge_sh, path_weights, senders, receivers)
    theirs = torch.zeros(num_atoms, reference.irreps_out.dim, dtype=torch.float64).index_add(
        0, receivers, reference(features[senders], edge_sh, weights))
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_model_path_weights_are_the_radial_network_split_by_path():
    model = make_test_model()
    layer = model.layers[1]
    radial_input = torch.rand(17, model.hyperparameters["num_radial"], dtype=torch.float64)
    whole = layer.radial(radial_input)
    torch.testing.assert_close(torch.cat(layer.path_weights(radial_input), dim=1), whole, rtol=0, atol=1e-13)


def test_gather_and_sum_first_and_second_derivatives():
    """The gather/sum pair, each the other's backward, is exact to second order (float64 gradcheck)."""
    generator = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 0, 1, 3, 3, 3, 4])
    rows = torch.randn(len(index), 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    summed = sum_over_receivers(rows, index, 6)
    assert torch.equal(summed, torch.zeros(6, 2, 3, dtype=torch.float64).index_add(0, index, rows))
    assert torch.equal(summed[2], torch.zeros(2, 3, dtype=torch.float64))   # an atom without edges gets nothing
    atoms = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.equal(gather_senders(atoms, index), atoms[index])
    # squared, so that the second derivatives are not zero
    assert torch.autograd.gradcheck(lambda r: sum_over_receivers(r, index, 6) ** 2, (rows,))
    assert torch.autograd.gradgradcheck(lambda r: sum_over_receivers(r, index, 6) ** 2, (rows,))
    assert torch.autograd.gradcheck(lambda a: gather_senders(a, index) ** 2, (atoms,))
    assert torch.autograd.gradgradcheck(lambda a: gather_senders(a, index) ** 2, (atoms,))
