"""Switching runs: Allegro-pol's protocol as settings, the one-cycle loop analysis on a synthetic P(t) with known
landmarks and an offset centre, and `polmodel switch` killed mid-run and continued equal to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ase import Atoms

from polmodel.analysis.observables import NoSwitchingError
from polmodel.analysis.switching import sampled_like_lammps, statistics_over_runs, switching_cycle
from polmodel.cli import main
from polmodel.dynamics.md import saved_step
from polmodel.dynamics.switching import SwitchingProtocol
from polmodel.nn.model import PolModel
from polmodel.nn.serialization import save


def test_default_protocol_is_allegro_pols():
    protocol = SwitchingProtocol()
    assert protocol.steps == 105_000
    assert protocol.field(0.0)[2] == pytest.approx(0.3636) and protocol.field(9_998.0)[2] == pytest.approx(0.3636)
    assert protocol.field(10_000.0 + 50_000.0)[2] == pytest.approx(0.0, abs=1e-12)
    assert protocol.field(10_000.0 + 100_000.0)[2] == pytest.approx(-0.3636)
    assert (protocol.sample_window_fs, protocol.sample_every_fs) == (1000.0, 2000.0)
    with pytest.raises(ValueError, match="whole number"):
        SwitchingProtocol(period_fs=1001.0, hold_fs=0.0)


def synthetic_run(coercive=0.11, bias=0.01, saturation=0.033, centre=0.02, slope=0.06, noise=0.0005, seed=0):
    """P(t) rows every 10 fs of a 10 ps hold and one 200 ps cycle: a tanh loop (coercive field, imprint `bias`,
    remanent ≈ saturation) plus a linear part, offset by `centre`, with white noise."""
    protocol = SwitchingProtocol()
    times = np.arange(0.0, protocol.hold_fs + protocol.period_fs + 1e-9, 10.0)
    field = np.array([protocol.field(t)[2] for t in times])
    rising = np.gradient(field) > 0
    shift = np.where(rising, coercive, -coercive) + bias
    # before the cycle the polarization sits on the upper branch
    polarization = saturation * np.tanh((field - shift) / 0.01) + slope * field + centre
    polarization += np.random.default_rng(seed).normal(0.0, noise, len(times))
    zeros = np.zeros_like(times)
    return protocol, times, np.stack([zeros, zeros, field], 1), np.stack([zeros, zeros, polarization], 1)


def test_one_cycle_loop_has_the_known_landmarks_about_an_offset_centre():
    protocol, times, fields, polarizations = synthetic_run()
    loop = switching_cycle(times, fields, polarizations, hold_fs=protocol.hold_fs, period_fs=protocol.period_fs,
                           axis=protocol.axis, window_fs=protocol.sample_window_fs, every_fs=protocol.sample_every_fs)
    # P is the mean over the window that ends at the sample, so the crossing lags the field by about half a window
    lag = 2 * np.pi / 200.0 * 0.3636 * 0.5     # V/Å: the field's largest change in half a 1 ps window
    assert loop["coercive_field_rising"] == pytest.approx(0.11 + 0.01, abs=lag + 0.003)
    assert loop["coercive_field_falling"] == pytest.approx(-0.11 + 0.01, abs=lag + 0.003)
    assert loop["field_bias"] == pytest.approx(0.01, abs=0.003)
    assert loop["polarization_centre"] == pytest.approx(0.02, abs=0.001)
    assert loop["polarization_at_max_field"] == pytest.approx(0.033 + 0.06 * 0.3636, abs=0.001)
    expected_remanent = 0.033 * np.tanh(0.11 / 0.01)
    assert loop["remanent_polarization"] == pytest.approx(expected_remanent, abs=0.002)
    assert len(loop["times_fs"]) == 101 and loop["times_fs"][0] == protocol.hold_fs
    over = statistics_over_runs([{"coercive_field_MV_per_cm": value} for value in (11.0, 11.5, 12.0)])
    assert over["coercive_field_MV_per_cm"]["mean"] == pytest.approx(11.5)
    assert over["coercive_field_MV_per_cm"]["error"] == pytest.approx(0.5 / np.sqrt(3))


def test_samples_average_the_window_that_ends_at_each_sample():
    times = np.arange(0.0, 10_000.0 + 1e-9, 10.0)
    values = np.stack([times, -times, times ** 2], 1)
    sample_times, fields, averages = sampled_like_lammps(times, values, values, window_fs=1000.0, every_fs=2000.0)
    np.testing.assert_allclose(sample_times, [2000.0, 4000.0, 6000.0, 8000.0, 10000.0])
    np.testing.assert_allclose(fields[:, 0], sample_times)
    np.testing.assert_allclose(averages[:, 0], sample_times - 495.0)   # rows t-990 ... t


def test_an_unfinished_run_is_not_analysed_as_a_loop():
    protocol, times, fields, polarizations = synthetic_run()
    with pytest.raises(NoSwitchingError, match="continue it"):
        switching_cycle(times[:5000], fields[:5000], polarizations[:5000], hold_fs=protocol.hold_fs,
                        period_fs=protocol.period_fs, axis=protocol.axis, window_fs=1000.0, every_fs=2000.0)


@pytest.fixture
def tiny_model_file(tmp_path):
    torch.manual_seed(0)
    model = PolModel(["Ba", "Ti", "O"], 4.0, num_features=4, lmax=1, num_layers=1)
    model.set_energy_scale(1.0)
    path = tmp_path / "model.pt"
    save(model, path)
    structure = tmp_path / "start.xyz"
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.52), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True).repeat((2, 1, 1))
    atoms.write(structure)
    return path, structure


def switch_command(model, structure, output, coupling):
    return ["switch", "--model", str(model), "--structure", str(structure), "--output", str(output),
            "--temperature", "300", "--coupling", coupling, "--period", "0.4", "--hold", "0.02", "--timestep", "1",
            "--seeds", "3", "--quiet"]


@pytest.mark.parametrize("coupling", ["first-order"])
def test_a_killed_run_continues_exactly(tiny_model_file, tmp_path, coupling):
    """SIGKILL mid-run, then the same command: the P(t) file and the trajectory equal an uninterrupted run's."""
    model, structure = tiny_model_file
    assert main(switch_command(model, structure, tmp_path / "whole", coupling)) == 0
    killed = tmp_path / "killed"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "polmodel.cli", *switch_command(model, structure, killed, coupling)],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "seed-3.xyz.restart.npz"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and saved_step(killed / "seed-3.xyz") >= 250:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = saved_step(killed / "seed-3.xyz")
    assert 250 <= stopped_at < 420
    assert main(switch_command(model, structure, killed, coupling)) == 0
    for name in ("seed-3.xyz", "seed-3.xyz.polarization.csv"):
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    summary = json.loads((killed / "switching.json").read_text())
    assert summary["complete_runs"] + len(summary["not_analysed"]) == 1


def test_other_settings_in_the_same_output_are_refused(tiny_model_file, tmp_path, capsys):
    model, structure = tiny_model_file
    command = switch_command(model, structure, tmp_path / "runs", "network")
    command[command.index("--period") + 1] = "0.04"
    assert main(command) == 0
    command[command.index("--coupling") + 1] = "first-order"
    assert main(command) == 2
    assert "coupling was network and is now first-order" in capsys.readouterr().err
    # runs begun with another model under the same file name (before a retraining) are other runs too
    command[command.index("--coupling") + 1] = "network"
    settings = json.loads((tmp_path / "runs" / "settings.json").read_text())
    (tmp_path / "runs" / "settings.json").write_text(json.dumps({**settings, "model_sha256": "0" * 64}))
    assert main(command) == 2
    assert f"model_sha256 was {'0' * 64}" in capsys.readouterr().err
