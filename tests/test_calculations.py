"""TrainCalculation / MdCalculation: prepare_for_submission (command line and files), input validation, and the
parsers on outputs of REAL `polmodel train` / `polmodel md` runs."""
import json

import numpy as np
import pytest
from aiida import orm

from fixtures_al import batio3_atoms

pytestmark = pytest.mark.aiida

COSINE = {"kind": "cosine", "amplitude": 0.02, "period_fs": 50.0, "axis": [0, 0, 1]}


def md_inputs(model, code, **parameters):
    values = {"steps": 100, "timestep": 2.0, "temperature": 300.0, "thermostat": "langevin", "field": COSINE,
              "interval": 10, "born_spread": True, "seed": 5}
    values.update(parameters)
    return {"model": model, "structure": orm.StructureData(ase=batio3_atoms(0.05)), "parameters": orm.Dict(values),
            "code": code}


# --------------------------------------------------------------------------------------------- prepare_for_submission
def test_train_prepare_for_submission(generate_al_calc_job, generate_frames_data, polmodel_code):
    parameters = {"ensemble_size": 3, "seed": 4, "epochs": 20, "bootstrap": True, "validation_fraction": 0.2,
                  "hyperparameters": {"num_layers": 1}, "device": "cuda"}
    frames = generate_frames_data(count=3)
    folder, calcinfo = generate_al_calc_job("polmodel.train", {"frames": frames, "parameters": orm.Dict(parameters),
                                                            "code": polmodel_code})
    (codeinfo,) = calcinfo.codes_info
    assert codeinfo.cmdline_params == [
        "train", "frames.xyz", "--output", "model.pt", "--metrics", "metrics.json", "--plots", "plots", "--quiet",
        "--ensemble", "3", "--bootstrap", "--seed", "4", "--epochs", "20", "--validation-fraction", "0.2",
        "--device", "cuda", "--hyperparameters", "hyperparameters.json",
    ]
    assert sorted(folder.get_content_list()) == ["frames.xyz", "hyperparameters.json"]
    with folder.open("hyperparameters.json") as handle:
        assert json.load(handle) == {"num_layers": 1}
    with folder.open("frames.xyz") as handle:
        assert handle.read() == frames.base.repository.get_object_content("frames.xyz", mode="r")
    assert calcinfo.retrieve_temporary_list == ["model.pt"]
    assert {"metrics.json", "plots"} <= set(calcinfo.retrieve_list)
    # no absolute path anywhere: the same job runs in any scheduler's working directory
    assert not any(str(item).startswith("/") for item in codeinfo.cmdline_params)


def test_train_minimal_command_line(generate_al_calc_job, generate_frames_data, polmodel_code):
    folder, calcinfo = generate_al_calc_job("polmodel.train", {"frames": generate_frames_data(2), "code": polmodel_code})
    assert calcinfo.codes_info[0].cmdline_params == [
        "train", "frames.xyz", "--output", "model.pt", "--metrics", "metrics.json", "--plots", "plots", "--quiet"]


def test_train_warm_start_passes_the_initial_model(generate_al_calc_job, generate_frames_data, generate_fake_model_data,
                                                   polmodel_code):
    model = generate_fake_model_data()
    folder, calcinfo = generate_al_calc_job("polmodel.train", {"frames": generate_frames_data(2), "code": polmodel_code,
                                                            "initial_model": model})
    assert calcinfo.codes_info[0].cmdline_params[-2:] == ["--initial-model", "initial_model.pt"]
    with folder.open("initial_model.pt", "rb") as handle:
        assert handle.read() == model.get_content()


def test_train_warm_start_must_know_the_frames_species(generate_al_calc_job, generate_frames_data,
                                                       generate_fake_model_data, polmodel_code):
    model = generate_fake_model_data(species=("Ti", "O"))
    with pytest.raises(ValueError, match=r"species \['Ba'\] that the initial model"):
        generate_al_calc_job("polmodel.train", {"frames": generate_frames_data(2), "code": polmodel_code,
                                             "initial_model": model})


