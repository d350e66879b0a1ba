"""MD under field: energy conservation, the field acts, time-dependent fields, exact restart, CLI."""
import dataclasses
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.dynamics.calculator import PolCalculator
from polmodel.dynamics.fields import CosineField, StaticField
from polmodel.dynamics.md import MDSettings, checkpoint_path, read_trajectory, run_md
from polmodel.nn.model import PolModel

warnings.filterwarnings("ignore", category=UserWarning)
SPECIES = ["Ba", "Ti", "O"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = PolModel(SPECIES, 4.0, num_features=8, lmax=1, num_layers=1)
    model.set_energy_scale(5.0)
    return model.to(torch.float64)


def batio3(rattle=0.05):
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True)
    atoms.rattle(rattle, seed=3)
    return atoms


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def series(frames, key):
    return np.array([frame.info[key] for frame in frames])


def test_nve_under_static_field_conserves_enthalpy_plus_kinetic_energy(model, tmp_path):
    field = np.array([0.0, 0.02, 0.05])
    runs = {}
    for name, vector, steps in (("field", field, 240), ("zero", np.zeros(3), 40)):
        path = tmp_path / f"{name}.xyz"
        run_md(batio3(), PolCalculator(model), StaticField(vector),
               MDSettings(steps=steps, timestep_fs=0.5, temperature_K=600.0, thermostat="nve", interval=4, seed=7),
               trajectory_path=path, progress=False)
        runs[name] = read_trajectory(path)
    frames = runs["field"]
    assert len(frames) == 61 and series(frames, "step").tolist() == list(range(0, 241, 4))
    np.testing.assert_allclose(series(frames, "time_fs"), np.arange(0, 120.5, 2.0))
    np.testing.assert_allclose(series(frames, "efield"), np.tile(field, (61, 1)))
    kinetic = series(frames, "kinetic_energy")
    total = series(frames, "energy") + kinetic
    assert kinetic.std() > 1e-3, "the atoms must actually move and exchange energy"
    assert total.std() < 2e-3 * kinetic.std()
    assert abs(total[-1] - total[0]) < 5e-3 * kinetic.std()
    # the field is not ignored: same start, same velocities, different dynamics and enthalpy
    zero = runs["zero"]
    np.testing.assert_allclose(zero[0].get_momenta(), frames[0].get_momenta())
    # the recorded energy is the enthalpy: E(ε) - E(0) = -∫ M(sε)·ε ds (Simpson's rule, exact to O(ε⁵))
    calc = PolCalculator(model)
    dipoles = []
    for scale in (0.0, 0.5, 1.0):
        calc.set(efield=scale * field)
        dipoles.append(calc.get_dipole_moment(zero[0].copy()))
    np.testing.assert_allclose(dipoles[0], series(zero, "dipole")[0], atol=1e-6)
    work = -(dipoles[0] + 4 * dipoles[1] + dipoles[2]) @ field / 6.0
    assert series(frames, "energy")[0] - series(zero, "energy")[0] == pytest.approx(work, rel=1e-3, abs=1e-7)
    assert len(zero) == 11
    # (ignoring the field would make both runs identical to the last bit)
    dipole_change = series(frames[:11], "dipole") - series(zero, "dipole")
    assert np.abs(dipole_change[0]).max() > 5e-5  # electronic response α·ε at the same positions
    assert np.abs(dipole_change[-1] - dipole_change[0]).max() > 1e-6  # ... and the ions respond to the field
    assert np.abs(frames[10].positions - zero[-1].positions).max() > 1e-7
    np.testing.assert_allclose(series(frames, "polarization"), series(frames, "dipole") / frames[0].get_volume())


def test_time_dependent_field_is_evaluated_at_the_positions_time(model, tmp_path):
    protocol = CosineField(amplitude=0.05, period_fs=20.0, axis=(0, 0, 1))
    path = tmp_path / "cosine.xyz"
    run_md(batio3(), PolCalculator(model), protocol,
           MDSettings(steps=30, timestep_fs=1.0, temperature_K=300.0, thermostat="nve", interval=3),
           trajectory_path=path, progress=False)
    frames = read_trajectory(path)
    expected = np.array([protocol(time) for time in series(frames, "time_fs")])
    np.testing.assert_allclose(series(frames, "efield"), expected, atol=1e-14)
    # the recorded enthalpy is the one at that field: recompute it from scratch
    calc = PolCalculator(model)
    for frame in frames[1::4]:
        calc.set(efield=frame.info["efield"])
        assert calc.get_potential_energy(frame.copy()) == pytest.approx(frame.info["energy"], abs=1e-6)


