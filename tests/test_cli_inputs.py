"""Bad inputs to every `polmodel` command: exit status 2, one line on stderr naming the problem, no traceback,
and no work done before the check (issue 17).

The table runs each command in-process through `polmodel.cli.main` (an uncaught exception fails the test, so
"no traceback" is checked too); `test_as_a_process` runs a few rows as real processes. `polmodel analyze` has
its own checks and table (tests/test_analysis.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.cli import main
from polmodel.dynamics.md import MDSettings, run_md

SPECIES = ["Ba", "Ti", "O"]


def _batio3():
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True)
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real model file, a structure, a trajectory of a short run, and the broken files of the table."""
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.dynamics.fields import StaticField
    from polmodel.nn.model import PolModel
    from polmodel.nn.serialization import save

    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = PolModel(SPECIES, 4.0, num_features=4, lmax=1, num_layers=1).double()
    save(model, folder / "model.pt")
    raw = (folder / "model.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (folder / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3)}, folder / "not_a_model.pt")
    _batio3().write(folder / "start.xyz")
    strontium = _batio3()
    strontium[0].symbol = "Sr"
    strontium.write(folder / "strontium.xyz")
    overlapping = _batio3()
    overlapping.positions[2] = overlapping.positions[1] + [0.01, 0.0, 0.0]
    overlapping.write(folder / "overlapping.xyz")
    not_a_number = _batio3()
    not_a_number.positions[3, 1] = np.nan
    not_a_number.write(folder / "nan.xyz")
    (folder / "zero_cell.xyz").write_text("1\nLattice=\"0 0 0 0 0 0 0 0 0\" Properties=species:S:1:pos:R:3 "
                                          "pbc=\"T T T\"\nBa 0 0 0\n")
    (folder / "partial.cif").write_text(
        "data_partial\n_cell_length_a 4.0\n_cell_length_b 4.0\n_cell_length_c 4.0\n_cell_angle_alpha 90\n"
        "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
        "_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
        "_atom_site_occupancy\nBa1 Ba 0 0 0 0.5\nTi1 Ti 0.5 0.5 0.5 1\nO1 O 0.5 0.5 0 1\nO2 O 0.5 0 0.5 1\n"
        "O3 O 0 0.5 0.5 1\n")
    cluster = _batio3()
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    cluster.write(folder / "cluster.xyz")
    (folder / "garbage.xyz").write_text("this is\nnot a structure\n")
    (folder / "binary.xyz").write_bytes(bytes(range(256)))
    (folder / "empty.xyz").write_text("")
    (folder / "a_folder").mkdir()
    (folder / "a_file").write_text("x")
    run_md(_batio3(), PolCalculator(model), StaticField((0, 0, 0.01)),
           MDSettings(steps=2, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=1),
           trajectory_path=folder / "done.xyz", progress=False)
    return folder


def _md(files, **changes):
    options = {"--model": files / "model.pt", "--structure": files / "start.xyz", "--output": files / "new.xyz",
               "--steps": 2, **changes}
    argv = ["md", "--quiet"]
    for flag, value in options.items():
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _train(files, *extra, frames="frames.xyz", output="t.pt"):
    return ["train", str(files / frames), "--output", str(files / output), "--quiet", *extra]


# the settings of the fixture's done.xyz, so that a restart row changes one setting only
_DONE = {"--field": '{"kind": "static", "vector": [0, 0, 0.01]}', "--interval": 1, "--temperature": 300}
# (row id, argv builder, text the one-line message must contain)
MD_TABLE = [
    ("missing model", lambda f: _md(f, **{"--model": f / "missing.pt"}), "--model .*missing.pt does not exist"),
    ("model is a folder", lambda f: _md(f, **{"--model": f / "a_folder"}), "is not a file"),
    ("corrupt model", lambda f: _md(f, **{"--model": f / "garbage.pt"}), "not a readable polmodel file"),
    ("truncated model", lambda f: _md(f, **{"--model": f / "truncated.pt"}), "not a readable polmodel file"),
    ("torch file, not a model", lambda f: _md(f, **{"--model": f / "not_a_model.pt"}), "not a polmodel model file"),
    ("structure given as model", lambda f: _md(f, **{"--model": f / "start.xyz"}), "not a readable polmodel file"),
    ("missing structure", lambda f: _md(f, **{"--structure": f / "missing.xyz"}), "--structure .* does not exist"),
    ("empty structure", lambda f: _md(f, **{"--structure": f / "empty.xyz"}), "is empty"),
    ("corrupt structure", lambda f: _md(f, **{"--structure": f / "garbage.xyz"}), "not a structure file ASE can"),
    ("binary structure", lambda f: _md(f, **{"--structure": f / "binary.xyz"}), "not a structure file ASE can"),
    ("model given as structure", lambda f: _md(f, **{"--structure": f / "model.pt"}), "not a structure file"),
    ("unknown species", lambda f: _md(f, **{"--structure": f / "strontium.xyz"}), "has Sr, which the model"),
    ("overlapping atoms", lambda f: _md(f, **{"--structure": f / "overlapping.xyz"}), "0.010 Å apart"),
    ("NaN positions", lambda f: _md(f, **{"--structure": f / "nan.xyz"}), "nan.xyz has NaN or infinite positions"),
    ("all-zero cell", lambda f: _md(f, **{"--structure": f / "zero_cell.xyz"}), "periodic but its cell has no volume"),
    ("timestep too long for O", lambda f: _md(f, **{"--timestep": 100}),
     "timestep 100 fs is too long for the lightest atom .16 amu.*at most 5 fs"),
    ("negative seed", lambda f: _md(f, **{"--seed": -1}), "seed must be a non-negative integer, got -1"),
    ("partly occupied CIF site", lambda f: _md(f, **{"--structure": f / "partial.cif"}),
     "has partly occupied sites \\(Ba\\)"),
    ("npt without a cell", lambda f: _md(f, **{"--structure": f / "cluster.xyz", "--thermostat": "npt"}),
     "--thermostat npt needs a periodic cell"),
    ("memory budget below one chunk", lambda f: _md(f, **{"--memory-limit-gb": 0.000001}), "--memory-limit-gb: "),
    ("negative steps", lambda f: _md(f, **{"--steps": -5}), "steps must be a non-negative integer, got -5"),
    ("steps not a number", lambda f: _md(f, **{"--steps": "abc"}), "argument --steps: invalid int value"),
    ("negative timestep", lambda f: _md(f, **{"--timestep": -1}), "timestep_fs must be a positive number of fs"),
    ("NaN timestep", lambda f: _md(f, **{"--timestep": "nan"}), "timestep_fs must be a positive number of fs"),
    ("zero interval", lambda f: _md(f, **{"--interval": 0}), "interval must be a positive integer"),
    ("negative temperature", lambda f: _md(f, **{"--temperature": -10}),
     "temperature_K must be a positive number of K for the langevin thermostat, got -10"),
    ("zero friction", lambda f: _md(f, **{"--friction": 0}), "friction must be a positive number of 1/fs, got 0"),
    ("infinite pressure", lambda f: _md(f, **{"--pressure": "inf"}), "pressure_GPa must be a finite number of GPa"),
    ("unknown thermostat", lambda f: _md(f, **{"--thermostat": "andersen"}), "invalid choice: 'andersen'"),
    ("field not JSON", lambda f: _md(f, **{"--field": "{oops"}), "bad --field: field protocol is not valid JSON"),
    ("field key typo", lambda f: _md(f, **{"--field": '{"kind": "static", "vectr": [0, 0, 0.1]}'}),
     "unknown key.*'vectr' .did you mean 'vector'"),
    ("field too strong", lambda f: _md(f, **{"--field": '{"kind": "static", "vector": [0, 0, 5]}'}), "Zener"),
    ("output folder missing", lambda f: _md(f, **{"--output": "/nonexistent/t.xyz"}), "folder /nonexistent does not"),
    ("output is a folder", lambda f: _md(f, **{"--output": f / "a_folder"}), "is a folder, not a file"),
    ("output where no file can be made", lambda f: _md(f, **{"--output": "/proc/t.xyz"}), "--output /proc/t.xyz"),
    ("unknown device", lambda f: _md(f, **{"--device": "quantum"}), "unknown device 'quantum'"),
    ("negative spread threshold", lambda f: _md(f, **{"--spread-threshold": -1}), "must be a positive number"),
    ("Born spread of one model", lambda f: _md(f, **{"--born-spread": True}), "--born-spread needs an ensemble"),
    ("restart onto a non-trajectory", lambda f: _md(f, **{"--output": f / "garbage.xyz"}),
     "cannot restart from .*garbage.xyz"),
    ("restart with another field", lambda f: _md(f, **{"--output": f / "done.xyz", "--steps": 4,
                                                        "--field": '{"kind": "static", "vector": [0, 0, 0.02]}'}),
     "other settings .field was"),
    ("restart with another thermostat", lambda f: _md(f, **{"--output": f / "done.xyz", "--steps": 4,
                                                             "--thermostat": "nose-hoover", **_DONE}),
     r"other settings \(thermostat was langevin and is now nose-hoover\)"),
    ("restart with another timestep", lambda f: _md(f, **{"--output": f / "done.xyz", "--steps": 4,
                                                           **_DONE, "--timestep": 0.5}),
     r"other settings \(timestep_fs was 1.0 and is now 0.5\)"),
]
TRAIN_TABLE = [
    ("missing frames", lambda f: _train(f, frames="missing.xyz"), "frames file .* does not exist"),
    ("frames is a folder", lambda f: _train(f, frames="a_folder"), "is not a file"),
    ("empty frames", lambda f: _train(f, frames="empty.xyz"), "is empty"),
    ("binary frames", lambda f: _train(f, frames="binary.xyz"), "can't decode|not valid extended XYZ"),
    ("output folder missing", lambda f: _train(f, output="/nonexistent/t.pt"),
     "--output .*t.pt: folder .* does not exist"),
    ("output is a folder", lambda f: _train(f, output="a_folder"), "is a folder, not a file"),
    ("output where no file can be made", lambda f: _train(f, output="/proc/t.pt"), "--output /proc/t.pt"),
    ("metrics folder missing", lambda f: _train(f, "--metrics", "/nonexistent/m.json"), "--metrics"),
    ("plots under a file", lambda f: _train(f, "--plots", str(f / "a_file" / "plots")), "a_file is a file, not a"),
    ("no members", lambda f: _train(f, "--ensemble", "0"), "--ensemble must be >= 1, got 0"),
    ("negative epochs", lambda f: _train(f, "--epochs", "-1"), "--epochs must be >= 0, got -1"),
    ("validation fraction 1.5", lambda f: _train(f, "--validation-fraction", "1.5"), "must be < 1, got 1.5"),
    ("hyperparameters not JSON", lambda f: _train(f, "--hyperparameters", "{oops"), "neither a JSON file"),
    ("hyperparameter typo", lambda f: _train(f, "--hyperparameters", '{"learning_rat": 0.1}'),
     "unknown training options \\['learning_rat'\\]"),
    ("unknown device", lambda f: _train(f, "--device", "quantum"), "unknown device 'quantum'"),
    ("an MD trajectory as labels", lambda f: _train(f, frames="done.xyz"),
     "3 of its 3 frames are records of a `polmodel md` run.*--allow-predictions"),
]
TOP_TABLE = [
    ("no command", lambda f: [], "required: COMMAND"),
    ("unknown command", lambda f: ["fly"], "invalid choice: 'fly'"),
    ("md without its required options", lambda f: ["md"], "the following arguments are required: --model"),
    ("provenance: not a pk", lambda f: ["provenance", "pw-runs", "12;drop"], "neither a node pk"),
    ("provenance: negative pk", lambda f: ["provenance", "learning-curve", "-5"], "neither a node pk"),
    ("provenance: unknown profile", lambda f: ["provenance", "--profile", "no-such-profile", "pw-runs", "12"],
     "no AiiDA profile no-such-profile"),
    ("provenance: no such node", lambda f: ["provenance", "pw-runs", "987654"], "987654"),
    ("evaluate on an MD trajectory", lambda f: ["evaluate", str(f / "model.pt"), str(f / "done.xyz")],
     "frames file .*done.xyz: 3 of its 3 frames are records of a `polmodel md` run"),
    ("evaluate: metrics where no file can be made", lambda f: ["evaluate", str(f / "model.pt"), str(f / "done.xyz"),
                                                                "--metrics", "/proc/m.json"], "--metrics /proc/m.json"),
    ("provenance graph into a missing folder", lambda f: ["provenance", "graph", "1", "--output",
                                                          "/nonexistent/loop.svg"], "folder /nonexistent does not"),
]


def _run_main(argv, capsys):
    try:
        status = main([str(word) for word in argv])
    except SystemExit as exit_:   # argparse's usage errors
        status = exit_.code
    return status, capsys.readouterr()


def _assert_one_line_error(status, captured, expected):
    lines = captured.err.strip().splitlines()
    assert status == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("polmodel"), lines
    assert "Traceback" not in captured.err
    import re
    assert re.search(expected, lines[0]), lines[0]


@pytest.mark.parametrize("row", MD_TABLE, ids=[row[0] for row in MD_TABLE])
def test_md_refuses_bad_input(row, files, capsys, monkeypatch):
    _, argv, expected = row
    before = (files / "done.xyz").read_text()
    ran = []
    monkeypatch.setattr("polmodel.dynamics.md.run_md",
                        lambda *args, **kwargs: ran.append(True) or pytest.fail("ran MD"))
    if "restart" in row[0]:
        monkeypatch.undo()   # run_md itself refuses a restart, before it touches anything
    status, captured = _run_main(argv(files), capsys)
    _assert_one_line_error(status, captured, expected)
    assert not ran and not (files / "new.xyz").exists()
    assert (files / "done.xyz").read_text() == before


@pytest.fixture
def frames_file(files):
    from toy_potential import make_toy_frames

    from polmodel.data.frames import write_frames
    write_frames(files / "frames.xyz", make_toy_frames(1, seed=0))
    return files / "frames.xyz"


@pytest.mark.parametrize("row", TRAIN_TABLE, ids=[row[0] for row in TRAIN_TABLE])
def test_train_refuses_bad_input_before_training(row, files, frames_file, capsys, monkeypatch):
    _, argv, expected = row
    trained = []
    monkeypatch.setattr("polmodel.training.ensembles.train_ensemble", lambda *args, **kwargs: trained.append(True))
    status, captured = _run_main(argv(files), capsys)
    _assert_one_line_error(status, captured, expected)
    assert not trained   # nothing trained before the check (issue 17: 52 s of training lost on --output)
    assert not (files / "t.pt").exists()


@pytest.mark.parametrize("row", TOP_TABLE, ids=[row[0] for row in TOP_TABLE])
def test_other_commands_refuse_bad_input(row, files, capsys):
    _, argv, expected = row
    status, captured = _run_main(argv(files), capsys)
    _assert_one_line_error(status, captured, expected)


def test_a_good_md_run_still_runs(files, capsys):
    from polmodel.dynamics.md import read_trajectory
    assert main(_md(files, **{"--output": files / "good.xyz", "--interval": 1})) == 0
    assert [frame.info["step"] for frame in read_trajectory(files / "good.xyz")] == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_md_on_a_structure_without_a_cell_says_it_runs_an_open_cluster(files, capsys):
    assert main(_md(files, **{"--structure": files / "cluster.xyz", "--output": files / "cluster_run.xyz"})) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"polmodel md: --structure {files / 'cluster.xyz'} has no periodic cell: running it as an open "
                   "cluster (a dipole, no polarization or stress)"]


