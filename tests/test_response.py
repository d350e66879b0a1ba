"""The model's forces, stress, dipole, Z* and α are exact derivatives of its own energy, and transform correctly."""
import numpy as np
import pytest
import torch

from mixins_model import (ResponseConsistencyMixin, TEST_FIELD, distorted_perovskite, make_test_model,
                          model_response, open_molecule, structure)  # noqa: F401  (structure is a fixture)
from polmodel.data import keys
from polmodel.data.graphs import atoms_to_graph, collate
from polmodel.nn.response import compute_response

MODEL = make_test_model()


class TestPolModelResponse(ResponseConsistencyMixin):
    def response(self, atoms, efield, born_charges=False, polarizability=False):
        return model_response(MODEL, atoms, efield, born_charges, polarizability)


def test_field_changes_the_response():
    """The field coupling is live: a polar cell has a dipole at zero field, α and Z* are not zero, and the dipole
    follows the field to first order as ΩP(ε) ≈ ΩP(0) + α ε."""
    atoms = distorted_perovskite()
    zero = model_response(MODEL, atoms, np.zeros(3), born_charges=True, polarizability=True)
    assert np.linalg.norm(zero[keys.DIPOLE]) > 1e-3
    assert np.abs(zero[keys.POLARIZABILITY]).max() > 1e-2
    assert np.abs(zero[keys.BORN_CHARGES]).max() > 1e-2
    assert np.all(np.linalg.eigvalsh(zero[keys.DIELECTRIC]) != 1.0)
    field = np.array([1e-4, -2e-4, 1.5e-4])
    small = model_response(MODEL, atoms, field)
    linear = zero[keys.DIPOLE] + zero[keys.POLARIZABILITY] @ field
    assert np.abs(small[keys.DIPOLE] - linear).max() < 1e-6 * np.abs(zero[keys.DIPOLE]).max()
    assert not np.allclose(small[keys.ENERGY], zero[keys.ENERGY], rtol=0, atol=1e-12)


def test_open_boundaries_have_dipole_but_no_stress_or_polarization():
    result = model_response(MODEL, open_molecule(), TEST_FIELD, polarizability=True)
    assert keys.STRESS not in result and keys.POLARIZATION not in result and keys.VIRIAL not in result
    assert result[keys.DIPOLE].shape == (3,)
    assert np.all(np.isnan(result[keys.DIELECTRIC]))


def test_batched_frames_match_separate_calls():
    frames = [(distorted_perovskite(seed=0), TEST_FIELD), (open_molecule(), -TEST_FIELD),
              (distorted_perovskite(seed=5).repeat((2, 1, 1)), np.array([0.0, 0.02, 0.0]))]
    graphs = [atoms_to_graph(atoms, MODEL.species, MODEL.cutoff, efield=field, dtype=torch.float64)
              for atoms, field in frames]
    batched = compute_response(MODEL, collate(graphs), born_charges=True, polarizability=True)
    start = 0
    for index, (atoms, field) in enumerate(frames):
        alone = model_response(MODEL, atoms, field, born_charges=True, polarizability=True)
        atoms_slice = slice(start, start + len(atoms))
        start += len(atoms)
        for name in (keys.FORCES, keys.BORN_CHARGES, keys.ATOMIC_ENERGY):
            np.testing.assert_allclose(batched[name][atoms_slice].numpy(), alone[name], rtol=0, atol=1e-11)
        for name in (keys.ENERGY, keys.DIPOLE, keys.POLARIZABILITY):
            np.testing.assert_allclose(batched[name][index].numpy(), alone[name], rtol=0, atol=1e-11)
        if all(atoms.pbc):
            for name in (keys.STRESS, keys.POLARIZATION, keys.DIELECTRIC):
                np.testing.assert_allclose(batched[name][index].numpy(), alone[name], rtol=0, atol=1e-11)
        else:
            assert torch.isnan(batched[keys.STRESS][index]).all()
            assert torch.isnan(batched[keys.POLARIZATION][index]).all()


