"""The weighted loss: masks for missing labels, the folded dipole, and gradients that reach the weights."""
import numpy as np
import pytest
import torch

from polmodel.data import keys
from polmodel.data.graphs import atoms_to_graph, collate
from polmodel.data.polarization import fold_dipole_difference
from polmodel.nn.model import PolModel
from polmodel.training.losses import LossWeights, TargetBatch, paired_values, predict, weighted_loss
from toy_potential import make_toy_frames

TINY = dict(num_features=8, num_layers=1, radial_hidden=8, readout_hidden=8, lmax=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PolModel(["Cl", "Na"], 5.0, **TINY).to(torch.float64)


@pytest.fixture(scope="module")
def frames():
    return make_toy_frames(3, seed=5, branch_shift_fraction=0.0, response_fraction=1.0)


def _loss(model, frames, weights=LossWeights()):
    data = collate([atoms_to_graph(f, model.species, model.cutoff, dtype=torch.float64) for f in frames])
    targets = TargetBatch(frames)
    return weighted_loss(paired_values(predict(model, data, targets, training=True), targets), weights)


def _on_other_branch(frame, integers):
    """The frame as pw.x reports it on another branch: dipole + K, enthalpy - ε·K (K = integers @ quanta)."""
    moved = frame.copy()
    branch = np.asarray(integers) @ frame.info["polarization_quantum"]
    moved.info["dipole"] = frame.info["dipole"] + branch
    moved.info["energy"] = frame.info["energy"] - np.dot(frame.info["efield"], branch)
    return moved


def test_loss_is_the_same_on_any_branch_and_changes_off_the_quantum_lattice(model, frames):
    _, reference = _loss(model, frames)
    rng = np.random.default_rng(0)
    assert any(np.any(f.info["efield"]) for f in frames)
    shifted = [_on_other_branch(f, rng.integers(-3, 4, size=3)) for f in frames]
    _, on_other_branch = _loss(model, shifted)
    assert float(on_other_branch[keys.DIPOLE]) == pytest.approx(float(reference[keys.DIPOLE]), rel=1e-12, abs=0)
    for name in reference:
        assert float(on_other_branch[name]) == pytest.approx(float(reference[name]), rel=1e-12, abs=0)
    moved = [f.copy() for f in frames]
    for frame in moved:
        frame.info["dipole"] = frame.info["dipole"] + 0.3 * frame.info["polarization_quantum"][0]
    _, off_lattice = _loss(model, moved)
    assert abs(float(off_lattice[keys.DIPOLE]) - float(reference[keys.DIPOLE])) > 1e-3


def test_finite_field_energy_label_follows_the_dipole_branch(model, frames):
    """pw.x's enthalpy at ε carries -ε·ΩP on the branch it reports; moving only the energy is a real error."""
    at_field = [f for f in frames if np.any(f.info["efield"])]
    _, reference = _loss(model, at_field)
    _, moved_together = _loss(model, [_on_other_branch(f, [6, -2, 1]) for f in at_field])
    assert float(moved_together[keys.ENERGY]) == pytest.approx(float(reference[keys.ENERGY]), rel=1e-10)
    energy_only = [f.copy() for f in at_field]
    for frame in energy_only:
        frame.info["energy"] = frame.info["energy"] - np.dot(frame.info["efield"], 6 * frame.info["polarization_quantum"][0])
    _, wrong = _loss(model, energy_only)
    assert float(wrong[keys.ENERGY]) > float(reference[keys.ENERGY]) + 1e-4


def test_missing_labels_are_skipped_and_absent_quantities_contribute_nothing(model, frames):
    zero_field = [f for f in frames if not np.any(f.info["efield"])]
    _, full_terms = _loss(model, zero_field)
    assert set(full_terms) == {keys.ENERGY, keys.FORCES, keys.STRESS, keys.DIPOLE, keys.BORN_CHARGES,
                               keys.POLARIZABILITY}
    stripped = [f.copy() for f in zero_field]
    for frame in stripped:
        del frame.info["stress"], frame.info["polarizability"]
        del frame.arrays["born_effective_charges"]
    total, terms = _loss(model, stripped)
    assert set(terms) == {keys.ENERGY, keys.FORCES, keys.DIPOLE}
    assert torch.isfinite(total)
    # a label missing on one frame only: the term equals the term over the frames that have it
    partial = [f.copy() for f in zero_field]
    del partial[0].arrays["born_effective_charges"]
    _, partial_terms = _loss(model, partial)
    _, rest_terms = _loss(model, zero_field[1:])
    assert float(partial_terms[keys.BORN_CHARGES]) == pytest.approx(float(rest_terms[keys.BORN_CHARGES]), rel=1e-10)
    assert float(partial_terms[keys.BORN_CHARGES]) != pytest.approx(float(full_terms[keys.BORN_CHARGES]), rel=1e-6)


def test_weights_scale_their_terms_and_gradients_reach_the_parameters(model, frames):
    weights = LossWeights(energy=0.0, forces=0.0, stress=0.0, dipole=0.0, born_effective_charges=2.0,
                          polarizability=0.0)
    total, terms = _loss(model, frames, weights)
    assert float(total) == pytest.approx(2.0 * float(terms[keys.BORN_CHARGES]), rel=1e-12)
    model.zero_grad()
    total.backward()
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert norms and float(sum(norms)) > 0
    model.zero_grad()


def test_a_batch_without_labels_is_an_error(model, frames):
    bare = [f.copy() for f in frames[:1]]
    for key in ("energy", "dipole", "stress", "polarizability"):
        bare[0].info.pop(key, None)
    for key in ("forces", "born_effective_charges"):
        bare[0].arrays.pop(key, None)
    with pytest.raises(ValueError, match="no labels"):
        _loss(model, bare)


def test_terms_equal_the_mean_squared_errors_computed_by_hand(model, frames):
    from polmodel.nn.response import compute_response

    data = collate([atoms_to_graph(f, model.species, model.cutoff, dtype=torch.float64) for f in frames])
    _, terms = _loss(model, frames)
    out = compute_response(model, data, stress=True, born_charges=True, polarizability=True)
    n = np.array([len(f) for f in frames], dtype=float)
    energy = np.array([f.info["energy"] for f in frames])
    expected = {keys.ENERGY: np.mean(((out[keys.ENERGY].numpy() - energy) / n) ** 2),
                keys.FORCES: np.mean((out[keys.FORCES].numpy()
                                      - np.concatenate([f.arrays["forces"] for f in frames])) ** 2)}
    dipole_errors = []
    for g, frame in enumerate(frames):
        delta = out[keys.DIPOLE][g].numpy() - frame.info["dipole"]
        dipole_errors.append(fold_dipole_difference(delta, frame.info["polarization_quantum"]) / len(frame))
    expected[keys.DIPOLE] = np.mean(np.square(dipole_errors))
    has_stress = [g for g, f in enumerate(frames) if "stress" in f.info]
    expected[keys.STRESS] = np.mean([(out[keys.STRESS][g].numpy() - frames[g].info["stress"]) ** 2 for g in has_stress])
    has_response = [g for g, f in enumerate(frames) if "polarizability" in f.info]
    expected[keys.POLARIZABILITY] = np.mean([((out[keys.POLARIZABILITY][g].numpy() - frames[g].info["polarizability"])
                                              / len(frames[g])) ** 2 for g in has_response])
    offsets = np.concatenate([[0], np.cumsum(n).astype(int)])
    expected[keys.BORN_CHARGES] = np.mean([
        (out[keys.BORN_CHARGES][offsets[g]:offsets[g + 1]].numpy()
         - frames[g].arrays["born_effective_charges"].reshape(-1, 3, 3)) ** 2 for g in has_response])
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-10), name


