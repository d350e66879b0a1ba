"""Training on toy frames: reference fit, validation error going down, seeds, early stopping, ensembles, CLI."""
import copy
import json

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.training.config import TrainingConfig
from polmodel.training.data import fit_energy_scale, fit_reference_energies, split_frames, training_frame_set
from polmodel.training.ensembles import bootstrap_sample
from polmodel.training.evaluation import evaluate
from polmodel.training.loop import epoch_loss
from polmodel.training.train import initialize_model, train_model
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
    from polmodel.data.frames import structure_key

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


@pytest.mark.parametrize("seed", range(6))
def test_the_validation_part_holds_response_labels_when_two_structures_have_them(seed):
    from polmodel.data.frames import frame_born_charges, structure_key

    frames = _frames_of_structures(20, 1)
    for index in (3, 11):        # a loop's dataset: most frames cheap (E, F), two with the full response
        frames[index].arrays["born_effective_charges"] = np.stack([np.eye(3), -np.eye(3)])
    train, valid = split_frames(frames, 0.1, seed=seed)
    response = [frame_born_charges(frame) is not None for frame in valid]
    assert sum(response) == 1 and sum(frame_born_charges(frame) is not None for frame in train) == 1
    assert len(valid) <= 3 and not {structure_key(f) for f in train} & {structure_key(f) for f in valid}
    # one structure with a response label stays in training: nothing is added
    del frames[11].arrays["born_effective_charges"]
    plain = _frames_of_structures(20, 1)
    assert [len(part) for part in split_frames(frames, 0.1, seed=seed)] == \
        [len(part) for part in split_frames(plain, 0.1, seed=seed)]


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
    assert epoch_loss(first, valid_set, _config().loss_weights, 8)[0] == pytest.approx(history["best_valid_loss"],
                                                                                 rel=1e-6)
    assert history["best_valid_loss"] == min(e["valid_loss"] for e in history["epochs"])
    # per-quantity validation errors of every epoch and of the untrained model: the returned model's are its epoch's
    best = next(entry for entry in history["epochs"] if entry["epoch"] == history["best_epoch"])
    rmse = epoch_loss(first, valid_set, _config().loss_weights, 8)[1]
    assert set(best["valid_rmse"]) == set(history["initial_valid_rmse"]) == set(rmse) >= {"energy", "forces"}
    assert rmse == pytest.approx(best["valid_rmse"], rel=1e-6)


def test_learning_milestones_read_the_validation_curve():
    from polmodel.training.evaluation import learning_milestones

    curve = [0.9, 0.6, 0.45, 0.2, 0.12, 0.105, 0.1, 0.1]
    history = {"initial_valid_rmse": {"born_effective_charges": 1.0},
               "epochs": [{"epoch": epoch, "valid_rmse": {"born_effective_charges": value, "forces": 1.0}}
                          for epoch, value in enumerate(curve, start=1)]}
    # half of 1.0 first reached at epoch 3 (0.45); within 10 % of the lowest (0.1) first at epoch 6 (0.105)
    assert learning_milestones(history, "born_effective_charges") == (3, 6)
    assert learning_milestones(history, "born_effective_charges", converged_within=0.25) == (3, 5)
    assert learning_milestones(history, "forces") == (None, None)       # not in the untrained model's errors
    assert learning_milestones(history, "polarizability") == (None, None)


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
def test_fitting_born_charges_starts_at_once():
    """On the toy potential at the DFT protocols' field (0.0364 V/Å), the validation Z* error halves within the first
    10 % of the epochs it needs to converge (within 10 % of its lowest). Measured 2026-11-26 with these settings:
    halved at epoch 5, converged at 136 (seed 1: 4, 122); the model before the field readout and field scale:
    7 / 120 and 6 / 109 (benchmarks/field_model.py --toy --toy-field 0.0364 --epochs 150)."""
    from polmodel.training.evaluation import learning_milestones

    fields = 0.0364 * np.eye(3)
    train, valid = make_toy_frames(16, seed=0, fields=fields), make_toy_frames(5, seed=1, fields=fields)
    config = TrainingConfig(seed=0, quiet=True, epochs=150, patience=1000, batch_size=4, learning_rate=5e-3,
                            cutoff=5.0, architecture=dict(num_features=8, num_layers=1, radial_hidden=16,
                                                          readout_hidden=8, lmax=1))
    _, history = train_model(train, valid, config)
    halved, converged = learning_milestones(history, "born_effective_charges")
    assert halved is not None and converged is not None
    assert halved <= 0.1 * converged, (halved, converged)


