"""Training on toy frames: reference fit, validation error going down, seeds, early stopping, ensembles, CLI."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.train import (TrainingConfig, _epoch_loss, bootstrap_sample, evaluate, fit_energy_scale,
                            fit_reference_energies, initialize_model, split_frames, train_model, training_frame_set)
from toy_potential import make_toy_frames

TINY = dict(num_features=8, num_layers=1, radial_hidden=16, readout_hidden=8, lmax=1)
QUANTITIES = ("energy", "forces", "stress", "dipole", "born_effective_charges", "polarizability")


def _config(**overrides):
    options = dict(architecture=TINY, epochs=2, batch_size=8, learning_rate=1e-2, quiet=True, seed=0)
    options.update(overrides)
    return TrainingConfig(**options)


@pytest.fixture(scope="module")
def small_frames():
    return make_toy_frames(3, seed=21)


def test_reference_energies_are_the_least_squares_fit_of_composition_to_energy():
    rng = np.random.default_rng(0)
    truth = {"Na": -1.3, "Cl": -2.1}
    frames = []
    for _ in range(6):
        symbols = list(rng.choice(["Na", "Cl"], size=rng.integers(2, 6)))
        atoms = Atoms(symbols, positions=rng.uniform(0, 6, (len(symbols), 3)), cell=6 * np.eye(3), pbc=True)
        atoms.info["energy"] = sum(truth[s] for s in symbols)
        atoms.arrays["forces"] = np.full((len(atoms), 3), 0.2)
        frames.append(atoms)
    # a finite-field frame with a wildly different enthalpy must not enter the fit
    field_frame = frames[0].copy()
    field_frame.info.update(energy=100.0, efield=np.array([0.1, 0.0, 0.0]))
    fitted = fit_reference_energies(frames + [field_frame], ["Cl", "Na"])
    assert fitted == pytest.approx(truth, abs=1e-10)
    assert fit_energy_scale(frames, fitted) == pytest.approx(0.2)


def _frames_of_structures(num_structures, fields_per_structure):
    """NaCl frames: `fields_per_structure` fields on each of `num_structures` distinct geometries."""
    frames = []
    for structure in range(num_structures):
        for field_index in range(fields_per_structure):
            atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.8 + 0.01 * structure, 0, 0]], cell=np.eye(3) * 5.6, pbc=True)
            atoms.info["efield"] = np.array([0.01 * field_index, 0.0, 0.0])
            frames.append(atoms)
    return frames


def test_split_keeps_the_frames_of_one_structure_together_and_is_seeded():
    from polmodel.train import structure_key

    frames = _frames_of_structures(10, 7)
    train, valid = split_frames(frames, 0.2, seed=3)
    assert len(valid) == 14 and len(train) == 56
    assert not {structure_key(f) for f in train} & {structure_key(f) for f in valid}
    assert len({structure_key(f) for f in valid}) == 2
    again = split_frames(frames, 0.2, seed=3)
    assert [id(f) for f in again[1]] == [id(f) for f in valid]
    assert [id(f) for f in split_frames(frames, 0.2, seed=4)[1]] != [id(f) for f in valid]
    # a non-zero fraction holds out at least one whole structure, and one structure always stays for training
    train, valid = split_frames(frames[:21], 0.2, seed=0)
    assert len(valid) == 7 and len(train) == 14
    # two structures at 15 %: a whole one would be 50 %, far more than asked, so frames are split instead
    train, valid = split_frames(frames[:14], 0.15, seed=0)
    assert len(valid) == 2 and len(train) == 12
    # one structure only: frames are split too
    train, valid = split_frames(frames[:7], 0.3, seed=0)
    assert len(valid) == 2 and len(train) == 5
    assert split_frames(frames, 0.0, seed=0) == (frames, [])


def test_bootstrap_is_seeded_and_resamples():
    train = list(range(15))
    sample = bootstrap_sample(train, seed=1)
    assert len(sample) == len(train) and set(sample) <= set(train) and len(set(sample)) < len(train)
    assert bootstrap_sample(train, seed=1) == sample


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="scheduler"):
        TrainingConfig(scheduler="sometimes")
    with pytest.raises(ValueError, match="unknown training options"):
        TrainingConfig.from_dict({"learning_rat": 0.1})
    assert TrainingConfig.from_dict(TrainingConfig(seed=5).as_dict()) == TrainingConfig(seed=5)


def test_same_seed_gives_identical_weights_and_another_seed_differs(small_frames):
    train, valid = small_frames[:8], small_frames[8:]
    first, history = train_model(train, valid, _config(seed=0))
    second, _ = train_model(train, valid, _config(seed=0))
    other, _ = train_model(train, valid, _config(seed=1))
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert any(not torch.equal(t, other.state_dict()[n]) for n, t in first.state_dict().items()
               if t.dtype.is_floating_point and t.numel() > 1)
    # the model handed back carries the best validation weights of the run
    valid_set = training_frame_set(valid, first.species, _config())
    assert _epoch_loss(first, valid_set, _config().loss_weights, 8) == pytest.approx(history["best_valid_loss"],
                                                                                  rel=1e-6)
    assert history["best_valid_loss"] == min(e["valid_loss"] for e in history["epochs"])


def test_frames_without_any_label_are_refused(small_frames):
    bare = [Atoms(f.get_chemical_symbols(), positions=f.positions, cell=f.cell, pbc=True) for f in small_frames[:3]]
    with pytest.raises(ValueError, match="none of the training frames carries a label"):
        train_model(bare, [], _config())


def test_time_limit_stops_training(small_frames):
    _, history = train_model(small_frames[:4], small_frames[4:6], _config(epochs=50, max_time_s=0.0))
    assert history["stopped"] == "max_time_s" and len(history["epochs"]) == 1


@pytest.mark.slow
def test_training_lowers_the_validation_error_of_every_quantity():
    train = make_toy_frames(10, seed=0)
    valid = make_toy_frames(3, seed=1)
    # 25 epochs: measured ratios trained/untrained were E 0.11, F 0.27, stress 0.46, ΩP 0.08, Z* 0.09, α 0.13
    config = _config(epochs=25)
    before = evaluate(initialize_model(train, config), valid)
    model, history = train_model(train, valid, config)
    after = evaluate(model, valid)
    assert set(before) == set(after) == set(QUANTITIES)
    for quantity in QUANTITIES:
        assert after[quantity]["mae"] < 0.75 * before[quantity]["mae"], (quantity, before[quantity], after[quantity])
        assert after[quantity]["count"] == before[quantity]["count"] > 0
    assert history["epochs"][-1]["train_loss"] < history["epochs"][0]["train_loss"]


@pytest.mark.slow
def test_cli_trains_an_ensemble_and_writes_model_metrics_and_plots(tmp_path, capsys):
    from polmodel import PolEnsemble, load
    from polmodel.cli import main
    from polmodel.frames import write_frames

    frames_path = tmp_path / "frames.xyz"
    write_frames(frames_path, make_toy_frames(3, seed=4))
    options = json.dumps({**TINY, "batch_size": 8, "learning_rate": 0.01, "cutoff": 4.5})
    output, metrics_path, plots = tmp_path / "ensemble.pt", tmp_path / "metrics.json", tmp_path / "plots"
    code = main(["train", str(frames_path), "--output", str(output), "--ensemble", "2", "--bootstrap", "--seed", "3",
                 "--epochs", "2", "--hyperparameters", options, "--metrics", str(metrics_path), "--plots", str(plots),
                 "--validation-fraction", "0.25"])
    assert code == 0
    ensemble = load(output)
    assert isinstance(ensemble, PolEnsemble) and len(ensemble) == 2
    assert ensemble.cutoff == 4.5 and ensemble.members[0].hyperparameters["num_features"] == TINY["num_features"]
    # members differ (seeds 3 and 4), and the file holds the trained weights, not fresh ones
    first, second = (dict(m.state_dict()) for m in ensemble.members)
    assert any(not torch.equal(first[n], second[n]) for n in first if first[n].dtype.is_floating_point)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["num_train"] == 8 and metrics["num_validation"] == 4  # one of three structures (4 frames each)
    assert [m["seed"] for m in metrics["members"]] == [3, 4]
    for quantity in ("energy", "forces", "dipole"):
        for block in [metrics["validation"]] + [m["validation"] for m in metrics["members"]]:
            assert block[quantity]["mae"] >= 0 and block[quantity]["rmse"] >= block[quantity]["mae"]
            assert block[quantity]["count"] > 0
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["architecture"]["num_layers"] == 1
    pngs = sorted(p.name for p in plots.iterdir())
    assert {"energy_parity.png", "forces_parity.png", "dipole_parity.png"} <= set(pngs)
    for name in pngs:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the metrics describe the saved ensemble: re-evaluating the loaded file on the same split reproduces them
    from polmodel.train import split_frames
    from polmodel.frames import read_frames

    _, valid = split_frames(read_frames(frames_path), 0.25, 3)
    again = evaluate(ensemble, valid)
    assert again["forces"]["mae"] == pytest.approx(metrics["validation"]["forces"]["mae"], rel=1e-5)


def test_cli_rejects_bad_input_with_a_message(tmp_path, capsys):
    from polmodel.cli import main

    (tmp_path / "bad.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\n")
    assert main(["train", str(tmp_path / "bad.xyz"), "--output", str(tmp_path / "m.pt")]) == 2
    assert "not valid extended XYZ" in capsys.readouterr().err
    write_path = tmp_path / "ok.xyz"
    from polmodel.frames import write_frames

    write_frames(write_path, make_toy_frames(1, seed=0))
    assert main(["train", str(write_path), "--output", str(tmp_path / "m.pt"), "--hyperparameters", "{oops"]) == 2
    assert "neither a JSON file nor a JSON string" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