def test_train_ensemble_workchain_passes_the_initial_model(generate_al_workchain, generate_frames_data,
                                                           generate_fake_model_data, polmodel_code):
    model = generate_fake_model_data()
    inputs = {"frames": generate_frames_data(2), "train": {"code": polmodel_code}, "initial_model": model,
              "ensemble_size": orm.Int(2)}
    process = generate_al_workchain("polmodel.train_ensemble", inputs)
    process.setup()
    assert process.ctx.inputs["initial_model"].uuid == model.uuid
    without = generate_al_workchain("polmodel.train_ensemble",
                                    {key: value for key, value in inputs.items() if key != "initial_model"})
    without.setup()
    assert "initial_model" not in without.ctx.inputs


def test_train_ensemble_workchain_resumes_an_interrupted_training(generate_al_workchain, generate_frames_data,
                                                                   generate_calc_job_node, polmodel_code, tmp_path):
    """An interrupted training (exit 320, its state an output) is run again from that state, not with a new seed."""
    from aiida.common.links import LinkType

    process = generate_al_workchain("polmodel.train_ensemble", {
        "frames": generate_frames_data(2), "train": {"code": polmodel_code}, "ensemble_size": orm.Int(2)})
    process.setup()
    interrupted = generate_calc_job_node("polmodel.train", tmp_path)
    interrupted.set_exit_status(320)
    checkpoint = orm.FolderData()
    checkpoint.base.links.add_incoming(interrupted, link_type=LinkType.CREATE, link_label="checkpoint")
    checkpoint.store()
    seed = process.ctx.parameters["seed"]
    report = process.handle_interrupted_training(interrupted)
    assert report.do_break and process.ctx.inputs["checkpoint"].uuid == checkpoint.uuid
    assert process.ctx.parameters["seed"] == seed


@pytest.mark.parametrize("parameters, message", [
    ({"ensemble_size": 0}, "ensemble_size"),
    ({"epochs": 2.5}, "integer"),
    ({"learning_rat": 0.1}, "unknown parameter"),
    ({"validation_fraction": 1.5}, "validation_fraction"),
    ({"device": "gpu0"}, "cpu, cuda, cuda:N or auto"),
])
def test_train_bad_parameters(generate_al_calc_job, generate_frames_data, polmodel_code, parameters, message):
    with pytest.raises(ValueError, match=message):
        generate_al_calc_job("polmodel.train", {"frames": generate_frames_data(2), "parameters": orm.Dict(parameters),
                                             "code": polmodel_code})


def test_train_refuses_empty_frames(generate_al_calc_job, polmodel_code):
    from polmodel.plugins.data import FramesData

    with pytest.raises(ValueError, match="holds no frames"):
        generate_al_calc_job("polmodel.train", {"frames": FramesData.from_atoms([]).store(), "code": polmodel_code})


def test_md_prepare_for_submission(generate_al_calc_job, generate_fake_model_data, polmodel_code):
    model = generate_fake_model_data()
    folder, calcinfo = generate_al_calc_job("polmodel.md", md_inputs(model, polmodel_code, friction=0.02,
                                                                                device="cuda:1"))
    assert calcinfo.codes_info[0].cmdline_params == [
        "md", "--model", "model.pt", "--structure", "structure.xyz", "--output", "trajectory.xyz", "--steps", "100",
        "--timestep", "2.0", "--temperature", "300.0", "--thermostat", "langevin", "--field", "field.json",
        "--interval", "10", "--quiet", "--born-spread", "--seed", "5", "--friction", "0.02",
        "--device", "cuda:1",
    ]
    assert sorted(folder.get_content_list()) == ["field.json", "model.pt", "structure.xyz"]
    with folder.open("model.pt", "rb") as handle:
        assert handle.read() == model.base.repository.get_object_content("model.pt", mode="rb")
    with folder.open("field.json") as handle:
        assert json.load(handle) == COSINE
    from ase.io import read

    atoms = read(folder.get_abs_path("structure.xyz"))
    assert atoms.get_chemical_formula() == "BaO3Ti" and np.allclose(atoms.cell, np.eye(3) * 4.0)
    assert calcinfo.retrieve_temporary_list == ["trajectory.xyz"]