@pytest.mark.parametrize("thermostat", ["nve", "langevin", "nose-hoover"])
def test_restart_reproduces_an_uninterrupted_run(model, tmp_path, thermostat):
    protocol = CosineField(amplitude=0.03, period_fs=30.0, axis=(1, 0, 1))
    settings = MDSettings(steps=40, timestep_fs=1.0, temperature_K=500.0, thermostat=thermostat, friction=0.05,
                          interval=5, seed=11)
    straight = run_md(batio3(), PolCalculator(model), protocol, settings, trajectory_path=tmp_path / "a.xyz",
                      progress=False)
    run_md(batio3(), PolCalculator(model), protocol, replace(settings, steps=20), trajectory_path=tmp_path / "b.xyz",
           progress=False)
    assert len(read_trajectory(tmp_path / "b.xyz")) == 5
    resumed = run_md(batio3(), PolCalculator(model), protocol, settings, trajectory_path=tmp_path / "b.xyz",
                     progress=False)
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.get_momenta(), straight.get_momenta())
    assert (tmp_path / "a.xyz").read_text() == (tmp_path / "b.xyz").read_text()
    frames = read_trajectory(tmp_path / "b.xyz")
    assert series(frames, "step").tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    # running again to the same length adds nothing
    run_md(batio3(), PolCalculator(model), protocol, settings, trajectory_path=tmp_path / "b.xyz", progress=False)
    assert len(read_trajectory(tmp_path / "b.xyz")) == 9
    assert checkpoint_path(tmp_path / "b.xyz").exists()


def test_restart_from_trajectory_without_checkpoint_and_overwrite(model, tmp_path):
    path = tmp_path / "t.xyz"
    settings = MDSettings(steps=8, timestep_fs=1.0, temperature_K=300.0, interval=2)
    field = StaticField((0, 0, 0.01))
    run_md(batio3(), PolCalculator(model), field, replace(settings, steps=4), trajectory_path=path, progress=False)
    checkpoint_path(path).unlink()
    run_md(batio3(), PolCalculator(model), field, settings, trajectory_path=path, progress=False)
    assert series(read_trajectory(path), "step").tolist() == [0, 2, 4, 6, 8]
    run_md(batio3(), PolCalculator(model), field, replace(settings, steps=2), trajectory_path=path, restart=False,
           progress=False)
    assert series(read_trajectory(path), "step").tolist() == [0, 2]
    with pytest.raises(ValueError, match="timestep"):
        run_md(batio3(), PolCalculator(model), field, replace(settings, timestep_fs=0.7), trajectory_path=path,
               progress=False)


def test_bad_md_input(model, tmp_path):
    calc = PolCalculator(model)
    with pytest.raises(ValueError, match="ensemble"):
        run_md(batio3(), calc, StaticField((0, 0, 0)), MDSettings(steps=2, timestep_fs=1, born_spread=True),
               trajectory_path=tmp_path / "x.xyz", progress=False)
    with pytest.raises(ValueError, match="npt thermostat needs a periodic cell"):
        cluster = batio3()
        cluster.pbc = False
        run_md(cluster, calc, StaticField((0, 0, 0)), MDSettings(steps=2, timestep_fs=1, thermostat="npt"),
               trajectory_path=tmp_path / "x.xyz", progress=False)
    with pytest.raises(ValueError, match="timestep 20 fs is too long"):
        run_md(batio3(), calc, StaticField((0, 0, 0)), MDSettings(steps=2, timestep_fs=20),
               trajectory_path=tmp_path / "x.xyz", progress=False)
    with pytest.raises(TypeError, match="MDSettings"):
        run_md(batio3(), calc, StaticField((0, 0, 0)), {"steps": 2, "timestep_fs": 1.0},
               trajectory_path=tmp_path / "x.xyz", progress=False)
    assert not (tmp_path / "x.xyz").exists()


