"""MD output at scale: the P(t) file streamed every step, continued exactly on restart, read by the analyses;
memory that does not grow with the run length; --memory-limit-gb reaching the calculator."""
import gc
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

from polmodel.dynamics.calculator import PolCalculator
from polmodel.dynamics.fields import CosineField, StaticField
from polmodel.dynamics.md import MDSettings, read_trajectory, run_md
from polmodel.dynamics.polarization_log import polarization_frames, polarization_log_path, read_polarization_log
from test_md import batio3, series, tiny_model

PROTOCOL = CosineField(amplitude=0.03, period_fs=30.0, axis=(1, 0, 1))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _run(model, path, steps, restart=True, **options):
    settings = MDSettings(steps=steps, timestep_fs=1.0, temperature_K=400.0, thermostat="langevin", friction=0.05,
                          interval=5, seed=4, **options)
    return run_md(batio3(), PolCalculator(model), PROTOCOL, settings, trajectory_path=path, restart=restart,
                  progress=False)


def _vectors(columns, name):
    return np.stack([columns[f"{name}_{axis}"] for axis in "xyz"], axis=1)


def test_polarization_file_has_every_step_and_agrees_with_the_trajectory(model, tmp_path):
    path = tmp_path / "t.xyz"
    _run(model, path, 12)
    header, columns = read_polarization_log(polarization_log_path(path))
    assert columns["step"].tolist() == list(range(13))
    np.testing.assert_array_equal(columns["time_fs"], np.arange(13) * 1.0)
    np.testing.assert_array_equal(_vectors(columns, "efield"), [PROTOCOL(t) for t in range(13)])
    frames = read_trajectory(path)
    assert series(frames, "step").tolist() == [0, 5, 10, 12]     # the last step ends the trajectory
    on_grid = (columns["step"] % 5 == 0) | (columns["step"] == 12)
    for name in ("dipole", "polarization", "efield"):
        np.testing.assert_allclose(_vectors(columns, name)[on_grid], series(frames, name), rtol=1e-9, atol=1e-12)
    for name in ("energy", "kinetic_energy", "temperature"):
        np.testing.assert_allclose(columns[name][on_grid], series(frames, name), rtol=1e-9)
    np.testing.assert_allclose(_vectors(columns, "polarization"), _vectors(columns, "dipole") / 64.0, rtol=1e-12)
    assert header["formula"] == "BaO3Ti" and header["settings"]["md_thermostat"] == "langevin"
    # the rows between frames are real steps, not copies
    assert np.all(np.abs(np.diff(_vectors(columns, "dipole"), axis=0)).max(axis=1) > 0)

    _run(model, tmp_path / "sparse.xyz", 12, polarization_interval=3, restart=False)
    _, sparse = read_polarization_log(polarization_log_path(tmp_path / "sparse.xyz"))
    assert sparse["step"].tolist() == [0, 3, 6, 9, 12]
    np.testing.assert_array_equal(_vectors(sparse, "dipole"), _vectors(columns, "dipole")[::3])


def test_restart_continues_the_polarization_file_without_duplicates(model, tmp_path, monkeypatch):
    straight = tmp_path / "straight.xyz"
    _run(model, straight, 40)
    # an interrupted run: its last checkpoint and frame are at step 20, its P(t) file went on to step 23 and
    # ends in a torn line; the restart recomputes 21-23 and must not write them twice
    resumed = tmp_path / "resumed.xyz"
    from polmodel.dynamics.polarization_log import PolarizationLog
    write = PolarizationLog.write

    def killed_at_step_24(self, step, *args):
        if step == 24:
            raise KeyboardInterrupt
        return write(self, step, *args)

    monkeypatch.setattr(PolarizationLog, "write", killed_at_step_24)
    with pytest.raises(KeyboardInterrupt):
        _run(model, resumed, 40)
    monkeypatch.undo()
    log = polarization_log_path(resumed)
    with open(log, "a") as handle:
        handle.write("24,24.0,0.01")
    assert series(read_trajectory(resumed), "step").tolist()[-1] == 20
    _run(model, resumed, 40)
    assert log.read_text() == polarization_log_path(straight).read_text()
    assert resumed.read_text() == straight.read_text()
    # running again to the same length changes nothing
    _run(model, resumed, 40)
    assert log.read_text() == polarization_log_path(straight).read_text()
    # a restart with another P(t) interval would make a non-uniform series: refused like other settings
    from polmodel.dynamics.md import RestartMismatchError
    with pytest.raises(RestartMismatchError, match="polarization_interval"):
        _run(model, resumed, 45, polarization_interval=2)


def test_restart_without_polarization_file_starts_one_and_says_so(model, tmp_path):
    path = tmp_path / "t.xyz"
    _run(model, path, 10)
    polarization_log_path(path).unlink()
    with pytest.warns(UserWarning, match="missing"):
        _run(model, path, 15)
    _, columns = read_polarization_log(polarization_log_path(path))
    assert columns["step"].tolist() == [11, 12, 13, 14, 15]


