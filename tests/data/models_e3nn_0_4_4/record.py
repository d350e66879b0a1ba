"""Write the model files of this folder and their outputs with the e3nn installed (run once, with e3nn 0.4.4).

    python tests/data/models_e3nn_0_4_4/record.py

Each model is small with random weights, non-default buffers (energy scale, reference energies, field scale,
neighbour normalization), and covers one layout whose arithmetic comes from e3nn (Wigner symbols, spherical
harmonics, Linear, FullyConnectedNet, Gate; `gate_field` the TensorProduct of files written before the field
readout). outputs.npz holds the structure, the field and, per model, the response computed when the file was
written; tests/test_serialization.py loads the files with the current e3nn and compares.
"""
from pathlib import Path

import numpy as np
import torch

import e3nn
from polmodel.data import keys
from polmodel.data.graphs import atoms_to_graph
from polmodel.nn.model import PolModel
from polmodel.nn.response import compute_response
from polmodel.nn.serialization import save

HERE = Path(__file__).resolve().parent
SPECIES = ["Ba", "Ti", "O"]
SMALL = dict(num_features=4, radial_hidden=8, readout_hidden=4, num_radial=4)
MODELS = {  # name: (dtype, hyperparameters)
    "default_float64": (torch.float64, {}),
    "default_float32": (torch.float32, {}),
    "rank2_field_everywhere_float64": (torch.float64, dict(lmax=3, feature_lmax=2, field_layers=2)),
    "gate_field_float64": (torch.float64, dict(field_readout=0, field_layers=2)),
}
RESPONSE_KEYS = (keys.ENERGY, keys.FORCES, keys.STRESS, keys.POLARIZATION, keys.BORN_CHARGES, keys.POLARIZABILITY)


def structure():
    """A triclinic 5-atom BaTiO3 cell with displaced atoms: polar, no symmetry."""
    from ase import Atoms
    rng = np.random.default_rng(4)
    cell = np.diag([4.0, 4.1, 3.95]) + rng.uniform(-0.25, 0.25, (3, 3))
    atoms = Atoms("BaTiO3", cell=cell, pbc=True,
                  scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    atoms.positions += rng.normal(scale=0.12, size=(5, 3))
    return atoms


def response(model, atoms, efield):
    """{key: numpy array} of one frame: energy, forces, stress, polarization, Born charges, polarizability."""
    dtype = next(model.parameters()).dtype
    graph = atoms_to_graph(atoms, model.species, model.cutoff, efield=efield, dtype=dtype)
    result = compute_response(model, graph, stress=True, born_charges=True, polarizability=True)
    return {name: result[name].detach().cpu().numpy() for name in RESPONSE_KEYS}


def build(seed, dtype, hyperparameters):
    torch.manual_seed(seed)
    model = PolModel(SPECIES, 4.0, **SMALL, **hyperparameters).to(dtype)
    model.set_energy_scale(2.5)
    model.set_reference_energies({"Ba": -1.5, "Ti": -2.25, "O": -0.75})
    model.set_field_scale(0.3)
    model.set_avg_num_neighbors(21.5)
    return model


def main():
    atoms, efield = structure(), np.array([0.08, -0.05, 0.11])
    arrays = {"e3nn_version": np.array(e3nn.__version__), "numbers": atoms.numbers, "positions": atoms.positions,
              "cell": np.array(atoms.cell), "efield": efield}
    for seed, (name, (dtype, hyperparameters)) in enumerate(MODELS.items()):
        model = build(seed, dtype, hyperparameters)
        save(model, HERE / f"{name}.pt")
        response(model, atoms, efield)  # a fresh model's first double-backward may round differently (MKL)
        for key, value in response(model, atoms, efield).items():
            arrays[f"{name}/{key}"] = value
    np.savez(HERE / "outputs.npz", **arrays)


if __name__ == "__main__":
    main()