@pytest.mark.parametrize("field, value, message", [
    ("steps", -1, "steps must be a non-negative integer, got -1"),
    ("steps", 2.5, "steps must be a non-negative integer, got 2.5"),
    ("steps", True, "steps must be a non-negative integer, got True"),
    ("timestep_fs", 0.0, "timestep_fs must be a positive number of fs"),
    ("timestep_fs", float("nan"), "timestep_fs must be a positive number of fs"),
    ("temperature_K", -10.0, "temperature_K must be a number >= 0 K"),
    ("thermostat", "andersen", "thermostat must be one of nve, langevin"),
    ("friction", 0.0, "friction must be a positive number of 1/fs"),
    ("pressure_GPa", float("inf"), "pressure_GPa must be a finite number of GPa"),
    ("seed", -3, "seed must be a non-negative integer"),
    ("interval", 0, "interval must be a positive integer"),
    ("polarization_interval", "5", "polarization_interval must be a positive integer, got 5"),
    ("checkpoint_interval", 0, "checkpoint_interval must be a positive integer"),
    ("born_spread", 1, "born_spread must be True or False"),
    ("spread_threshold", -0.5, "spread_threshold must be a positive number of eV/Å or None"),
    ("stop_on_spread", "yes", "stop_on_spread must be True or False"),
])
def test_bad_md_settings_are_refused_naming_the_field_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        MDSettings(**{"steps": 2, "timestep_fs": 1.0, field: value})
    with pytest.raises(ValueError, match=f"^{message}"):
        MDSettings.from_dict({"steps": 2, "timestep_fs": 1.0, field: value})


def test_a_thermostat_needs_a_temperature_above_zero():
    assert MDSettings(steps=2, timestep_fs=1.0, temperature_K=0.0).temperature_K == 0.0   # NVE from rest
    with pytest.raises(ValueError, match="^temperature_K must be a positive number of K for the langevin thermostat"):
        MDSettings(steps=2, timestep_fs=1.0, temperature_K=0.0, thermostat="langevin")


