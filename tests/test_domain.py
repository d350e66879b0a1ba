"""The model knows its domain: the training frames' distances, density, fields and sampling temperature are saved
with the model, and a structure in Bohr given as Å, a squeezed cell, a field far beyond the labels or MD far hotter
than the frames were sampled at is named before any step."""
import json
import warnings

import numpy as np
import pytest
import torch

from toy_potential import make_toy_frames
from polmodel.cli import main
from polmodel.data.domain import SAMPLED_TEMPERATURE_KEY, TEMPERATURE_FACTOR, outside_domain, training_domain
from polmodel.dynamics.calculator import OutsideDomainError, OutsideDomainWarning, PolCalculator
from polmodel.nn.serialization import load, save
from polmodel.training.config import TrainingConfig
from polmodel.training.ensembles import train_ensemble

BOHR_IN_ANGSTROM = 0.529177


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch ensemble of two on toy rocksalt frames (repeat 2: 16 atoms), saved and read back. Three of the
    four frames say they were sampled by MD at 300 K, as the active-learning loop's labels do; the fourth records no
    temperature, like a given or perturbed structure."""
    frames = make_toy_frames(4, seed=1, repeat=(2, 2, 2))
    for frame in frames[:3]:
        frame.info[SAMPLED_TEMPERATURE_KEY] = 300.0
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
    assert set(domain) == {"pairs", "density", "field_max", "cutoff", SAMPLED_TEMPERATURE_KEY}
    assert domain[SAMPLED_TEMPERATURE_KEY] == 300.0
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
    assert len(err) == 1 and "lies outside what the model was trained on" in err[0] and "Bohr" in err[0]
    assert not (tmp_path / "t.xyz").exists()
    argv[-1] = "warn"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "polmodel md: outside the training domain: " in err and (tmp_path / "t.xyz").exists()


def test_md_far_hotter_than_the_sampled_frames_is_named_only_where_the_domain_records_a_temperature(trained):
    path, frames = trained
    domain = load(path).members[0].training_options["domain"]
    notes = outside_domain(frames[0], domain, temperature_K=3000.0)
    assert len(notes) == 1 and "MD at 3000 K" in notes[0] and "(300 K)" in notes[0], notes
    assert outside_domain(frames[0], domain, temperature_K=300.0) == []
    assert outside_domain(frames[0], domain, temperature_K=TEMPERATURE_FACTOR * 300.0) == []
    assert training_domain(frames[3:], cutoff=3.5)[SAMPLED_TEMPERATURE_KEY] is None   # never guessed
    # a model file saved before domains had a temperature loads, and says nothing about the temperature
    old_model = load(path)
    for member in old_model.members:
        member.training_options["domain"] = {key: value for key, value in domain.items()
                                             if key != SAMPLED_TEMPERATURE_KEY}
    save(old_model, path.parent / "old.pt")
    calculator = PolCalculator(str(path.parent / "old.pt"))
    assert calculator.check_domain(frames[0], 0.0, temperature_K=3000.0) == []


def test_md_at_3000_k_with_a_300_k_model_warns_before_the_first_step_or_refuses(trained, tmp_path, capsys,
                                                                               monkeypatch):
    import polmodel.dynamics.md as md

    path, frames = trained
    frames[0].write(tmp_path / "start.xyz")
    output = tmp_path / "t.xyz"
    argv = ["md", "--model", str(path), "--structure", str(tmp_path / "start.xyz"), "--output", str(output),
            "--steps", "1", "--quiet", "--temperature", "3000", "--outside-domain", "refuse"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MD at 3000 K" in err[0] and "(300 K)" in err[0], err
    assert list(tmp_path.iterdir()) == [tmp_path / "start.xyz"]   # no trajectory, no P(t) file
    field = json.dumps({"kind": "static", "vector": [0.0, 0.0, 5 * load(path).members[0].training_options[
        "domain"]["field_max"]]})
    assert main(argv[:-4] + ["--field", field, "--outside-domain", "refuse"]) == 2   # a field 5x the labels
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5x the largest labelled one" in err[0], err
    assert list(tmp_path.iterdir()) == [tmp_path / "start.xyz"]

    said_before_the_first_step = []
    real_run_md = md.run_md

    def run_md_after_reading_stderr(*args, **kwargs):
        said_before_the_first_step.append(capsys.readouterr().err)
        return real_run_md(*args, **kwargs)

    monkeypatch.setattr(md, "run_md", run_md_after_reading_stderr)
    argv[-1] = "warn"
    assert main(argv) == 0 and output.exists()
    lines = said_before_the_first_step[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polmodel md: outside the training domain: MD at 3000 K"), lines
    assert "(300 K)" in lines[0]

    argv[argv.index("--temperature") + 1] = "300"
    assert main(argv + ["--no-restart"]) == 0
    assert "outside the training domain" not in said_before_the_first_step[1] + capsys.readouterr().err


# --- model files saved without their domain: the record beside them -------------------------------------------------
#: shipped model files without a stored domain (trained before models stored one), and their sampled temperature
RECORDED = {"data/quartz/loop3_ensemble.pt": 300.0, "data/allegro_pol/SiO2.pt": 600.0,
            "data/allegro_pol/switching/BaTiO3-2026-12-03.pt": None}
#: shipped model files that store their training domain, and the largest field they were labelled at (V/Å)
STORED = {"data/allegro_pol/BaTiO3.pt": 0.0036, "data/quartz/ensemble.pt": 0.0364}


@pytest.mark.parametrize("model_path, sampled", sorted(RECORDED.items()))
def test_every_shipped_model_knows_its_domain_from_the_record_written_for_that_very_file(model_path, sampled):
    import hashlib
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    record = json.loads((root / f"{model_path}.domain.json").read_text())
    assert record["model"]["sha256"] == hashlib.sha256((root / model_path).read_bytes()).hexdigest()
    assert record["frames"]["sha256"] == hashlib.sha256((root / record["frames"]["file"]).read_bytes()).hexdigest()
    domain = load(root / model_path).members[0].training_options["domain"]
    assert domain == record["domain"] and domain[SAMPLED_TEMPERATURE_KEY] == sampled
    assert domain["field_max"] > 0


@pytest.mark.parametrize("model_path, field", sorted(STORED.items()))
def test_a_shipped_model_that_stores_its_domain_holds_the_field_of_its_labels_and_has_no_record(model_path, field):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert not (root / f"{model_path}.domain.json").exists()
    for member in load(root / model_path).members:
        assert member.training_options["domain"]["field_max"] == pytest.approx(field)


def test_the_shipped_quartz_ensemble_names_a_cell_in_bohr_before_the_first_step(tmp_path, capsys):
    import pathlib

    import ase.io

    root = pathlib.Path(__file__).resolve().parents[1]
    quartz = ase.io.read(root / "data/quartz/alpha_quartz.cif")
    ase.io.write(tmp_path / "bohr.xyz", in_bohr(quartz))
    status = main(["md", "--model", str(root / "data/quartz/ensemble.pt"), "--structure", str(tmp_path / "bohr.xyz"),
                   "--output", str(tmp_path / "out.xyz"), "--steps", "1", "--outside-domain", "refuse", "--quiet"])
    assert status == 2
    assert "Bohr" in capsys.readouterr().err and not (tmp_path / "out.xyz").exists()


def test_polmodel_domain_records_a_file_without_one_and_a_changed_file_drops_its_record(trained, tmp_path, capsys):
    from ase.io import write

    from polmodel.data.domain import StaleDomainRecordWarning

    path, frames = trained
    bare = load(path)
    for member in bare.members:
        member.training_options = {key: value for key, value in member.training_options.items() if key != "domain"}
    model_path, frames_path = tmp_path / "bare.pt", tmp_path / "frames.xyz"
    save(bare, model_path)
    write(frames_path, frames)
    assert "domain" not in load(model_path).members[0].training_options
    assert main(["domain", str(model_path), str(frames_path), "--labelled-field", "0.01"]) == 0
    domain = load(model_path).members[0].training_options["domain"]
    assert domain[SAMPLED_TEMPERATURE_KEY] == 300.0                 # the frames' own, not asked for
    assert domain["field_max"] == pytest.approx(max(np.linalg.norm(f.info["efield"]) for f in frames))
    assert main(["domain", str(path), str(frames_path)]) == 2          # stores its own domain: no record
    assert "stores its training domain already" in capsys.readouterr().err
    save(bare.members[0], model_path)                                  # another file under the same name
    with pytest.warns(StaleDomainRecordWarning, match="another version"):
        assert "domain" not in load(model_path).training_options


def test_a_labelled_field_of_zero_field_frames_enters_the_saved_domain_and_leaves_the_weights_and_resumes_alone():
    from polmodel.training.checkpoints import run_fingerprint

    frames = make_toy_frames(3, seed=2, repeat=(2, 2, 2))
    for frame in frames:
        frame.info.pop("efield", None)        # published frames: response labels, no field of their own
    config = TrainingConfig(cutoff=3.5, epochs=1, seed=0, architecture={"num_features": 4, "lmax": 1}, quiet=True)
    labelled = TrainingConfig(**{**config.as_dict(), "labelled_field": 0.0036})
    plain, _ = train_ensemble(frames, config, size=1)
    marked, _ = train_ensemble(frames, labelled, size=1)
    assert plain.members[0].training_options["domain"]["field_max"] == 0.0
    assert marked.members[0].training_options["domain"]["field_max"] == pytest.approx(0.0036)
    for first, second in zip(plain.members[0].parameters(), marked.members[0].parameters()):
        assert torch.equal(first, second)
    # a training stopped before the option existed resumes with it: it is not in the checkpoint's fingerprint
    assert run_fingerprint(config, frames, [], None) == run_fingerprint(labelled, frames, [], None)
    # a field inside the labelled one is inside the domain; MD at 0.003 V/Å is not refused
    assert outside_domain(frames[0], marked.members[0].training_options["domain"], field_max=0.003) == []
    assert outside_domain(frames[0], plain.members[0].training_options["domain"], field_max=0.003) != []
    with pytest.raises(ValueError, match="labelled_field"):
        TrainingConfig(labelled_field=-1.0)