@pytest.mark.slow
def test_cli_trains_an_ensemble_and_writes_model_metrics_and_plots(tmp_path, capsys):
    from polmodel import PolEnsemble, load
    from polmodel.cli import main
    from polmodel.data.frames import write_frames

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
    from polmodel.data.frames import read_frames
    from polmodel.training.data import split_frames

    _, valid = split_frames(read_frames(frames_path), 0.25, 3)
    again = evaluate(ensemble, valid)
    assert again["forces"]["mae"] == pytest.approx(metrics["validation"]["forces"]["mae"], rel=1e-5)


def test_cli_rejects_bad_input_with_a_message(tmp_path, capsys):
    from polmodel.cli import main

    (tmp_path / "bad.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\n")
    assert main(["train", str(tmp_path / "bad.xyz"), "--output", str(tmp_path / "m.pt")]) == 2
    assert "not valid extended XYZ" in capsys.readouterr().err
    write_path = tmp_path / "ok.xyz"
    from polmodel.data.frames import write_frames

    write_frames(write_path, make_toy_frames(1, seed=0))
    assert main(["train", str(write_path), "--output", str(tmp_path / "m.pt"), "--hyperparameters", "{oops"]) == 2
    assert "neither a JSON file nor a JSON string" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


# --- a long campaign: checkpoints, warm start, weight average --------------------------------------------------------
def _same_weights(first, second):
    assert list(first.state_dict()) == list(second.state_dict())
    return all(torch.equal(tensor, second.state_dict()[name]) for name, tensor in first.state_dict().items())


class Killed(Exception):
    """Stands for a SIGKILL: the process ends mid-epoch and only what was on disk survives."""


def test_a_killed_run_resumed_from_its_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(
        small_frames, tmp_path, monkeypatch):
    import polmodel.training.checkpoints as checkpoints
    import polmodel.training.loop as loop

    train_frames, valid_frames = small_frames[:8], small_frames[8:]
    # float64, a scheduler that changes the learning rate every epoch, a weight average: every piece of state matters
    config = _config(epochs=4, dtype="float64", ema_decay=0.5, scheduler="cosine", checkpoint_every=2)
    uninterrupted, history = train_model(train_frames, valid_frames, config)

    checkpoint = tmp_path / "run.ckpt"
    validations = {"count": 0}
    real_epoch_loss = loop.epoch_loss

    def killed_during_epoch_3(*args, **kwargs):
        validations["count"] += 1
        if validations["count"] == 4:  # the untrained model's, then epochs 1, 2 and 3
            raise Killed()
        return real_epoch_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "epoch_loss", killed_during_epoch_3)
    with pytest.raises(Killed):
        train_model(train_frames, valid_frames, config, checkpoint=checkpoint)
    monkeypatch.setattr(loop, "epoch_loss", real_epoch_loss)
    assert checkpoint.exists()

    resumed, resumed_history = train_model(train_frames, valid_frames, config, checkpoint=checkpoint)
    assert resumed_history["resumed_from_epoch"] == 2  # the last checkpoint before the kill
    assert _same_weights(resumed, uninterrupted)
    assert resumed_history["epochs"] == history["epochs"]
    assert len({e["learning_rate"] for e in history["epochs"]}) == 4  # the scheduler state was exercised
    # a finished run's checkpoint gives its result without training again
    again, again_history = train_model(train_frames, valid_frames, config, checkpoint=checkpoint)
    assert again_history["resumed_from_epoch"] == 4 and _same_weights(again, uninterrupted)
    # a checkpoint belongs to its frames and settings
    with pytest.raises(checkpoints.CheckpointError, match="other frames, settings"):
        train_model(train_frames, valid_frames, _config(epochs=4, dtype="float64", seed=9), checkpoint=checkpoint)


def test_warm_start_starts_from_the_given_model(small_frames):
    from polmodel.nn.model import PolModel

    config = _config(dtype="float64")
    initial = initialize_model(small_frames[:4], config)
    initial.set_reference_energies({"Na": -1.25, "Cl": 0.5})  # not what a fit to the frames would give
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in initial.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    unchanged, history = train_model(small_frames[:8], small_frames[8:], _config(dtype="float64", epochs=0),
                                     initial_model=initial)
    assert history["epochs"] == [] and _same_weights(unchanged, initial)
    assert evaluate(unchanged, small_frames[8:]) == evaluate(initial, small_frames[8:])
    trained, _ = train_model(small_frames[:8], small_frames[8:], _config(dtype="float64", epochs=1),
                             initial_model=initial)
    assert not _same_weights(trained, initial)
    assert torch.equal(trained.reference_energies, initial.reference_energies)

    with pytest.raises(ValueError, match=r"knows species \['Cl'\]; the frames also contain \['Na'\]"):
        train_model(small_frames[:4], [], config, initial_model=PolModel(["Cl"], config.cutoff, **TINY))
    with pytest.raises(ValueError, match="cutoff 4.0 Å was requested"):
        train_model(small_frames[:4], [], _config(cutoff=4.0), initial_model=initial)