def test_md_settings_round_trip_through_a_dict_and_refuse_unknown_or_missing_keys():
    settings = MDSettings(steps=5, timestep_fs=1, temperature_K=400, thermostat="npt", pressure_GPa=2,
                          checkpoint_interval=3, spread_threshold=None)
    assert settings.as_dict() == json.loads(json.dumps(settings.as_dict()))
    assert type(settings.timestep_fs) is float and type(settings.steps) is int   # as given, as plain numbers
    assert MDSettings.from_dict(settings.as_dict()) == settings
    with pytest.raises(ValueError, match=r"unknown MD settings \['temperature', 'timestep'\]"):
        MDSettings.from_dict({"steps": 5, "timestep": 1.0, "temperature": 300.0})
    with pytest.raises(ValueError, match=r"MD settings need \['timestep_fs'\]"):
        MDSettings.from_dict({"steps": 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 10


def test_polmodel_md_and_run_md_with_settings_from_a_dict_make_the_same_trajectory(model, tmp_path):
    """`polmodel md` (which builds its MDSettings from its flags) and run_md with MDSettings.from_dict of the same
    values (as a workflow passes them) make bit-identical trajectories, P(t) files and final states; the first
    frame records the settings under the keys and values that trajectories written before MDSettings hold, so that
    those still continue."""
    import ase.io

    from polmodel.cli import main
    from polmodel.dynamics.fields import field_protocol_from_dict
    from polmodel.nn.serialization import load, save

    save(model, tmp_path / "model.pt")
    batio3().write(tmp_path / "start.xyz")
    field = {"kind": "cosine", "amplitude": 0.03, "period_fs": 20.0, "axis": [0, 0, 1]}
    values = {"steps": 7, "timestep_fs": 1.0, "temperature_K": 350.0, "thermostat": "langevin", "friction": 0.05,
              "interval": 3, "polarization_interval": 2, "seed": 5}
    assert main(["md", "--model", str(tmp_path / "model.pt"), "--structure", str(tmp_path / "start.xyz"),
                 "--output", str(tmp_path / "cli.xyz"), "--steps", "7", "--timestep", "1", "--temperature", "350",
                 "--thermostat", "langevin", "--friction", "0.05", "--interval", "3", "--polarization-interval", "2",
                 "--seed", "5", "--field", json.dumps(field), "--quiet"]) == 0
    run_md(ase.io.read(tmp_path / "start.xyz"), PolCalculator(load(tmp_path / "model.pt")),
           field_protocol_from_dict(field), MDSettings.from_dict(values), trajectory_path=tmp_path / "api.xyz",
           progress=False)
    for suffix in ("", ".polarization.csv"):
        assert (tmp_path / f"cli.xyz{suffix}").read_bytes() == (tmp_path / f"api.xyz{suffix}").read_bytes()
    with np.load(checkpoint_path(tmp_path / "cli.xyz")) as cli, np.load(checkpoint_path(tmp_path / "api.xyz")) as api:
        assert int(cli["step"]) == int(api["step"]) == 7
        for name in ("positions", "momenta", "cell"):
            np.testing.assert_array_equal(cli[name], api[name])
    recorded = {key: value for key, value in read_trajectory(tmp_path / "api.xyz", index=0)[0].info.items()
                if key.startswith("md_")}
    assert recorded == {"md_field": json.dumps(field_protocol_from_dict(field).as_dict(), sort_keys=True),
                        "md_thermostat": "langevin", "md_timestep_fs": 1.0, "md_interval": 3,
                        "md_polarization_interval": 2, "md_temperature_K": 350.0, "md_friction": 0.05}


def test_ensemble_md_records_uncertainty(tmp_path):
    from polmodel.nn.ensemble import PolEnsemble
    ensemble = PolEnsemble([tiny_model(seed) for seed in (1, 2)])
    path = tmp_path / "ens.xyz"
    run_md(batio3(), PolCalculator(ensemble), StaticField((0, 0, 0.02)),
           MDSettings(steps=4, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=2,
                      born_spread=True), trajectory_path=path, progress=False)
    frames = read_trajectory(path)
    for frame in frames:
        forces_std = frame.arrays["forces_std"]
        assert forces_std.shape == (5, 3)
        assert frame.info["max_force_std"] == pytest.approx(np.linalg.norm(forces_std, axis=1).max())
        assert frame.info["max_born_charge_std"] > 0
        alpha_std = PolCalculator(ensemble, efield=frame.info["efield"]).get_property("polarizability_std", frame)
        assert frame.info["polarizability_spread"] == pytest.approx(np.sqrt(np.mean(alpha_std ** 2)) / 5, rel=1e-6)
        assert frame.info["polarizability_spread"] > 0
        assert frame.info["polarization_std"].shape == (3,)
        assert frame.info["energy_std"] > 0


def test_md_and_analyze_command_line(model, tmp_path):
    from polmodel.cli import main
    from polmodel.nn.serialization import save
    model_path, structure, trajectory = tmp_path / "m.pt", tmp_path / "start.xyz", tmp_path / "traj.xyz"
    save(model, model_path)
    batio3().write(structure)
    field = json.dumps({"kind": "cosine", "amplitude": 0.05, "period_fs": 20.0, "axis": [0, 0, 1]})
    main(["md", "--model", str(model_path), "--structure", str(structure), "--output", str(trajectory),
          "--steps", "40", "--timestep", "1", "--temperature", "300", "--thermostat", "langevin",
          "--field", field, "--interval", "1", "--quiet"])
    frames = read_trajectory(trajectory)
    assert len(frames) == 41
    # an untrained model's P does not switch: the loop is refused; the driven run needs --allow-driven
    assert main(["analyze", "hysteresis", str(trajectory), "--output", str(tmp_path / "hysteresis")]) == 2
    for analysis in ("ir", "dielectric"):
        main(["analyze", analysis, str(trajectory), "--output", str(tmp_path / analysis), "--allow-driven"])
        report = json.loads((tmp_path / f"{analysis}.json").read_text())
        assert (tmp_path / f"{analysis}.png").read_bytes()[:4] == b"\x89PNG"
        assert report["frames"] == 41
    assert np.isfinite(report["epsilon_static_isotropic"])
    # the default outputs are named after the input and the analysis: two analyses of the P(t) file leave two
    polarization_file = tmp_path / "traj.xyz.polarization.csv"
    for analysis in ("ir", "dielectric"):
        assert main(["analyze", analysis, str(polarization_file), "--allow-driven"]) == 0
    for analysis in ("ir", "dielectric"):
        report = json.loads((tmp_path / f"traj.xyz.polarization_{analysis}.json").read_text())
        assert report["analysis"] == analysis
        assert (tmp_path / f"traj.xyz.polarization_{analysis}.png").exists()
    assert not (tmp_path / "traj.xyz.json").exists()
    assert main(["md", "--model", str(model_path), "--structure", str(structure), "--output", str(trajectory),
                 "--steps", "2", "--field", '{"kind": "cosine", "amplitude": 0.1, "period_fs": -1, "axis": [0,0,1]}'
                 ]) == 2


@pytest.mark.parametrize("thermostat", ["berendsen", "npt"])
def test_other_thermostats_run_under_field(model, tmp_path, thermostat):
    path = tmp_path / f"{thermostat}.xyz"
    final = run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0.02)),
                   MDSettings(steps=6, timestep_fs=1.0, temperature_K=300.0, thermostat=thermostat, friction=0.02,
                              interval=3), trajectory_path=path, progress=False)
    frames = read_trajectory(path)
    assert series(frames, "step").tolist() == [0, 3, 6]
    assert np.all(np.isfinite(final.positions))
    if thermostat == "npt":
        assert not np.allclose(final.cell, batio3().cell)  # the barostat moved the cell