def memory_growth_per_step(directory, steps=460, early=260, late=450):
    """Bytes per MD step by which the Python-side memory (numpy arrays, lists, dicts; tracemalloc) held at a model
    call grows between call `early` and call `late` of a run of `steps` steps on a tiny cell."""
    model = tiny_model()
    held = np.zeros(2)     # allocated before tracing: recording into it allocates nothing
    calls = [0]
    calculator = PolCalculator(model)
    calculate = calculator.calculate

    def traced_calculate(*args, **kwargs):
        calculate(*args, **kwargs)
        if calls[0] in (early, late):
            gc.collect()   # torch's modules leave reference cycles that the collector frees only now and then
            held[int(calls[0] == late)] = tracemalloc.get_traced_memory()[0]
        calls[0] += 1

    calculator.calculate = traced_calculate
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_md(batio3(), calculator, StaticField((0, 0, 0.01)),
                   MDSettings(steps=steps, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=100),
                   trajectory_path=pathlib.Path(directory) / "m.xyz", progress=False)
    finally:
        tracemalloc.stop()
    assert calls[0] >= late + 1
    return float((held[1] - held[0]) / (late - early))


def test_md_memory_does_not_grow_with_the_number_of_steps(tmp_path):
    """Anything kept per step (a list of frames, dipoles or rows) makes the memory held at each model call grow
    linearly with the steps taken, which this detects (a kept 3-vector per step is ~160 B/step). It found ctypes
    types that vesin's NumPy wrapper leaves behind for every new pair count, ~1.3 KB per step here
    (polmodel/data/neighbors.py). Measured in a fresh interpreter: inside the whole suite, allocations of earlier
    tests that settle during the run added up to 104 B/step of noise; alone, the interpreter's warm-up is ~40."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_md_streaming as t; "
            "print(t.memory_growth_per_step(sys.argv[2]))")
    tests = pathlib.Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", code, str(tests), str(tmp_path)], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    growth_per_step = float(result.stdout.strip().splitlines()[-1])
    assert growth_per_step < 100.0, f"memory grows by {growth_per_step:.0f} B per MD step"


def test_command_line_memory_limit_and_polarization_interval(model, tmp_path, monkeypatch):
    from polmodel.cli import main
    from polmodel.dynamics import calculator as calculator_module
    from polmodel.nn.serialization import save

    model_path, structure, output = tmp_path / "m.pt", tmp_path / "start.xyz", tmp_path / "traj.xyz"
    save(model, model_path)
    batio3().write(structure)
    limits = []
    original_init = calculator_module.PolCalculator.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        limits.append(self.memory_limit_gb)

    monkeypatch.setattr(calculator_module.PolCalculator, "__init__", recording_init)
    base = ["md", "--model", str(model_path), "--structure", str(structure), "--output", str(output),
            "--steps", "6", "--interval", "3", "--quiet"]
    assert main(base + ["--memory-limit-gb", "0.75", "--polarization-interval", "2"]) == 0
    assert limits == [0.75]
    _, columns = read_polarization_log(polarization_log_path(output))
    assert columns["step"].tolist() == [0, 2, 4, 6]
    for bad in (["--memory-limit-gb", "0"], ["--memory-limit-gb", "nan"], ["--polarization-interval", "0"]):
        assert main(base + ["--no-restart"] + bad) == 2


def test_analyses_read_the_polarization_file_like_the_trajectory(model, tmp_path):
    from polmodel.cli import main

    path = tmp_path / "nve.xyz"
    run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0)),
           MDSettings(steps=40, timestep_fs=1.0, temperature_K=300.0, thermostat="nve", interval=1),
           trajectory_path=path, progress=False)
    log = polarization_log_path(path)
    frames = polarization_frames(log)
    assert len(frames) == 41 and frames[0].info["md_thermostat"] == "nve"
    assert frames[0].get_volume() == pytest.approx(64.0, rel=1e-12)
    reports = {}
    gzipped = tmp_path / "shipped.csv.gz"   # how a P(t) file is shipped (data/quartz)
    gzipped.write_bytes(gzip.compress(log.read_bytes()))
    for analysis in ("ir", "dielectric"):
        for source in (path, log, gzipped):
            prefix = tmp_path / f"{analysis}_{source.suffix[1:]}"
            assert main(["analyze", analysis, str(source), "--output", str(prefix)]) == 0
            reports[analysis, source.suffix] = json.loads(prefix.with_suffix(".json").read_text())
    for analysis, key in (("ir", "absorption"), ("dielectric", "epsilon_static")):
        from_trajectory, from_log = reports[analysis, ".xyz"], reports[analysis, ".csv"]
        assert from_log["frames"] == from_trajectory["frames"] == 41
        np.testing.assert_allclose(from_log[key], from_trajectory[key], rtol=1e-6, atol=1e-9)
        assert reports[analysis, ".gz"][key] == from_log[key]
    # ε∞ from the model needs positions, which the P(t) file does not have
    assert main(["analyze", "dielectric", str(log), "--model", str(tmp_path / "absent.pt"),
                 "--output", str(tmp_path / "x")]) == 2