def test_warm_started_ensemble_maps_members(small_frames):
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.training.ensembles import train_ensemble

    config = _config(dtype="float64", epochs=0, validation_fraction=0.0)
    initial = PolEnsemble([initialize_model(small_frames, _config(dtype="float64", seed=seed)) for seed in (1, 2)])
    ensemble, metrics = train_ensemble(small_frames[:4], config, size=3, initial_model=initial)
    assert metrics["warm_start"]
    for member, source in zip(ensemble.members, [initial.members[0], initial.members[1], initial.members[0]]):
        assert _same_weights(member, source)


def test_weight_average_stays_in_the_convex_hull_and_decay_zero_is_the_raw_weights():
    from polmodel.training.average import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    averages = {decay: WeightAverage(model, decay) for decay in (0.0, 0.9)}
    trajectory = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(30):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        trajectory.append([p.detach().clone() for p in model.parameters()])
        for average in averages.values():
            average.update(model)
        for index, value in enumerate(averages[0.9].averages):
            history = torch.stack([step[index] for step in trajectory])
            assert torch.all(value >= history.min(0).values - 1e-12)
            assert torch.all(value <= history.max(0).values + 1e-12)
        for value, raw in zip(averages[0.0].averages, model.parameters()):
            assert torch.equal(value, raw)
    assert not all(torch.equal(a, p) for a, p in zip(averages[0.9].averages, model.parameters()))
    # applied_to swaps the average in for the block only
    before = [p.detach().clone() for p in model.parameters()]
    with averages[0.9].applied_to(model):
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), averages[0.9].averages))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_validation_and_the_result_use_the_weight_average(small_frames):
    train_frames, valid_frames = small_frames[:8], small_frames[8:]
    raw, raw_history = train_model(train_frames, valid_frames, _config(dtype="float64", ema_decay=None))
    zero, zero_history = train_model(train_frames, valid_frames, _config(dtype="float64", ema_decay=0.0))
    assert _same_weights(zero, raw) and zero_history["epochs"] == raw_history["epochs"]
    averaged, history = train_model(train_frames, valid_frames, _config(dtype="float64", ema_decay=0.8))
    assert not _same_weights(averaged, raw)
    # the training losses (raw weights) are those of the run without an average; the validation losses are not
    assert [e["train_loss"] for e in history["epochs"]] == [e["train_loss"] for e in raw_history["epochs"]]
    assert [e["valid_loss"] for e in history["epochs"]] != [e["valid_loss"] for e in raw_history["epochs"]]
    valid_set = training_frame_set(valid_frames, averaged.species, _config(dtype="float64"))
    assert epoch_loss(averaged, valid_set, _config().loss_weights, 8)[0] == history["best_valid_loss"]


# --- frames weighted by field magnitude -------------------------------------------------------------------------------
def _at_field(frame, efield):
    moved = frame.copy()
    moved.info = {"energy": frame.info["energy"], "efield": np.asarray(efield, dtype=float)}
    return moved


def test_field_magnitude_weights_give_every_bin_the_same_total(small_frames):
    from polmodel.training.data import field_magnitude_weights

    base = small_frames[0]
    fields = ([(0, 0, 0)] * 5 + [(0, 0, 1e-9)] + [(0.0364, 0, 0), (0, -0.0364, 0), (0, 0, 0.0364)]
              + [(0.109, 0, 0)])
    frames = [_at_field(base, field) for field in fields]
    weights = field_magnitude_weights(frames)
    assert weights.mean() == pytest.approx(1.0)
    bins = [slice(0, 6), slice(6, 9), slice(9, 10)]  # zero field (1e-9 V/Å included), ε, 3ε
    totals = [weights[b].sum() for b in bins]
    assert totals == pytest.approx([totals[0]] * 3)
    assert weights[9] == pytest.approx(6 * weights[0])
    assert field_magnitude_weights(frames[6:9]) is None  # one magnitude: nothing to balance