def test_md_hash_mismatch_is_refused_before_the_run(generate_al_calc_job, generate_fake_model_data, polmodel_code):
    from polmodel.plugins.data import ModelHashError

    model = generate_fake_model_data(store=False)
    model.base.attributes.set("sha256", "0" * 64)  # the recorded hash no longer describes the file
    model.store()
    with pytest.raises(ModelHashError, match="refusing to use it"):
        generate_al_calc_job("polmodel.md", md_inputs(model, polmodel_code))


@pytest.mark.parametrize("parameters, message", [
    ({"field": dict(COSINE, period_fs=-10.0)}, "period"),
    ({"field": {"kind": "sawtooth"}}, "unknown field protocol kind"),
    ({"steps": -1}, "steps"),
    ({"thermostat": "andersen"}, "thermostat"),
    ({"temperature": -5.0}, r"temperature_K .*\(parameter `temperature`\)"),
    # a thermostat needs a target above 0 K: refused here, not when the job has started
    ({"temperature": 0.0}, r"positive number of K for the langevin thermostat, got 0.0 \(parameter `temperature`\)"),
    ({"timestep": 0.0}, r"timestep_fs .*\(parameter `timestep`\)"),
    ({"friction": -0.1}, r"friction .*\(parameter `friction`\)"),
    ({"interval": 0}, r"interval .*\(parameter `interval`\)"),
    ({"device": "tpu"}, "device"),
])
def test_md_bad_parameters_fail_at_submission(generate_al_calc_job, generate_fake_model_data, polmodel_code,
                                              parameters, message):
    with pytest.raises(ValueError, match=message):
        generate_al_calc_job("polmodel.md", md_inputs(generate_fake_model_data(), polmodel_code, **parameters))


def test_md_unknown_species_fails_at_submission(generate_al_calc_job, generate_fake_model_data, polmodel_code):
    model = generate_fake_model_data(species=("Ba", "O"))
    with pytest.raises(ValueError, match=r"species \['Ti'\]"):
        generate_al_calc_job("polmodel.md", md_inputs(model, polmodel_code))


# --------------------------------------------------------------------------------------------- parsers, real outputs
def run_parser(entry_point, node, temporary_folder):
    from aiida.plugins import ParserFactory

    return ParserFactory(entry_point).parse_from_node(node, store_provenance=False,
                                                      retrieved_temporary_folder=str(temporary_folder))


@pytest.mark.slow
def test_train_parser_on_real_output(real_train_run, generate_calc_job_node, tmp_path):
    import shutil

    node = generate_calc_job_node("polmodel.train", real_train_run, names={"metrics.json", "plots"})
    shutil.copy(real_train_run / "model.pt", tmp_path / "model.pt")
    results, calcfunction = run_parser("polmodel.train", node, tmp_path)
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    model = results["model"]
    assert model.kind == "ensemble" and model.ensemble_size == 2
    assert model.species == ["Ba", "Ti", "O"] or sorted(model.species) == ["Ba", "O", "Ti"]
    assert model.verify() == model.sha256
    metrics = results["metrics"].get_dict()
    assert metrics == json.loads((real_train_run / "metrics.json").read_text())
    assert model.metrics  # validation errors copied onto the model
    plots = results["plots"].base.repository.list_object_names()
    assert plots and all(name.endswith(".png") for name in plots)


