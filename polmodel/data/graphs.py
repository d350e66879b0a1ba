"""From ase.Atoms to the model's input dictionary (keys in polmodel/data/keys.py), and batching of such dictionaries."""
import numpy as np
import torch

from polmodel.data import keys
from polmodel.data.frames import frame_efield
from polmodel.data.neighbors import neighbor_list

#: A graph dictionary as `atoms_to_graph` and `collate` make it (keys in polmodel/data/keys.py, every value a tensor):
#: what the model and its derivatives (polmodel.nn.response) take, and give back with their outputs added.
Graph = dict[str, torch.Tensor]


class UnknownSpeciesError(ValueError):
    """A structure contains chemical species the model was not built for."""

    def __init__(self, unknown, species):
        self.unknown = sorted(set(unknown))
        self.species = list(species)
        super().__init__(f"unknown species {', '.join(self.unknown)}: the model knows only {', '.join(self.species)}")


def species_indices(symbols, species):
    """Index of every symbol in the model's species list; UnknownSpeciesError names what is missing."""
    lookup = {symbol: index for index, symbol in enumerate(species)}
    unknown = [symbol for symbol in symbols if symbol not in lookup]
    if unknown:
        raise UnknownSpeciesError(unknown, species)
    return np.array([lookup[symbol] for symbol in symbols], dtype=np.int64)


def atoms_to_graph(atoms, species, cutoff, efield=None, dtype=torch.float32):
    """One frame as a graph dictionary with a leading graph dimension of 1 on per-graph entries.

    efield (3,) V/Å; when None, the frame's own `atoms.info["efield"]` is used if present, else zero field.
    Open boundaries (no periodic direction) get a zero cell, so that no quantity can depend on it.
    """
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    if not pbc.any():
        cell = np.zeros((3, 3))
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    index = species_indices(atoms.get_chemical_symbols(), species)
    if efield is None:
        efield = frame_efield(atoms)
    efield = np.asarray(efield, dtype=np.float64).reshape(-1)
    if efield.shape != (3,) or not np.all(np.isfinite(efield)):
        raise ValueError(f"efield must be 3 finite numbers (V/Å), got {efield.tolist()}")
    edge_index, cell_shift = neighbor_list(positions, cell, pbc, cutoff)
    return {
        keys.POSITIONS: torch.tensor(positions, dtype=dtype),
        keys.CELL: torch.tensor(cell, dtype=dtype).unsqueeze(0),
        keys.PBC: torch.tensor(pbc).unsqueeze(0),
        keys.SPECIES_INDEX: torch.from_numpy(index),
        keys.BATCH: torch.zeros(len(atoms), dtype=torch.long),
        keys.EDGE_INDEX: torch.from_numpy(edge_index),
        keys.EDGE_CELL_SHIFT: torch.tensor(cell_shift, dtype=dtype),
        keys.EFIELD: torch.tensor(efield, dtype=dtype).unsqueeze(0),
        keys.NUM_ATOMS: torch.tensor([len(atoms)], dtype=torch.long),
    }


def collate(graphs):
    """Batch graph dictionaries into one.

    Every tensor entry is concatenated along its first dimension (per-atom entries give (N, ...), per-graph
    entries (G, ...)), except EDGE_INDEX, which is concatenated along edges with atom offsets, and BATCH, which
    is renumbered. Extra entries (labels) must be present in all graphs or in none.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("collate needs at least one graph")
    names = set(graphs[0])
    for graph in graphs[1:]:
        if set(graph) != names:
            raise ValueError(f"graphs carry different entries: {sorted(names ^ set(graph))}")
    num_atoms = [int(graph[keys.NUM_ATOMS].sum()) for graph in graphs]
    offsets = np.concatenate([[0], np.cumsum(num_atoms)[:-1]])
    batch = []
    graph_offset = 0
    for graph in graphs:
        batch.append(graph[keys.BATCH] + graph_offset)
        graph_offset += len(graph[keys.NUM_ATOMS])
    out = {keys.BATCH: torch.cat(batch)}
    out[keys.EDGE_INDEX] = torch.cat([graph[keys.EDGE_INDEX] + int(offset) for graph, offset in zip(graphs, offsets)],
                                     dim=1)
    for name in names - {keys.BATCH, keys.EDGE_INDEX}:
        out[name] = torch.cat([graph[name] for graph in graphs], dim=0)
    return out


def average_num_neighbors(graphs):
    """Mean number of edges per atom over graphs (the model's message normalization)."""
    edges = sum(graph[keys.EDGE_INDEX].shape[1] for graph in graphs)
    atoms = sum(int(graph[keys.NUM_ATOMS].sum()) for graph in graphs)
    if atoms == 0:
        raise ValueError("no atoms")
    return edges / atoms