def test_training_loss_weights_frames_by_field_magnitude(small_frames):
    """The validation loss of energy-only frames is Σ w_f e_f² / Σ w_f with the field-magnitude weights, not the
    plain mean over frames."""
    from polmodel.training.data import field_magnitude_weights

    base = small_frames[0]
    fields = [(0, 0, 0)] * 4 + [(0.05, 0, 0), (0, 0.15, 0)]
    frames = [_at_field(base, field) for field in fields]
    for index, frame in enumerate(frames):
        frame.info["energy"] += 0.3 * index  # different errors per frame
    config = _config(dtype="float64")
    model = initialize_model(frames, config)
    balanced = training_frame_set(frames, model.species, config)
    plain = training_frame_set(frames, model.species, _config(dtype="float64", balance_field_magnitudes=False))
    per_frame = np.array([epoch_loss(model, training_frame_set([frame], model.species, config),
                                     config.loss_weights, 8)[0] for frame in frames])
    weights = field_magnitude_weights(frames)
    assert epoch_loss(model, balanced, config.loss_weights, 8)[0] == pytest.approx(np.sum(weights * per_frame)
                                                                               / np.sum(weights), rel=1e-10)
    assert epoch_loss(model, plain, config.loss_weights, 8)[0] == pytest.approx(per_frame.mean(), rel=1e-10)
    assert not np.isclose(np.sum(weights * per_frame) / np.sum(weights), per_frame.mean())


def test_old_option_key_hyperparameters_is_read_as_the_architecture():
    config = TrainingConfig.from_dict({"hyperparameters": {"num_features": 4}, "learning_rate": 0.02})
    assert config.architecture == {"num_features": 4}
    assert "architecture" not in config.training_options() and config.training_options()["learning_rate"] == 0.02