def _ensemble_run(tmp_path, name, threshold, stop=False, steps=6):
    from polmodel.dynamics.md import ForceSpreadWarning
    from polmodel.nn.ensemble import PolEnsemble
    calculator = PolCalculator(PolEnsemble([tiny_model(seed) for seed in (1, 2)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = MDSettings(steps=steps, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=2,
                              spread_threshold=threshold, stop_on_spread=stop)
        final = run_md(batio3(), calculator, StaticField((0, 0, 0.02)), settings, trajectory_path=tmp_path / name,
                       progress=False)
    spread_warnings = [w for w in caught if issubclass(w.category, ForceSpreadWarning)]
    return final, read_trajectory(tmp_path / name), spread_warnings


def test_force_spread_above_the_threshold_warns_once_and_is_recorded(tmp_path):
    _, frames, caught = _ensemble_run(tmp_path, "calm.xyz", threshold=1e3)
    spreads = series(frames, "max_force_std")
    assert not caught and all("force_spread_exceeded_step" not in frame.info for frame in frames)
    assert frames[0].info["force_spread_threshold"] == 1e3
    # a threshold between the spreads of the frames: first passed after the start
    threshold = 0.5 * (spreads[0] + spreads[1:].max()) if spreads[1:].max() > spreads[0] else spreads[0] / 2
    final, frames, caught = _ensemble_run(tmp_path, "wild.xyz", threshold=threshold)
    assert len(caught) == 1 and "passed the threshold" in str(caught[0].message)
    exceeded = final.info["force_spread_exceeded_step"]
    assert series(frames, "step").tolist() == [0, 2, 4, 6]      # went on to the end
    for frame in frames:
        assert ("force_spread_exceeded_step" in frame.info) == (frame.info["step"] >= exceeded)


def test_stop_on_spread_stops_at_the_first_step_above(tmp_path):
    _, frames, _ = _ensemble_run(tmp_path, "all.xyz", threshold=1e3, steps=5)
    threshold = 0.5 * float(series(frames, "max_force_std").min())   # passed from the start
    final, frames, caught = _ensemble_run(tmp_path, "stopped.xyz", threshold=threshold, stop=True, steps=5)
    assert len(caught) == 1
    assert len(frames) == 1 and frames[0].info["stopped_on_spread"] and final.info["stopped_on_spread"]
    assert frames[0].info["force_spread_exceeded_step"] == 0


@pytest.mark.parametrize("change", [
    {"protocol": CosineField(amplitude=0.02, period_fs=50.0, axis=(0, 0, 1))},
    {"thermostat": "nose-hoover"}, {"timestep_fs": 0.5}, {"temperature_K": 400.0}, {"interval": 3}])
def test_restart_with_other_settings_is_refused(model, tmp_path, change):
    from polmodel.dynamics.md import RestartMismatchError
    path = tmp_path / "t.xyz"
    protocol = StaticField((0, 0, 0.01))
    settings = MDSettings(steps=4, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=2)
    run_md(batio3(), PolCalculator(model), protocol, replace(settings, steps=2), trajectory_path=path, progress=False)
    before = path.read_text()
    name = next(iter(change)).replace("_K", "").replace("_fs", "").replace("protocol", "field")
    changed = {key: value for key, value in change.items() if key != "protocol"}
    with pytest.raises(RestartMismatchError, match=f"{name}[A-Za-z_]* was"):
        run_md(batio3(), PolCalculator(model), change.get("protocol", protocol), replace(settings, **changed),
               trajectory_path=path, progress=False)
    assert path.read_text() == before
    run_md(batio3(), PolCalculator(model), protocol, settings, trajectory_path=path, progress=False)   # goes on
    assert series(read_trajectory(path), "step").tolist() == [0, 2, 4]


def test_md_default_spread_threshold_comes_from_the_model_validation_error(real_train_run, real_md_run):
    """`polmodel md` without --spread-threshold limits the force spread at SPREAD_THRESHOLD_PER_VALIDATION_RMSE
    times the validation force RMSE `polmodel train` measured (metrics.json) and saved with each member; a file
    without one falls back to DEFAULT_SPREAD_THRESHOLD."""
    import json

    from polmodel.dynamics.md import DEFAULT_SPREAD_THRESHOLD, SPREAD_THRESHOLD_PER_VALIDATION_RMSE, spread_threshold_of
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel
    from polmodel.nn.serialization import load

    metrics = json.loads((real_train_run / "metrics.json").read_text())
    rmse = np.mean([member["validation"]["forces"]["rmse"] for member in metrics["members"]])
    expected = SPREAD_THRESHOLD_PER_VALIDATION_RMSE * rmse
    assert abs(expected - DEFAULT_SPREAD_THRESHOLD) > 1e-3  # else the check below could not tell them apart
    threshold, source = spread_threshold_of(load(real_train_run / "model.pt"))
    assert threshold == pytest.approx(expected, rel=1e-12) and "validation" in source
    frames = read_trajectory(real_md_run / "trajectory.xyz")
    assert frames[0].info["force_spread_threshold"] == pytest.approx(expected, rel=1e-9)
    untrained = PolEnsemble([PolModel(["Ba", "O", "Ti"], 4.0, num_features=4, lmax=1, num_layers=1)
                             for _ in range(2)])
    assert spread_threshold_of(untrained)[0] == DEFAULT_SPREAD_THRESHOLD


def test_the_trajectory_ends_at_the_last_step_off_the_frame_grid(model, tmp_path):
    path = tmp_path / "off_grid.xyz"
    settings = MDSettings(steps=15, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=10)
    run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0.02)), settings, trajectory_path=path, progress=False)
    assert series(read_trajectory(path), "step").tolist() == [0, 10, 15]
    run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0.02)), replace(settings, steps=25),
           trajectory_path=path, progress=False)
    assert series(read_trajectory(path), "step").tolist() == [0, 10, 15, 20, 25]


def test_a_second_process_on_the_same_trajectory_is_refused_and_changes_nothing(model, tmp_path):
    import fcntl

    from polmodel.dynamics.md import RunInProgressError

    path = tmp_path / "busy.xyz"
    settings = MDSettings(steps=4, timestep_fs=1.0, temperature_K=300.0, thermostat="langevin", interval=2)
    run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0.02)), settings, trajectory_path=path, progress=False)
    assert not (tmp_path / "busy.xyz.lock").exists()        # released and removed after the run
    before = {name: (tmp_path / name).read_bytes() for name in ("busy.xyz", "busy.xyz.polarization.csv")}
    with open(tmp_path / "busy.xyz.lock", "w") as held:       # as the first process holds it while running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunInProgressError, match="another process is running .*busy.xyz"):
            run_md(batio3(), PolCalculator(model), StaticField((0, 0, 0.02)), replace(settings, steps=8),
                   trajectory_path=path, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