@pytest.mark.parametrize("argv, expected", [
    (["md", "--model", "missing.pt", "--structure", "s.xyz", "--output", "t.xyz", "--steps", "-5"],
     "polmodel md: steps must be a non-negative integer, got -5"),
    (["train", "frames.xyz", "--output", "/nonexistent/t.pt"],
     "polmodel train: --output /nonexistent/t.pt: folder /nonexistent does not exist"),
    ([], "polmodel: the following arguments are required: COMMAND"),
])
def test_as_a_process(argv, expected, tmp_path):
    (tmp_path / "frames.xyz").write_text("not read: the output is checked first\n")
    script = Path(sys.executable).with_name("polmodel")   # the installed console script
    command = [str(script)] if script.exists() else [sys.executable, "-m", "polmodel.cli"]
    completed = subprocess.run([*command, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith(expected), completed.stderr


def test_help_imports_no_heavy_module():
    """`polmodel --help` and each sub-command's --help import neither torch, ASE nor AiiDA (start-up time)."""
    probe = ("import sys\nfrom polmodel.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'ase', 'aiida', 'e3nn', "
             "'scipy', 'matplotlib'})\nprint(','.join(heavy), file=sys.stderr)")
    for argv in (["--help"], ["train", "--help"], ["md", "--help"], ["analyze", "--help"],
                 ["provenance", "--help"]):
        completed = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert "usage: polmodel" in completed.stdout, completed.stderr
        assert completed.stderr.strip() == "", (argv, completed.stderr)


def test_md_spread_warning_is_one_line_and_stop_on_spread_stops(files, capsys):
    from polmodel.dynamics.md import read_trajectory
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel
    from polmodel.nn.serialization import save

    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(PolModel(SPECIES, 4.0, num_features=4, lmax=1, num_layers=1).double())
    save(PolEnsemble(members), files / "ensemble.pt")
    argv = _md(files, **{"--model": files / "ensemble.pt", "--output": files / "spread.xyz", "--steps": 6,
                         "--interval": 2, "--spread-threshold": 1e-9, "--stop-on-spread": True})
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("polmodel md: ForceSpreadWarning: step 0: the ensemble's force spread")
    assert err[1] == "polmodel md: stopped at step 0: the ensemble's force spread passed --spread-threshold"
    status, captured = _run_main(argv + ["--memory-limit-gb", "1"], capsys)
    _assert_one_line_error(status, captured, "--memory-limit-gb applies to a single model")
    frames = read_trajectory(files / "spread.xyz")
    assert len(frames) == 1 and frames[0].info["stopped_on_spread"] and frames[0].info["force_spread_threshold"] == 1e-9


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_no_file_can_be_made_in_is_refused_and_a_probe_leaves_no_trace(tmp_path):
    """access() tells root that /proc is writable; the check tries to make the file instead."""
    from polmodel.cli import InputError, check_output_file

    with pytest.raises(InputError, match="cannot be written"):
        check_output_file("/proc/polmodel-output.pt", "--output")
    check_output_file(tmp_path / "model.pt", "--output")
    assert not (tmp_path / "model.pt").exists()
    (tmp_path / "kept.pt").write_bytes(b"old")
    check_output_file(tmp_path / "kept.pt", "--output")
    assert (tmp_path / "kept.pt").read_bytes() == b"old"


def test_ctrl_c_in_md_is_one_line_and_the_same_command_continues(files, tmp_path):
    """SIGINT mid-run: exit 130 with one line naming the step to continue from, no traceback; the rerun ends the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from polmodel.dynamics.md import read_trajectory, saved_step

    output = tmp_path / "interrupted.xyz"
    argv = [sys.executable, "-m", "polmodel.cli", *[str(word) for word in
                                                       _md(files, **{"--output": output, "--steps": 100000,
                                                                     "--interval": 20, "--temperature": 30,
                                                                     "--timestep": 0.5})]]
    # a test run from a background job inherits SIGINT ignored, and Python then keeps ignoring it: restore it
    process = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and saved_step(output) < 40:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    step = saved_step(output)
    assert lines[0] == (f"polmodel md: stopped at step {step} (the last saved one) of 100000; rerun the same command "
                        "to continue")
    argv[argv.index("100000")] = str(step + 20)
    assert subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True).returncode == 0
    assert read_trajectory(output, index=-1)[-1].info["step"] == step + 20


@pytest.mark.parametrize("case, expected", [
    ("overlapping.xyz", "0.010 Å apart"), ("strontium.xyz", "has Sr, which the model does not know"),
    ("nan.xyz", "has NaN or infinite positions")])
def test_modes_refuses_structures_md_refuses(files, capsys, case, expected):
    argv = ["analyze", "modes", str(files / case), "--model", str(files / "model.pt"), "--output",
            str(files / "modes")]
    status, captured = _run_main(argv, capsys)
    _assert_one_line_error(status, captured, expected)


def test_a_model_that_cannot_be_saved_after_training_is_kept_elsewhere(files, frames_file, capsys, monkeypatch,
                                                                      tmp_path):
    """The --output folder vanishes during training: the model is saved in the working directory, the line says
    where, the exit status is 1; the save itself is atomic (no truncated file at the target)."""
    import shutil

    from polmodel.nn import serialization

    doomed = tmp_path / "doomed"
    doomed.mkdir()
    monkeypatch.chdir(tmp_path)
    real_train = __import__("polmodel.training.ensembles", fromlist=["train_ensemble"]).train_ensemble

    def train_then_lose_the_folder(*args, **kwargs):
        result = real_train(*args, **kwargs)
        shutil.rmtree(doomed)
        return result

    monkeypatch.setattr("polmodel.training.ensembles.train_ensemble", train_then_lose_the_folder)
    status, captured = _run_main(_train(files, "--epochs", "1", output=str(doomed / "model.pt")), capsys)
    assert status == 1
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith(f"polmodel train: cannot write --output {doomed / 'model.pt'} ")
    kept = Path(line.rsplit(" saved at ", 1)[1])
    assert kept.parent == tmp_path and serialization.load(kept).species
    # a write that fails half-way leaves neither the target nor a partial file
    def write_half_then_fail(payload, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        serialization.save(serialization.load(kept), tmp_path / "atomic.pt")
    assert not list(tmp_path.glob("atomic.pt*"))


def test_threads_default_to_the_cores_not_busy_when_unset(monkeypatch):
    import os

    from polmodel import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cli.default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert cli.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["md", "--help"])
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    with pytest.raises(SystemExit):
        cli.main(["md", "--help"])
    assert os.environ["OMP_NUM_THREADS"] == "5"     # a value the user set stays
