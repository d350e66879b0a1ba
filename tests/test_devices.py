"""Device selection for training and MD: CPU everywhere, a GPU only where torch sees one."""
import pytest
import torch

from polmodel.runtime.devices import resolve_device, to_device

from mixins_model import make_test_model


def test_cpu_and_auto_resolve_on_any_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_malformed_or_unsupported_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_up_front():
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_device("cuda")


def test_training_and_md_command_lines_refuse_a_missing_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import ase.io
    from ase import Atoms

    from polmodel.cli import main

    # inputs that pass every other check, so that the missing GPU is what is refused
    atoms = Atoms("BaTiO3", cell=[4.0] * 3, pbc=True,
                  scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    atoms.info["energy"] = -1.0
    ase.io.write(tmp_path / "frames.xyz", atoms, format="extxyz")
    ase.io.write(tmp_path / "s.xyz", atoms, format="extxyz")
    make_test_model().save(tmp_path / "m.pt")
    assert main(["train", str(tmp_path / "frames.xyz"), "--output", str(tmp_path / "out.pt"), "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main(["md", "--model", str(tmp_path / "m.pt"), "--structure", str(tmp_path / "s.xyz"), "--output",
                 str(tmp_path / "t.xyz"), "--steps", "1", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_to_device_moves_tensors_only():
    data = {"positions": torch.zeros(2, 3), "note": "kept"}
    moved = to_device(data, torch.device("cpu"))
    assert moved["note"] == "kept" and moved["positions"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_the_gpu_gives_the_cpu_model():
    from toy_potential import make_toy_frames
    from polmodel.training.config import TrainingConfig
    from polmodel.training.evaluation import evaluate
    from polmodel.training.train import train_model

    frames = make_toy_frames(3, seed=2)
    options = dict(cutoff=4.5, epochs=3, batch_size=4, dtype="float64", quiet=True,
                   architecture={"num_features": 4, "num_layers": 1})
    cpu_model, _ = train_model(frames[:9], frames[9:], TrainingConfig(**options))
    gpu_model, _ = train_model(frames[:9], frames[9:], TrainingConfig(device="cuda", **options))
    assert next(gpu_model.parameters()).device.type == "cuda"
    cpu_metrics, gpu_metrics = evaluate(cpu_model, frames[9:]), evaluate(gpu_model, frames[9:])
    assert gpu_metrics["forces"]["mae"] == pytest.approx(cpu_metrics["forces"]["mae"], rel=1e-6)