@pytest.mark.slow
def test_md_parser_on_real_output(real_md_run, generate_calc_job_node, tmp_path):
    import shutil

    node = generate_calc_job_node("polmodel.md", real_md_run, names=set())
    shutil.copy(real_md_run / "trajectory.xyz", tmp_path / "trajectory.xyz")
    results, calcfunction = run_parser("polmodel.md", node, tmp_path)
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    trajectory = results["trajectory"]
    assert trajectory.numsteps == 4  # steps 0, 2, 4, 6
    names = set(trajectory.get_arraynames())
    assert {"polarization", "efield", "energy", "max_force_std", "polarization_std", "max_born_charge_std",
            "polarizability_spread", "forces"} <= names
    assert trajectory.get_array("polarization").shape == (4, 3)
    efield = trajectory.get_array("efield")
    times = trajectory.get_array("times")
    assert np.allclose(efield[:, 2], 0.05 * np.cos(2 * np.pi * times / 10.0), atol=1e-6)
    assert np.all(trajectory.get_array("max_force_std") >= 0)


def test_md_parser_missing_and_corrupt_output(generate_calc_job_node, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    node = generate_calc_job_node("polmodel.md", empty)
    _, calcfunction = run_parser("polmodel.md", node, empty)
    assert calcfunction.exit_status == 300
    (empty / "trajectory.xyz").write_text("5\nthis is not extxyz\nBa 0 0\n")
    _, calcfunction = run_parser("polmodel.md", node, empty)
    assert calcfunction.exit_status == 310


def test_train_parser_missing_and_corrupt_output(generate_calc_job_node, tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    node = generate_calc_job_node("polmodel.train", directory)
    _, calcfunction = run_parser("polmodel.train", node, directory)
    assert calcfunction.exit_status == 300
    (directory / "model.pt").write_bytes(b"garbage")
    (directory / "metrics.json").write_text("{not json")
    node = generate_calc_job_node("polmodel.train", directory, names={"metrics.json"})
    _, calcfunction = run_parser("polmodel.train", node, directory)
    assert calcfunction.exit_status == 310
    (directory / "metrics.json").write_text("{}")
    node = generate_calc_job_node("polmodel.train", directory, names={"metrics.json"})
    _, calcfunction = run_parser("polmodel.train", node, directory)
    assert calcfunction.exit_status == 311


def test_train_resumes_from_a_checkpoint_input(generate_al_calc_job, generate_frames_data, polmodel_code):
    import io

    checkpoint = orm.FolderData()
    for member in (0, 1):
        checkpoint.base.repository.put_object_from_filelike(io.BytesIO(b"state %d" % member),
                                                            f"checkpoint.member{member}.pt")
    folder, calcinfo = generate_al_calc_job("polmodel.train", {
        "frames": generate_frames_data(count=3), "checkpoint": checkpoint, "code": polmodel_code,
        "parameters": orm.Dict({"ensemble_size": 2})})
    (codeinfo,) = calcinfo.codes_info
    assert codeinfo.cmdline_params[-2:] == ["--checkpoint", "checkpoint.pt"]
    with folder.open("checkpoint.member1.pt", "rb") as handle:
        assert handle.read() == b"state 1"
    assert "checkpoint*.pt" in calcinfo.retrieve_temporary_list


def test_train_parser_keeps_the_state_of_an_interrupted_training(generate_calc_job_node, tmp_path):
    """A killed training wrote no model but its checkpoints: exit 320 with the state as the `checkpoint` output
    (TrainEnsembleWorkChain.handle_interrupted_training resumes from it); without checkpoints it stays 300."""
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "checkpoint.member0.pt").write_bytes(b"state 0")
    node = generate_calc_job_node("polmodel.train", directory, names=set())
    results, calcfunction = run_parser("polmodel.train", node, directory)
    assert calcfunction.exit_status == 320
    assert results["checkpoint"].base.repository.list_object_names() == ["checkpoint.member0.pt"]
    (directory / "checkpoint.member0.pt").unlink()
    _, calcfunction = run_parser("polmodel.train", node, directory)
    assert calcfunction.exit_status == 300