@pytest.mark.slow
def test_cli_warm_start_and_checkpoint(tmp_path, capsys):
    from polmodel import PolEnsemble, PolModel
    from polmodel.cli import main
    from polmodel.data.frames import write_frames

    frames_path = tmp_path / "frames.xyz"
    write_frames(frames_path, make_toy_frames(1, seed=4))
    options = json.dumps({"architecture": {**TINY, "num_features": 4}, "cutoff": 4.5, "dtype": "float64"})
    common = ["train", str(frames_path), "--hyperparameters", options, "--seed", "2", "--quiet",
              "--validation-fraction", "0"]
    first, checkpoint, metrics = tmp_path / "first.pt", tmp_path / "state.ckpt", tmp_path / "metrics.json"
    assert main(common + ["--output", str(first), "--epochs", "1", "--checkpoint", str(checkpoint)]) == 0
    assert checkpoint.exists()
    # the same command again finds the finished checkpoint and writes the same model without training
    again = tmp_path / "again.pt"
    assert main(common + ["--output", str(again), "--epochs", "1", "--checkpoint", str(checkpoint),
                          "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["members"][0]["resumed_from_epoch"] == 1
    assert _same_weights(PolModel.load(again), PolModel.load(first))
    # warm start with no epochs hands back the initial model; members of an ensemble map onto an initial model
    warm = tmp_path / "warm.pt"
    assert main(common + ["--output", str(warm), "--epochs", "0", "--initial-model", str(first), "--ensemble", "2",
                          "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["initial_model_sha256"]
    for member in PolEnsemble.load(warm).members:
        assert _same_weights(member, PolModel.load(first))
    # an unusable initial model is refused before training, naming the file
    (tmp_path / "broken.pt").write_bytes(first.read_bytes()[:300])
    assert main(common + ["--output", str(tmp_path / "x.pt"), "--initial-model", str(tmp_path / "broken.pt")]) == 2
    error = capsys.readouterr().err
    assert "--initial-model" in error and "broken.pt" in error and not (tmp_path / "x.pt").exists()
    assert main(common + ["--output", str(tmp_path / "x.pt"), "--checkpoint", str(tmp_path / "no" / "such.ckpt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_polmodel_evaluate_reports_errors_on_frames_it_did_not_train_on(real_train_run, tmp_path):
    """`polmodel evaluate` on frames outside the training set: the energy MAE per atom it reports equals the one
    computed here from the calculator's ensemble-mean energies; bad inputs are one-line errors (exit 2)."""
    import json
    import subprocess
    import sys

    from ase.io import write

    from fixtures_al import labelled_frames, run_polmodel
    from polmodel import PolCalculator, load

    held_out = labelled_frames(3, seed=11)
    write(tmp_path / "held_out.xyz", held_out, format="extxyz")
    run_polmodel(["evaluate", str(real_train_run / "model.pt"), "held_out.xyz", "--metrics", "errors.json",
                  "--plots", "plots"], cwd=tmp_path)
    errors = json.loads((tmp_path / "errors.json").read_text())["errors"]
    calculator = PolCalculator(load(real_train_run / "model.pt"))
    expected = np.mean([abs(calculator.get_potential_energy(frame.copy()) - frame.info["energy"]) / len(frame)
                        for frame in held_out])
    # float32 model: batched and single-frame evaluation round differently (~1e-5 eV/atom here)
    assert errors["energy"]["mae"] == pytest.approx(expected, rel=1e-3)
    assert {"energy", "forces"} <= set(errors) and (tmp_path / "plots").is_dir()
    from ase import Atoms

    bare = [Atoms(frame.get_chemical_symbols(), frame.positions, cell=frame.cell, pbc=True) for frame in held_out]
    write(tmp_path / "unlabelled.xyz", bare, format="extxyz")
    executable = [sys.executable, "-m", "polmodel.cli", "evaluate"]
    for arguments, message in ((["missing.pt", "held_out.xyz"], "model missing.pt does not exist"),
                               ([str(real_train_run / "model.pt"), "unlabelled.xyz"], "hold no labels"),
                               ([str(real_train_run / "model.pt"), "missing.xyz"],
                                "frames file missing.xyz does not exist"),
                               ([str(real_train_run / "frames.xyz"), "held_out.xyz"], "model: ")):
        result = subprocess.run(executable + arguments, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _polarizability_scaled(frames, factor):
    """Copies of `frames` with their α labels times `factor`: a material whose α is small in the loss's units."""
    scaled = []
    for frame in frames:
        frame = frame.copy()
        if "polarizability" in frame.info:
            frame.info["polarizability"] = np.asarray(frame.info["polarizability"]) * factor
        scaled.append(frame)
    return scaled


def test_label_variance_normalization_divides_each_weight_by_its_labels_spread():
    from polmodel.training.losses import LossWeights, label_variances

    frames = make_toy_frames(6, seed=3, response_fraction=1.0)
    references = fit_reference_energies(frames, ["Cl", "Na"])
    variances = label_variances(frames, references)
    assert set(variances) == {"energy", "forces", "stress", "born_effective_charges", "polarizability"}
    forces = np.concatenate([frame.arrays["forces"].ravel() for frame in frames])
    assert variances["forces"] == pytest.approx(np.var(forces))
    # α labels 100x smaller: a variance 10^4 smaller, so a weight 10^4 larger, and the same loss term
    small = label_variances(_polarizability_scaled(frames, 0.01), references)
    assert small["polarizability"] == pytest.approx(1e-4 * variances["polarizability"])
    assert small["forces"] == variances["forces"]
    weights = LossWeights().divided_by(small)
    assert weights.polarizability == pytest.approx(1.0 / small["polarizability"])
    assert weights.dipole == LossWeights().dipole          # a dipole's spread is its branches': left as given
    with pytest.raises(ValueError, match="loss_normalization"):
        TrainingConfig(loss_normalization="by-feel")


@pytest.mark.slow
def test_with_normalized_weights_a_small_polarizability_is_learned_and_without_them_it_is_not():
    """α labels 100x below the toy's (as α-quartz's per-atom α is small beside its forces): with the weights as
    given the α term vanishes beside the force term and α is not learned; divided by the labels' variances, every
    quantity counts by how much of its spread the model misses. Uniform weights then cost forces; forces and energy
    weighted 10 (the potential first, docs/design.md "Targets and losses") learn α as well at equal epochs, with
    forces no worse than the unnormalized run's."""
    frames = _polarizability_scaled(make_toy_frames(16, seed=1, response_fraction=1.0), 0.01)
    valid = _polarizability_scaled(make_toy_frames(6, seed=2, response_fraction=1.0), 0.01)
    spread = np.std(np.concatenate([np.asarray(frame.info["polarizability"]).ravel() / len(frame) for frame in valid
                                    if "polarizability" in frame.info]))
    uniform = {quantity: 1.0 for quantity in ("energy", "forces", "stress", "dipole", "born_effective_charges",
                                              "polarizability")}
    runs = {"none": ("none", {}), "uniform": ("label_variance", {"loss_weights": uniform}),
            "potential_first": ("label_variance", {"loss_weights": {**uniform, "forces": 10.0, "energy": 10.0}})}
    alpha, forces = {}, {}
    for name, (normalization, weights) in runs.items():
        config = _config(epochs=40, batch_size=4, validation_fraction=0.0, loss_normalization=normalization,
                         **weights)
        model, history = train_model(frames, valid, config)
        errors = evaluate(model, valid)
        alpha[name], forces[name] = errors["polarizability"]["rmse"] / spread, errors["forces"]["rmse"]
        assert ("loss_weights" in history) == (normalization != "none")
    assert alpha["uniform"] < 0.3 < 1.0 < alpha["none"]
    assert alpha["potential_first"] < 0.3 and forces["potential_first"] < 1.1 * forces["none"] < forces["uniform"]


def test_spread_calibration_measures_the_members_spread_against_the_ensembles_error():
    from polmodel.data.spreads import largest_atom_norm
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel
    from polmodel.training.evaluation import spread_calibration

    frames = [frame for frame in make_toy_frames(3, seed=4, response_fraction=1.0) if "born_effective_charges"
              in frame.arrays]
    torch.manual_seed(0)
    first, second = (PolModel(["Cl", "Na"], 4.0, **TINY).double() for _ in range(2))
    same = spread_calibration(PolEnsemble([first, copy.deepcopy(first)]), frames)
    assert same["forces"]["spread"] < 1e-12 and same["forces"]["error"] > 0
    calibration = spread_calibration(PolEnsemble([first, second]), frames)
    assert set(calibration) == {"forces", "born_effective_charges", "polarizability"}
    # the error of each frame is that of the ensemble mean, as the calculator predicts it
    errors = []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = PolCalculator(PolEnsemble([first, second]), efield=frame.info.get("efield", (0.0, 0.0, 0.0)))
        errors.append(largest_atom_norm(atoms.get_forces() - frame.arrays["forces"]))
    assert calibration["forces"]["error"] == pytest.approx(np.mean(errors), rel=1e-6)
    assert calibration["forces"]["ratio"] == pytest.approx(calibration["forces"]["spread"] / np.mean(errors))


def test_member_outliers_names_the_member_whose_error_the_others_do_not_share():
    from polmodel.training.ensembles import OUTLIER_FACTOR, member_outliers

    def errors(alpha, forces):
        return {"polarizability": {"rmse": alpha}, "forces": {"rmse": forces}}

    # the α-quartz campaign's loop 4 members on their training frames' α labels
    assert member_outliers([errors(0.029, 0.09), errors(0.0040, 0.08), errors(0.0023, 0.085)]) == {
        0: ["polarizability"]}
    assert member_outliers([errors(0.029, 0.09), errors(0.0040, 0.08)]) == {0: ["polarizability"]}
    just_below = 0.99 * OUTLIER_FACTOR * 0.004
    assert member_outliers([errors(just_below, 0.09), errors(0.004, 0.08), errors(0.004, 0.085)]) == {}
    assert member_outliers([errors(0.029, 0.09)]) == {}


def test_an_outlier_member_is_named_and_trained_again_from_scratch(small_frames):
    """Two trained members and an untrained one: the untrained one's training-frame errors are outliers. Training
    0 epochs keeps the members as they are, so the retraining from scratch (also 0 epochs) cannot cure it: it is
    tried, recorded and not kept, and the member stays named."""
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.training.ensembles import train_ensemble

    frames = make_toy_frames(8, seed=5, response_fraction=1.0)
    trained = [train_model(frames, [], _config(epochs=25, seed=seed, validation_fraction=0.0))[0] for seed in (1, 2)]
    initial = PolEnsemble(trained + [initialize_model(frames, _config(seed=3))])
    config = _config(epochs=0, validation_fraction=0.0)
    _, metrics = train_ensemble(frames, config, size=3, initial_model=initial)
    assert set(metrics["outlier_members"]) == {"2"} and "polarizability" in metrics["outlier_members"]["2"]
    assert all("train" in record and "retrained" not in record for record in metrics["members"])
    ensemble, metrics = train_ensemble(frames, config, size=3, initial_model=initial, retrain_outliers=True)
    retrained = metrics["members"][2]["retrained"]
    assert retrained["kept"] is False and retrained["seed"] == config.seed + 2 + 3
    assert "polarizability" in retrained["reason"] and set(metrics["outlier_members"]) == {"2"}
    assert _same_weights(ensemble.members[2], initial.members[2])