def test_training_mode_keeps_graph_for_derivative_losses():
    graph = atoms_to_graph(distorted_perovskite(), MODEL.species, MODEL.cutoff, efield=TEST_FIELD,
                           dtype=torch.float64)
    result = compute_response(MODEL, graph, born_charges=True, polarizability=True, training=True)
    loss = sum(result[name].square().sum() for name in (keys.FORCES, keys.STRESS, keys.DIPOLE, keys.BORN_CHARGES,
                                                        keys.POLARIZABILITY))
    MODEL.zero_grad()
    loss.backward()
    gradients = [p.grad for p in MODEL.parameters() if p.grad is not None]
    assert gradients and any(g.abs().max() > 0 for g in gradients)
    MODEL.zero_grad()


def test_inference_results_are_detached():
    graph = atoms_to_graph(distorted_perovskite(), MODEL.species, MODEL.cutoff, dtype=torch.float64)
    result = compute_response(MODEL, graph, born_charges=True)
    assert not any(value.requires_grad for value in result.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_response_dtype_follows_model(dtype):
    model = make_test_model(dtype=dtype)
    graph = atoms_to_graph(distorted_perovskite(), model.species, model.cutoff, efield=TEST_FIELD, dtype=dtype)
    result = compute_response(model, graph, born_charges=True, polarizability=True)
    assert all(value.dtype == dtype for value in result.values())
    reference = model_response(MODEL, distorted_perovskite(), TEST_FIELD, born_charges=True)
    np.testing.assert_allclose(result[keys.FORCES].double().numpy(), reference[keys.FORCES], atol=1e-4)


@pytest.mark.slow
def test_model_can_learn_born_charges_and_polarizability():
    """The field coupling can represent a polarization linear in local displacements (→ Z*) plus a linear
    response to the field (→ α): fit ΩP = Σ_i q_i u_i + α ε on a few frames and recover q and α."""
    charges = {"Ba": 2.0, "Ti": 4.0, "O": -2.0}
    alpha = 2.0
    rng = np.random.default_rng(0)
    model = make_test_model(seed=0, dtype=torch.float32, energy_scale=1.0)
    graphs, targets = [], []
    for _ in range(10):
        atoms = distorted_perovskite(seed=0, displacement=0.0)
        atoms.set_cell(np.eye(3) * 4.0, scale_atoms=True)
        displacement = rng.normal(scale=0.1, size=(5, 3))
        atoms.positions += displacement
        field = rng.normal(scale=0.2, size=3)
        q = np.array([charges[symbol] for symbol in atoms.get_chemical_symbols()])
        graphs.append(atoms_to_graph(atoms, model.species, model.cutoff, efield=field))
        targets.append(q @ displacement + alpha * field)
    train, test = collate(graphs[:7]), collate(graphs[7:])
    target = torch.tensor(np.array(targets[:7]), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(120):
        optimizer.zero_grad()
        loss = (compute_response(model, train, stress=False, training=True)[keys.DIPOLE] - target).square().mean()
        loss.backward()
        optimizer.step()
    result = compute_response(model, test, stress=False, born_charges=True, polarizability=True)
    error = result[keys.DIPOLE].numpy() - np.array(targets[7:])
    # the untrained model misses by ~100%
    assert np.sqrt(np.mean(error ** 2)) < 0.2 * np.sqrt(np.mean(np.square(targets[7:])))
    born_trace = np.einsum("iaa->i", result[keys.BORN_CHARGES][:5].numpy()) / 3
    np.testing.assert_allclose(born_trace, [2.0, 4.0, -2.0, -2.0, -2.0], atol=0.75)   # from ~0.01 at start
    np.testing.assert_allclose(result[keys.POLARIZABILITY][0].numpy(), alpha * np.eye(3), atol=0.4)


def test_isolated_atom_is_polarizable_but_has_no_dipole():
    """Without neighbours an atom still couples to the field: isotropic α, and by symmetry no dipole or Z*."""
    from ase import Atoms

    result = model_response(MODEL, Atoms("Ti", positions=[[0.0, 0.0, 0.0]]), np.zeros(3), born_charges=True,
                            polarizability=True)
    alpha = result[keys.POLARIZABILITY]
    assert abs(alpha[0, 0]) > 1e-3
    np.testing.assert_allclose(alpha, alpha[0, 0] * np.eye(3), atol=1e-12)
    np.testing.assert_allclose(result[keys.DIPOLE], 0.0, atol=1e-14)
    np.testing.assert_allclose(result[keys.BORN_CHARGES], 0.0, atol=1e-14)