# --- branch groups: the frames of one structure move onto the model's branch together ---------------------------------
def test_frames_of_one_branch_group_share_the_shift_onto_the_predicted_branch(frames):
    """Two frames of one structure whose predicted-minus-label differences straddle the half-quantum boundary: folded
    one by one they land on different branches (an ε·quantum error in the field frame's energy); as one group they
    share the integer combination that fits both best."""
    from polmodel.training.losses import dipole_branch_shift

    zero_field, field_frame = (frame.copy() for frame in frames[:2])
    quantum = zero_field.info["polarization_quantum"]
    predicted_zero = zero_field.info["dipole"] + 0.48 * quantum[0]
    predicted_field = field_frame.info["dipole"] + 0.53 * quantum[0]
    prediction = {keys.DIPOLE: torch.tensor(np.array([predicted_zero, predicted_field]))}

    separate = dipole_branch_shift(prediction, TargetBatch([zero_field, field_frame])).numpy()
    np.testing.assert_allclose(separate, np.array([np.zeros(3), quantum[0]]), atol=1e-9)

    for frame in (zero_field, field_frame):
        frame.info["dipole_branch"] = 7
    together = dipole_branch_shift(prediction, TargetBatch([zero_field, field_frame])).numpy()
    np.testing.assert_allclose(together[0], together[1], atol=1e-12)
    # the common shift minimises the summed squared distance (in |q1|²): no shift 0.48² + 0.53² = 0.511,
    # one quantum 0.52² + 0.47² = 0.491
    np.testing.assert_allclose(together, np.array([quantum[0], quantum[0]]), atol=1e-9)


def test_frame_weights_weigh_each_quantity_by_frame(model, frames):
    """With frame weights every quantity's mean squared error is the weighted mean over frames (per-atom entries
    carry their frame's weight); equal weights give the unweighted loss."""
    data = collate([atoms_to_graph(f, model.species, model.cutoff, dtype=torch.float64) for f in frames[:3]])
    weights = np.array([3.0, 1.0, 0.5])
    targets = TargetBatch(frames[:3], frame_weights=weights)
    pairs = paired_values(predict(model, data, targets), targets)
    _, terms = weighted_loss(pairs, LossWeights(), targets)
    for quantity, (label, predicted) in pairs.items():
        errors = (predicted - label).detach().pow(2).numpy()
        errors = errors.reshape(len(errors), -1).mean(axis=1)
        entry_frames = targets.index[quantity].numpy()
        if quantity in (keys.FORCES, keys.BORN_CHARGES):
            entry_frames = np.repeat(np.arange(3), targets.num_atoms.numpy())[entry_frames]
        entry_weights = weights[entry_frames]
        assert float(terms[quantity]) == pytest.approx(np.sum(entry_weights * errors) / np.sum(entry_weights),
                                                       rel=1e-12), quantity
    _, equal = weighted_loss(pairs, LossWeights(), TargetBatch(frames[:3], frame_weights=np.ones(3)))
    _, plain = weighted_loss(pairs, LossWeights())
    for quantity in plain:
        assert float(equal[quantity]) == pytest.approx(float(plain[quantity]), rel=1e-12)
