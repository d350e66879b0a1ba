"""Trajectory analysis: P–E loops with a virgin curve, refusals of non-switching loops and of driven or
thermostatted runs, and the `polmodel analyze` bad-input table (one line, exit 2, no traceback)."""
import json

import numpy as np
import pytest
from ase import Atoms

from harmonic_crystal import equipartition_momenta, harmonic_crystal
from polmodel.analysis import observables
from polmodel.cli import main
from polmodel.dynamics.fields import CosineField, StaticField
from polmodel.dynamics.md import MDSettings, read_trajectory, run_md


def synthetic_loop(coercive, saturation=0.3, amplitude=0.05, width=0.004, cycles=3, samples=1200, virgin=True):
    """A tanh loop along (1, 1, 0) under a cosine field; with `virgin`, the first cycle follows another loop
    (coercive field 0.01 V/Å larger, polarization offset), as a first switching from an unpoled state does."""
    time = np.linspace(0.0, cycles, samples * cycles, endpoint=False)
    field_x = amplitude * np.cos(2 * np.pi * time)
    rising = np.gradient(field_x) > 0
    shift = np.where(rising, coercive, -coercive)
    polarization_x = saturation * np.tanh((field_x - shift) / width)
    if virgin:
        first = time < 1.0
        virgin_shift = shift[first] + np.sign(shift[first]) * 0.01
        polarization_x[first] = 0.5 * saturation * np.tanh((field_x[first] - virgin_shift) / width) + 0.05
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    return (np.outer(field_x, axis), np.outer(polarization_x, axis), saturation * np.tanh(coercive / width),
            time * 100.0)  # period 100 fs


@pytest.mark.parametrize("coercive", [0.01, 0.025])
@pytest.mark.parametrize("by_period", [True, False])
def test_hysteresis_discards_the_first_cycle_and_reports_each_branch(coercive, by_period):
    fields, polarizations, remanent, times = synthetic_loop(coercive)
    timing = {"times_fs": times, "period_fs": 100.0} if by_period else {}
    loop = observables.hysteresis_loop(fields, polarizations, **timing)
    assert loop["coercive_field_rising"] == pytest.approx(coercive, abs=2e-4)
    assert loop["coercive_field_falling"] == pytest.approx(-coercive, abs=2e-4)
    assert loop["coercive_field"] == pytest.approx(coercive, abs=2e-4)
    assert loop["remanent_polarization"] == pytest.approx(remanent, rel=1e-2)
    assert loop["discarded_frames"] == 1200
    np.testing.assert_allclose(np.abs(loop["axis"]), [2 ** -0.5, 2 ** -0.5, 0], atol=1e-12)
    # kept with the virgin cycle, the falling coercive field is pulled off
    kept = observables.hysteresis_loop(fields, polarizations, discard_cycles=0)
    assert abs(kept["coercive_field_falling"] + coercive) > 5e-4


def test_hysteresis_takes_the_loop_centre_from_the_data():
    """A loop whose polarization carries an offset (a model's arbitrary reference) has the same coercive fields
    and remanent polarization about its centre; measured from P = 0 the offset would shift both crossings."""
    coercive, offset = 0.01, 0.12
    fields, polarizations, remanent, times = synthetic_loop(coercive, virgin=False)
    axis = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    loop = observables.hysteresis_loop(fields, polarizations + offset * axis, discard_cycles=0)
    assert loop["polarization_centre"] == pytest.approx(offset, abs=1e-6)
    assert loop["coercive_field_rising"] == pytest.approx(coercive, abs=2e-4)
    assert loop["coercive_field_falling"] == pytest.approx(-coercive, abs=2e-4)
    assert loop["field_bias"] == pytest.approx(0.0, abs=2e-4)
    assert loop["remanent_polarization"] == pytest.approx(remanent, rel=1e-2)
    saturated = 0.3 * np.tanh((0.05 - coercive) / 0.004)
    assert loop["polarization_at_max_field"] == pytest.approx(saturated, rel=1e-3)
    # a loop shifted along the field (an imprint) reports the shift as the bias, not as a coercive field
    shifted = observables.hysteresis_loop(fields, shifted_loop(fields, coercive, 0.004), discard_cycles=0)
    assert shifted["field_bias"] == pytest.approx(0.004, abs=3e-4)
    assert shifted["coercive_field"] == pytest.approx(coercive, abs=3e-4)


