"""The model knows its domain: the training frames' distances, density and fields are saved with the model, and a
structure in Bohr given as Å, a squeezed cell or a field far beyond the labels is named before any step."""
import warnings

import numpy as np
import pytest
import torch

from toy_potential import make_toy_frames
from polmodel.cli import main
from polmodel.data.domain import outside_domain, training_domain
from polmodel.dynamics.calculator import OutsideDomainError, OutsideDomainWarning, PolCalculator
from polmodel.nn.serialization import load, save
from polmodel.training.train import TrainingConfig, train_ensemble

BOHR_IN_ANGSTROM = 0.529177


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch ensemble of two on toy rocksalt frames (repeat 2: 16 atoms), saved and read back."""
    frames = make_toy_frames(4, seed=1, repeat=(2, 2, 2))
    config = TrainingConfig(cutoff=3.5, epochs=1, seed=0, architecture={"num_features": 4, "lmax": 1}, quiet=True)
    ensemble, _ = train_ensemble(frames, config, size=2)
    path = tmp_path_factory.mktemp("domain") / "model.pt"
    save(ensemble, path)
    return path, frames


def in_bohr(atoms):
    """The same structure with its lengths written in Bohr and read as Å (1.89x longer)."""
    scaled = atoms.copy()
    scaled.set_cell(scaled.cell / BOHR_IN_ANGSTROM, scale_atoms=True)
    return scaled


def test_the_domain_is_saved_with_the_model_and_a_training_structure_is_inside(trained):
    path, frames = trained
    domain = load(path).members[0].training_options["domain"]
    assert set(domain) == {"pairs", "density", "field_max", "cutoff"}
    assert domain["field_max"] == pytest.approx(max(np.linalg.norm(f.info["efield"]) for f in frames))
    assert outside_domain(frames[0], domain) == []
    assert outside_domain(frames[0], domain, field_max=domain["field_max"]) == []


def test_bohr_lengths_a_squeezed_cell_and_a_strong_field_are_named(trained):
    path, frames = trained
    domain = load(path).members[0].training_options["domain"]
    notes = outside_domain(in_bohr(frames[0]), domain)
    assert any("Bohr" in note for note in notes), notes
    assert any("number density" in note for note in notes), notes
    squeezed = frames[0].copy()
    squeezed.set_cell(squeezed.cell * 0.8, scale_atoms=True)
    assert any("closest at" in note for note in outside_domain(squeezed, domain))
    field = 30 * domain["field_max"]
    assert any("30x the largest labelled one" in note for note in outside_domain(frames[0], domain, field))


def test_the_calculator_warns_once_or_refuses(trained):
    path, frames = trained
    structure = in_bohr(frames[0])
    calculator = PolCalculator(str(path))
    with pytest.warns(OutsideDomainWarning, match="outside what the model was trained on: .*Bohr"):
        calculator.get_potential_energy(structure)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideDomainWarning)
        structure.positions[0] += 0.01
        calculator.get_potential_energy(structure)        # once per calculator
    with pytest.raises(OutsideDomainError, match="number density"):
        PolCalculator(str(path), outside_domain="refuse").get_potential_energy(structure)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideDomainWarning)
        PolCalculator(str(path)).get_potential_energy(frames[0])


def test_md_names_the_domain_at_the_start_or_refuses(trained, tmp_path, capsys):
    path, frames = trained
    in_bohr(frames[0]).write(tmp_path / "bohr.xyz")
    argv = ["md", "--model", str(path), "--structure", str(tmp_path / "bohr.xyz"), "--output",
            str(tmp_path / "t.xyz"), "--steps", "1", "--quiet", "--outside-domain", "refuse"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lie outside what the model was trained on" in err[0] and "Bohr" in err[0]
    assert not (tmp_path / "t.xyz").exists()
    argv[-1] = "warn"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "polmodel md: outside the training domain: " in err and (tmp_path / "t.xyz").exists()