def shifted_loop(fields, coercive, bias, saturation=0.3, width=0.004):
    field = fields @ (np.array([1.0, 1.0, 0.0]) / np.sqrt(2))
    shift = np.where(np.gradient(field) > 0, coercive, -coercive) + bias
    return np.outer(saturation * np.tanh((field - shift) / width), np.array([1.0, 1.0, 0.0]) / np.sqrt(2))


def test_hysteresis_refuses_a_loop_that_does_not_switch():
    time = np.linspace(0, 3, 1200, endpoint=False)
    field = np.zeros((1200, 3))
    field[:, 2] = 0.05 * np.cos(2 * np.pi * time)
    with pytest.raises(observables.NoSwitchingError, match="does not switch"):
        observables.hysteresis_loop(field, 2.0 * field)  # a linear dielectric
    lossy = 2.0 * np.roll(field, 5, axis=0)  # a small lag opens a thin ellipse, not a switching loop
    with pytest.raises(observables.NoSwitchingError):
        observables.hysteresis_loop(field, lossy + 0.5)
    with pytest.raises(observables.NoSwitchingError, match="no full field cycle"):
        observables.hysteresis_loop(field[:350], 2.0 * field[:350])


def test_plots_are_written(tmp_path):
    fields, polarizations, _, _ = synthetic_loop(0.01)
    observables.plot_hysteresis(observables.hysteresis_loop(fields, polarizations), tmp_path / "loop.png")
    wavenumber = np.linspace(0, 1000, 50)
    observables.plot_ir_spectrum(wavenumber, np.exp(-((wavenumber - 500) / 30) ** 2), tmp_path / "ir.png",
                              reference=(wavenumber, 0.5 * np.ones(50), "ref"), sticks=([500.0], [1.0]))
    for name in ("loop.png", "ir.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- refusing driven and thermostatted runs ------------------------------------------------------------------
def harmonic_run(path, protocol=StaticField((0, 0, 0)), steps=400, settings=None, drop_settings=False):
    atoms, calculator = harmonic_crystal()
    atoms.set_momenta(equipartition_momenta(atoms, 300.0))
    run_md(atoms, calculator, protocol, MDSettings(steps=steps, timestep_fs=1.0, thermostat="nve", interval=10),
           trajectory_path=path, progress=False)
    if settings is not None or drop_settings:
        frames = read_trajectory(path)
        for key in [key for key in frames[0].info if key.startswith(observables.SETTINGS_PREFIX)]:
            del frames[0].info[key]
        frames[0].info.update(settings or {})
        import ase.io
        ase.io.write(path, frames, format="extxyz")
    return path


LANGEVIN = {"md_thermostat": "langevin", "md_temperature_K": 300.0, "md_timestep_fs": 1.0, "md_interval": 10,
            "md_friction": 0.01, "md_field": json.dumps({"kind": "static", "vector": [0, 0, 0]})}


def test_thermostatted_run_is_refused_for_ir_and_accepted_for_fluctuations(tmp_path, capsys):
    path = harmonic_run(tmp_path / "langevin.xyz", settings=LANGEVIN)
    assert main(["analyze", "ir", str(path), "--output", str(tmp_path / "ir")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "thermostatted (langevin)" in error and "--allow-driven" in error
    assert not (tmp_path / "ir.json").exists()
    # the settings live on the first frame: skipping it as equilibration must not hide the thermostat
    assert main(["analyze", "ir", str(path), "--skip-fs", "50", "--output", str(tmp_path / "ir")]) == 2
    assert "thermostatted (langevin)" in capsys.readouterr().err
    assert main(["analyze", "ir", str(path), "--allow-driven", "--output", str(tmp_path / "ir")]) == 0
    assert any("thermostatted" in note for note in json.loads((tmp_path / "ir.json").read_text())["notes"])
    # the fluctuation formula wants a canonical run, at the thermostat's target temperature
    assert main(["analyze", "dielectric", str(path), "--output", str(tmp_path / "eps")]) == 0
    report = json.loads((tmp_path / "eps.json").read_text())
    assert report["temperature_K"] == 300.0 and "target" in report["temperature_source"]


def test_field_driven_run_is_refused(tmp_path, capsys):
    path = harmonic_run(tmp_path / "driven.xyz", protocol=CosineField(0.02, 100.0, (0, 0, 1)))
    for kind in ("ir", "dielectric"):
        assert main(["analyze", kind, str(path), "--output", str(tmp_path / kind)]) == 2
        assert "field-driven" in capsys.readouterr().err
    conditions = observables.trajectory_conditions(read_trajectory(path))
    with pytest.raises(observables.DrivenTrajectoryError):
        observables.check_equilibrium_run(conditions, allow_thermostat=True)
    with pytest.warns(UserWarning, match="field-driven"):
        observables.check_equilibrium_run(conditions, allow_thermostat=True, allow_driven=True)


def test_unrecorded_settings_give_a_warning(tmp_path):
    frames = read_trajectory(harmonic_run(tmp_path / "old.xyz", drop_settings=True))
    with pytest.warns(UserWarning, match="records no thermostat"):
        assert observables.check_equilibrium_run(observables.trajectory_conditions(frames), allow_thermostat=False)


def test_hysteresis_command_refuses_a_run_that_does_not_switch(tmp_path, capsys):
    path = harmonic_run(tmp_path / "cos.xyz", protocol=CosineField(0.02, 100.0, (0, 0, 1)), steps=400)
    assert main(["analyze", "hysteresis", str(path), "--output", str(tmp_path / "h")]) == 2
    assert "does not switch" in capsys.readouterr().err


# --- bad inputs: one line, exit 2 ---------------------------------------------------------------------------------
def _restarted_with_another_interval(tmp_path):
    path = harmonic_run(tmp_path / "restart.xyz", steps=100)
    frames = read_trajectory(path)
    atoms, calculator = harmonic_crystal()
    atoms.set_positions(frames[-1].positions)
    atoms.set_momenta(frames[-1].get_momenta())
    extra = tmp_path / "more.xyz"
    run_md(atoms, calculator, StaticField((0, 0, 0)), MDSettings(steps=100, timestep_fs=1.0, interval=5),
           trajectory_path=extra, progress=False)
    more = read_trajectory(extra)[1:]
    for frame in more:
        frame.info["time_fs"] += 100.0
        frame.info["step"] += 100
    import ase.io
    ase.io.write(path, more, format="extxyz", append=True)
    return path


def _bad_inputs(tmp_path):
    good = harmonic_run(tmp_path / "good.xyz")
    (tmp_path / "structure.cif").write_text("data_x\n_cell_length_a 4\n")
    (tmp_path / "garbage.xyz").write_text("this is not\nan xyz file at all\n")
    structure = tmp_path / "plain.xyz"
    Atoms("H2", positions=[(0, 0, 0), (0, 0, 1)], cell=np.eye(3) * 5, pbc=True).write(structure)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    out = str(tmp_path / "o")
    return [
        (["ir", str(tmp_path / "missing.xyz")], "does not exist"),
        (["ir", str(tmp_path)], "is not a file"),
        (["ir", str(tmp_path / "structure.cif")], "CIF"),
        (["ir", str(tmp_path / "garbage.xyz")], "not an extended-XYZ"),
        (["dielectric", str(structure)], "not a `polmodel md` trajectory"),
        (["ir", str(good), "--window", "no-such-window"], "--window"),
        (["ir", str(good), "--max-wavenumber", "-5"], "--max-wavenumber"),
        (["ir", str(good), "--skip-fs", "1e6"], "frames after --skip-fs"),
        (["ir", str(good), "--skip-fs", "-1"], "--skip-fs"),
        (["ir", str(_restarted_with_another_interval(tmp_path))], "another interval"),
        (["dielectric", str(good), "--blocks", "1"], "--blocks"),
        (["dielectric", str(good), "--temperature", "0"], "--temperature"),
        (["dielectric", str(good), "--model", str(tmp_path / "nope.pt")], "does not exist"),
        (["dielectric", str(good), "--model", str(tmp_path / "bad.pt")], "cannot load the model"),
        (["hysteresis", str(good), "--discard-cycles", "-1"], "--discard-cycles"),
        (["modes", str(structure)], "needs --model"),
        (["modes", str(tmp_path / "missing.cif"), "--model", str(tmp_path / "bad.pt")], "does not exist"),
        (["ir", str(good), "--output", str(tmp_path / "no" / "such" / "dir" / "x")], "dir does not exist"),
        (["ir", str(good), "--output", "/proc/ir"], "output /proc/ir.png cannot be written"),
    ], out


def test_bad_inputs_answer_with_one_line_and_exit_2(tmp_path, capsys):
    table, out = _bad_inputs(tmp_path)
    capsys.readouterr()
    for arguments, expected in table:
        arguments = ["analyze"] + arguments + ([] if "--output" in arguments else ["--output", out])
        assert main(arguments) == 2, arguments
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("polmodel analyze: "), (arguments, captured.err)
        assert expected in lines[0], (arguments, lines[0])
        assert "Traceback" not in captured.err


def test_dielectric_command_from_a_small_static_field(tmp_path):
    """`analyze dielectric FIELD_RUN --zero-field-trajectory ZERO_RUN`: ε0 along the field of the harmonic toy,
    1 + Σq²/(ε_vac V k) (tests/harmonic_crystal.py)."""
    from polmodel.data.units import EPSILON0_E_PER_V_ANGSTROM

    at_field = harmonic_run(tmp_path / "field.xyz", protocol=StaticField((0, 0, 0.01)), steps=2000)
    at_zero = harmonic_run(tmp_path / "zero.xyz", steps=2000)
    assert main(["analyze", "dielectric", str(at_field), "--zero-field-trajectory", str(at_zero),
                 "--output", str(tmp_path / "eps")]) == 0
    report = json.loads((tmp_path / "eps.json").read_text())
    expected = 1.0 + 2 * 1.5 ** 2 / (EPSILON0_E_PER_V_ANGSTROM * 6.0 ** 3 * 20.0)
    assert report["epsilon_static_along_field"] == pytest.approx(expected, rel=0.02)
    # the zero-field run given as TRAJ is not a field run
    assert main(["analyze", "dielectric", str(at_zero), "--zero-field-trajectory", str(at_zero),
                 "--output", str(tmp_path / "eps")]) == 2


def test_an_ir_spectrum_of_a_short_run_says_its_resolution_is_too_coarse(tmp_path, capsys):
    """50 fs of NVE (its every-step P(t) file): no usable peaks, and the report and stderr say why; 4 ps do not."""
    harmonic_run(tmp_path / "short.xyz", steps=50)
    assert main(["analyze", "ir", str(tmp_path / "short.xyz.polarization.csv"), "--output",
                 str(tmp_path / "short")]) == 0
    err = capsys.readouterr().err
    assert "polmodel analyze: warning: the analysed run is 50 fs long" in err and "too coarse" in err
    notes = json.loads((tmp_path / "short.json").read_text())["notes"]
    assert any("too coarse to tell peaks apart" in note for note in notes)
    harmonic_run(tmp_path / "long.xyz", steps=4000)
    assert main(["analyze", "ir", str(tmp_path / "long.xyz.polarization.csv"), "--output",
                 str(tmp_path / "long")]) == 0
    assert "too coarse" not in capsys.readouterr().err
