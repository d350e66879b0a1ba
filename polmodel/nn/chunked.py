"""Bounded-memory evaluation: the response of a large cell as a sum over spatial chunks with halos, exact.

Why it is exact. The energy is a sum of atomic energies, E = Σ_i e_i, and PolModel's e_i depends only on the
species and positions of the atoms within L·rc of atom i (L message-passing layers of cutoff rc): the features
h_j^(m) after layer m depend on the atoms within m·rc of j. Split the atoms of the cell into chunks (boxes in
fractional coordinates; every atom belongs to exactly one chunk, its "own" atoms). For one chunk take every
periodic image of every atom inside the box widened by L·rc on each side (the halo), as an open-boundary
cluster with Cartesian image positions. In that cluster, by induction over layers, the features h_j^(m) of every
image within (L - m)·rc of the box are those of the infinite crystal (all their neighbours are there, with exact
features of the layer before), so each own atom's e_i equals the one-shot e_i, and E_c = Σ_{i own} e_i summed
over chunks is E. Edges whose receiver lies farther than (L - 1)·rc from the box only feed features that no own
atom uses; they are dropped, which changes nothing but saves most of the halo's cost.

Every derivative is then a sum over chunks of derivatives of E_c:
  - forces: ∂E_c/∂(image position) is scattered back onto the image's atom (E_c depends on halo atoms too, so
    these contributions are what makes the forces exact; no second halo is needed);
  - virial: an image of atom i sits at r_i + n·h, and a strain moves it to (r_i + n·h)(1 + s), so straining the
    cluster's Cartesian positions is straining the crystal: virial = Σ_c -∂E_c/∂s;
  - ΩP = Σ_c -∂E_c/∂ε, α = Σ_c ∂(ΩP_c)/∂ε, Z*[i] = Σ_c ∂(ΩP_c)/∂R_i (scattered like the forces).
So one-shot and chunked answers differ only in the order of floating-point sums (tests/test_chunked.py checks
E, F, stress, ΩP, Z*, α to 1e-10 relative in float64, with chunks that cut periodic cells in every direction,
a cell narrower than twice the halo, and an open cluster). The per-chunk derivatives are those of
polmodel/nn/response.py (compute_response), run on the chunk's cluster with the energy restricted to own atoms.

Memory. A chunk's peak memory is dominated by its edge tensors: `BYTES_PER_EDGE` (measured: benchmarks/README.md
"Memory per edge") times its edges, and the number of chunks is the smallest grid whose largest chunk fits the
budget. A chunk is checked again once its neighbour list is known and split in two if it is larger than planned. A
budget too small for a chunk of atomic size is a `MemoryBudgetError` before any work.
"""
import logging
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from polmodel.data import keys
from polmodel.data.neighbors import open_boundary_pairs

# Peak bytes per edge of one model call, float32, default-sized model (num_features 32, lmax 2, radial_hidden 64):
# the largest measured, that of the chunks of a 10⁶-atom cell, so that a plan does not underestimate a chunk
# (benchmarks/README.md "Memory per edge").
BYTES_PER_EDGE = {"first_order": 10.5e3, "born_charges": 31.5e3, "polarizability": 24.0e3}
_log = logging.getLogger(__name__)
# the default budget: this fraction of the memory available (when the calculator is made)
DEFAULT_BUDGET_FRACTION = 0.5
# a little beyond the exact halo, so that pairs at the cutoff's float rounding are never lost
_HALO_MARGIN = 1e-6  # Å
# a chunk narrower than this (Å) is not made: the halo would be all of its cost
_MIN_CHUNK_WIDTH = 0.5


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold even the smallest chunk (its atom's halo)."""


class CellGeometry(NamedTuple):
    """Atoms in the coordinates chunks are cut in: fractional (periodic) or a box around the cluster (open)."""
    fractional: np.ndarray      # (N, 3) in [0, 1)
    lattice: np.ndarray         # (3, 3) rows: the periodic cell, or the box's diagonal for an open cluster
    origin: np.ndarray          # (3,) Cartesian position of fractional zero
    periodic: bool
    widths: np.ndarray          # (3,) Å, distance between opposite faces of the lattice


def cell_geometry(positions, cell, pbc):
    """Fractional coordinates of every atom (wrapped into [0, 1) for periodic cells)."""
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if pbc.any() and not pbc.all():
        raise ValueError(f"chunked evaluation supports fully periodic or fully open cells, got pbc={pbc.tolist()}")
    if pbc.all():
        lattice = np.asarray(cell, dtype=np.float64)
        inverse = np.linalg.inv(lattice)
        fractional = positions @ inverse
        fractional -= np.floor(fractional)
        fractional[fractional >= 1.0] = 0.0   # -1e-17 wraps to 1.0 in floating point
        origin = np.zeros(3)
        widths = 1.0 / np.linalg.norm(inverse, axis=0)
    else:
        origin = positions.min(axis=0) if len(positions) else np.zeros(3)
        extent = np.maximum(positions.max(axis=0) - origin, 1.0) if len(positions) else np.ones(3)
        lattice = np.diag(extent * (1.0 + 1e-9))           # every atom strictly below fractional 1
        fractional = (positions - origin) / np.diag(lattice)
        widths = np.diag(lattice).copy()
    return CellGeometry(fractional, lattice, origin, bool(pbc.all()), widths)


def halo_width(model):
    """L·rc (Å): the reach of one atom's energy."""
    return model.architecture["num_layers"] * float(model.cutoff) + _HALO_MARGIN


def bytes_per_edge(model, dtype, born_charges=False, polarizability=False):
    """Estimated peak bytes per edge of one call (float32 default model measured; scaled by width and dtype)."""
    kind = "born_charges" if born_charges else "polarizability" if polarizability else "first_order"
    width = model.architecture["num_features"] * model.architecture["feature_lmax"] / 32.0
    radial = model.architecture["radial_hidden"] / 64.0
    scale = max(width, radial, 0.25)   # small test models are still charged a quarter of the default
    return BYTES_PER_EDGE[kind] * scale * torch.tensor([], dtype=dtype).element_size() / 4.0


def available_memory_bytes(device):
    """Free memory of the device (GPU) or available system memory (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        import psutil
        return float(psutil.virtual_memory().available)
    except ImportError:   # psutil is optional: Linux reports the same figure in /proc/meminfo
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
        raise RuntimeError("cannot tell the available memory (no psutil, no /proc/meminfo): give memory_limit_gb")


def default_memory_limit_gb(device="cpu"):
    """The budget used when none is given: DEFAULT_BUDGET_FRACTION of what the device has available now."""
    return DEFAULT_BUDGET_FRACTION * available_memory_bytes(device) / 1e9


class ChunkPlan(NamedTuple):
    grid: tuple                 # chunks along each lattice vector; (1, 1, 1) with one_shot means no halo at all
    one_shot: bool
    estimated_bytes: float      # of the largest chunk (or the one-shot call)


def _neighbors_per_atom(geometry, num_atoms, cutoff):
    volume = abs(np.linalg.det(geometry.lattice))
    if not geometry.periodic:   # the cluster's box may be flat: at least a cutoff thick in every direction
        volume = np.prod(np.maximum(geometry.widths, cutoff))
    return num_atoms / volume * 4.0 / 3.0 * math.pi * cutoff ** 3


def _chunk_edges(geometry, num_atoms, cutoff, reach, grid):
    """Estimated edges of one chunk: neighbours × images within `reach` of the chunk's box (uniform density)."""
    grid = np.asarray(grid, dtype=np.float64)
    fraction = np.prod(1.0 / grid + 2.0 * reach / geometry.widths)
    if not geometry.periodic:
        fraction = np.prod(np.minimum(1.0 / grid + 2.0 * reach / geometry.widths, 1.0))
    return num_atoms * fraction * _neighbors_per_atom(geometry, num_atoms, cutoff)


def estimated_chunk_bytes(model, geometry, grid, dtype, born_charges=False, polarizability=False):
    """Estimated peak bytes of one chunk of `grid` (uniform density), or of the one-shot call for grid None."""
    num_atoms = len(geometry.fractional)
    cutoff = float(model.cutoff)
    per_edge = bytes_per_edge(model, dtype, born_charges, polarizability)
    if grid is None:
        return num_atoms * _neighbors_per_atom(geometry, num_atoms, cutoff) * per_edge
    receivers_reach = (model.architecture["num_layers"] - 1) * cutoff + _HALO_MARGIN
    return _chunk_edges(geometry, num_atoms, cutoff, receivers_reach, grid) * per_edge


class ChunkOverheadWarning(UserWarning):
    """The memory budget allows only chunks whose halos cost a multiple of the one-shot call."""


#: above this estimated cost of all chunks over the one-shot call, planning warns (ChunkOverheadWarning)
MAX_CHUNK_OVERHEAD = 2.0


def chunk_overhead(model, geometry, grid, dtype, born_charges=False, polarizability=False):
    """Estimated edges of all chunks of `grid` over those of the one-shot call: the work the halos add."""
    chunks = float(np.prod(grid))
    one_shot = estimated_chunk_bytes(model, geometry, None, dtype, born_charges, polarizability)
    return chunks * estimated_chunk_bytes(model, geometry, grid, dtype, born_charges, polarizability) / one_shot


def plan_chunks(model, geometry, memory_limit_gb, dtype, born_charges=False, polarizability=False):
    """The coarsest chunk grid whose chunks fit `memory_limit_gb`; one shot when the whole cell fits.

    The widest chunk direction is halved until a chunk fits, so a grid is a power of two along each axis. When the
    chunks that fit are so narrow that their halos make the call cost more than MAX_CHUNK_OVERHEAD times the
    one-shot call (benchmarks/README.md "Chunk overhead"), a ChunkOverheadWarning says how much, and which budget
    avoids it."""
    cutoff = float(model.cutoff)
    budget = float(memory_limit_gb) * 1e9
    one_shot = estimated_chunk_bytes(model, geometry, None, dtype, born_charges, polarizability)
    if one_shot <= budget:
        return ChunkPlan((1, 1, 1), True, one_shot)
    grid = np.ones(3, dtype=np.int64)
    while True:
        estimate = estimated_chunk_bytes(model, geometry, grid, dtype, born_charges, polarizability)
        if estimate <= budget:
            overhead = chunk_overhead(model, geometry, grid, dtype, born_charges, polarizability)
            if overhead > MAX_CHUNK_OVERHEAD:
                warnings.warn(
                    f"memory_limit_gb={memory_limit_gb:g} allows only chunks {float(np.min(geometry.widths / grid)):.3g}"
                    f" Å wide, against a halo of {halo_width(model):.3g} Å: the call will do about {overhead:.0f}x "
                    f"the work of the one-shot call (which needs about {one_shot / 1e9:.3g} GB)",
                    ChunkOverheadWarning, stacklevel=3)
            return ChunkPlan(tuple(int(n) for n in grid), False, estimate)
        chunk_widths = geometry.widths / grid
        axis = int(np.argmax(chunk_widths))
        if chunk_widths[axis] / 2.0 < _MIN_CHUNK_WIDTH:
            raise MemoryBudgetError(
                f"memory_limit_gb={memory_limit_gb:g} is too small: even a chunk {_MIN_CHUNK_WIDTH} Å wide needs "
                f"about {estimate / 1e9:.3g} GB with its halo of {halo_width(model):.3g} Å "
                f"({model.architecture['num_layers']} layers × {cutoff:g} Å cutoff); give at least that")
        grid[axis] *= 2


def _image_ranges(fractional, low, high):
    """Per atom and axis, the integer shifts n with low <= f + n < high: (first (N, 3), count (N, 3))."""
    first = np.ceil(low - fractional).astype(np.int64)
    end = np.ceil(high - fractional).astype(np.int64)
    return first, np.maximum(end - first, 0)


def _images_in_box(geometry, low, high):
    """Every image (atom index, integer shift (3,)) whose fractional position lies in [low, high)."""
    if geometry.periodic:
        first, count = _image_ranges(geometry.fractional, low, high)
    else:
        inside = np.all((geometry.fractional >= low) & (geometry.fractional < high), axis=1)
        first = np.zeros_like(geometry.fractional, dtype=np.int64)
        count = np.repeat(inside[:, None].astype(np.int64), 3, axis=1)
    per_atom = count.prod(axis=1)
    atoms = np.repeat(np.arange(len(per_atom)), per_atom)
    # the k-th image of an atom enumerates its (n0, n1, n2) ranges in C order
    start = np.repeat(np.cumsum(per_atom) - per_atom, per_atom)
    rank = np.arange(len(atoms)) - start
    c = count[atoms]
    shifts = np.empty((len(atoms), 3), dtype=np.int64)
    shifts[:, 2] = rank % c[:, 2]
    shifts[:, 1] = (rank // c[:, 2]) % c[:, 1]
    shifts[:, 0] = rank // (c[:, 2] * c[:, 1])
    return atoms, shifts + first[atoms]


class Chunk(NamedTuple):
    atoms: np.ndarray           # (M,) index into the cell's atoms of each image
    positions: np.ndarray       # (M, 3) Cartesian image positions
    own: np.ndarray             # (M,) bool: images whose atomic energy this chunk sums
    edge_index: np.ndarray      # (2, E) over images, receivers within (L - 1)·rc of the box


def build_chunk(geometry, positions, model, low, high, owner_of_atom, chunk_index):
    """The open-boundary cluster of one chunk (see the module docstring)."""
    cutoff = float(model.cutoff)
    halo = halo_width(model) / geometry.widths
    atoms, shifts = _images_in_box(geometry, low - halo, high + halo)
    # Cartesian image positions from the caller's positions, so that edge vectors round as in one shot
    wrap = np.floor(np.asarray(positions, dtype=np.float64) @ np.linalg.inv(geometry.lattice)
                    - geometry.fractional + 0.5) if geometry.periodic else np.zeros((len(positions), 3))
    image_positions = positions[atoms] + (shifts - wrap[atoms]) @ geometry.lattice if geometry.periodic \
        else positions[atoms].copy()
    own = np.all(shifts == 0, axis=1) & (owner_of_atom[atoms] == chunk_index)
    receivers_reach = ((model.architecture["num_layers"] - 1) * cutoff + _HALO_MARGIN) / geometry.widths
    image_fractional = geometry.fractional[atoms] + shifts
    receives = np.all((image_fractional >= low - receivers_reach) & (image_fractional < high + receivers_reach),
                      axis=1)
    return Chunk(atoms, image_positions, own, open_boundary_pairs(image_positions, cutoff, receives))


class _OwnAtomsEnergy(torch.nn.Module):
    """The model with its energy summed over a chunk's own atoms only (the other atoms are halo)."""

    def __init__(self, model, own):
        super().__init__()
        self.model = model
        self.own = own
        if hasattr(model, "energy_from_edges"):
            self.energy_from_edges = self._energy_from_edges

    def _restrict(self, out):
        atomic = torch.where(self.own, out[keys.ATOMIC_ENERGY], torch.zeros_like(out[keys.ATOMIC_ENERGY]))
        out = dict(out)
        out[keys.ENERGY] = atomic.sum().reshape(1)
        return out

    def forward(self, data):
        return self._restrict(self.model(data))

    def _energy_from_edges(self, data, harmonics, weights):
        return self._restrict(self.model.energy_from_edges(data, harmonics, weights))

    # polmodel/nn/edge_inputs.py reads these of the energy model
    def edge_vectors(self, data):
        return self.model.edge_vectors(data)

    def edge_harmonics(self, vectors):
        return self.model.edge_harmonics(vectors)

    @property
    def radial_basis(self):
        return self.model.radial_basis

    @property
    def layers(self):
        return self.model.layers


def _chunk_boxes(grid):
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                yield np.array([i, j, k])


def plan_for_cell(model, positions, cell, pbc, memory_limit_gb=None, *, dtype, device, born_charges=False,
                  polarizability=False):
    """`plan_chunks` for one cell; memory_limit_gb None means `default_memory_limit_gb(device)`.

    An energy model whose reach is unknown (not a PolModel: no num_layers) is always evaluated in one shot."""
    if "num_layers" not in getattr(model, "architecture", {}):
        return ChunkPlan((1, 1, 1), True, float("nan"))
    if memory_limit_gb is None:
        memory_limit_gb = default_memory_limit_gb(device)
    geometry = cell_geometry(positions, cell, pbc)
    return plan_chunks(model, geometry, memory_limit_gb, dtype, born_charges, polarizability)


def chunked_response(model, positions, cell, pbc, species_index, efield, *, grid, memory_limit_gb=None,
                     stress=True, born_charges=False, polarizability=False, dtype=None, device=None):
    """compute_response of one cell, evaluated chunk by chunk (`grid`: chunks along each lattice vector, e.g.
    `plan_for_cell(...).grid`).

    positions (N, 3) Å, cell (3, 3) (zeros for open boundaries), pbc (3,), species_index (N,) indices into
    model.species, efield (3,) V/Å. With `memory_limit_gb` (GB = 1e9 bytes), a chunk whose neighbour list turns
    out larger than the budget (a denser region than the plan's average) is split in two before it is
    evaluated. Returns compute_response's dict for a single graph.
    """
    # response imports this module: the allowed cycle (docs/design.md "Rooms and imports")
    from polmodel.nn.response import compute_response, response_from_derivatives

    parameter = next(model.parameters())
    dtype = dtype or parameter.dtype
    device = torch.device(device) if device is not None else parameter.device
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    geometry = cell_geometry(positions, cell, pbc)
    limit = memory_limit_gb
    grid = np.asarray(grid, dtype=np.int64)
    if grid.shape != (3,) or np.any(grid < 1):
        raise ValueError(f"grid must be three positive chunk counts, got {grid.tolist()}")

    periodic = geometry.periodic
    cell_tensor = torch.tensor(np.asarray(cell, dtype=np.float64) if periodic else np.zeros((3, 3)),
                               dtype=dtype, device=device).unsqueeze(0)
    pbc_tensor = torch.tensor([bool(periodic)] * 3, device=device).unsqueeze(0)
    efield_tensor = torch.tensor(np.asarray(efield, dtype=np.float64).reshape(1, 3), dtype=dtype, device=device)
    species_index = np.asarray(species_index, dtype=np.int64)
    owner_axes = np.minimum(np.floor(geometry.fractional * grid).astype(np.int64), grid - 1)
    owner = np.ravel_multi_index(owner_axes.T, tuple(grid)) if len(positions) else np.zeros(0, dtype=np.int64)
    per_edge = bytes_per_edge(model, dtype, born_charges, polarizability)

    num_atoms = len(positions)
    totals = {}
    atomic_energy = torch.zeros(num_atoms, dtype=dtype, device=device)
    flags = dict(stress=stress and periodic, born_charges=born_charges, polarizability=polarizability)
    pending = [(box / grid, (box + 1) / grid, int(np.ravel_multi_index(box, tuple(grid))))
               for box in _chunk_boxes(grid)]
    while pending:
        low, high, chunk_index = pending.pop()
        chunk = build_chunk(geometry, positions, model, low, high, owner, chunk_index)
        if not chunk.own.any():
            continue
        if limit is not None and chunk.edge_index.shape[1] * per_edge > limit * 1e9:
            widths = (high - low) * geometry.widths
            axis = int(np.argmax(widths))
            if widths[axis] / 2.0 >= _MIN_CHUNK_WIDTH:   # larger than planned (a dense region): split it
                middle = low.copy()
                middle[axis] = 0.5 * (low[axis] + high[axis])
                upper_low, lower_high = middle.copy(), high.copy()
                lower_high[axis] = middle[axis]
                owner = _split_owner(owner, geometry, chunk_index, axis, middle[axis], new_index=owner.max() + 1)
                pending.append((low, lower_high, chunk_index))
                pending.append((upper_low, high, int(owner.max())))
                continue
            _log.warning("a chunk %.2g Å wide needs ~%.3g GB, more than memory_limit_gb=%g; evaluating it anyway",
                         widths[axis], chunk.edge_index.shape[1] * per_edge / 1e9, limit)
        data = {
            keys.POSITIONS: torch.tensor(chunk.positions, dtype=dtype, device=device),
            keys.CELL: cell_tensor,
            keys.PBC: pbc_tensor,
            keys.SPECIES_INDEX: torch.from_numpy(species_index[chunk.atoms]).to(device),
            keys.BATCH: torch.zeros(len(chunk.atoms), dtype=torch.long, device=device),
            keys.EDGE_INDEX: torch.from_numpy(chunk.edge_index).to(device),
            keys.EDGE_CELL_SHIFT: torch.zeros(chunk.edge_index.shape[1], 3, dtype=dtype, device=device),
            keys.EFIELD: efield_tensor,
            keys.NUM_ATOMS: torch.tensor([len(chunk.atoms)], device=device),
        }
        own = torch.from_numpy(chunk.own).to(device)
        _log.info("chunk of %d own atoms, %d images, %d edges (%d chunks left)", int(chunk.own.sum()),
                  len(chunk.atoms), chunk.edge_index.shape[1], len(pending))
        response = compute_response(_OwnAtomsEnergy(model, own), data, **flags)
        image_atoms = torch.from_numpy(chunk.atoms).to(device)
        atomic_energy[image_atoms[own]] = response[keys.ATOMIC_ENERGY][own]
        for name, value in response.items():
            if name in (keys.FORCES, keys.BORN_CHARGES):
                total = totals.setdefault(name, value.new_zeros((num_atoms,) + value.shape[1:]))
                total.index_add_(0, image_atoms, value)
            elif name in (keys.ENERGY, keys.DIPOLE, keys.VIRIAL, keys.POLARIZABILITY):
                totals[name] = totals[name] + value if name in totals else value
        del response, data
    for name, shape in ((keys.ENERGY, (1,)), (keys.DIPOLE, (1, 3)), (keys.FORCES, (num_atoms, 3))):
        totals.setdefault(name, torch.zeros(shape, dtype=dtype, device=device))
    totals[keys.ATOMIC_ENERGY] = atomic_energy
    summary = {keys.CELL: cell_tensor, keys.PBC: pbc_tensor}
    return response_from_derivatives(totals, summary, compute_stress=flags["stress"], born_charges=born_charges,
                                     polarizability=polarizability, training=False)


def _split_owner(owner, geometry, chunk_index, axis, boundary, new_index):
    """Atoms of chunk `chunk_index` at or above `boundary` along `axis` move to chunk `new_index`."""
    owner = owner.copy()
    moved = (owner == chunk_index) & (geometry.fractional[:, axis] >= boundary)
    owner[moved] = new_index
    return owner


def chunked_graph_response(model, data, memory_limit_gb, **flags):
    """compute_response(..., memory_limit_gb=...) of a (batched) graph dictionary: one shot when every graph
    fits the budget, else `chunked_response` per graph, concatenated (per-atom entries along atoms, per-graph
    entries along graphs)."""
    from polmodel.nn.response import compute_response  # response imports this module: the allowed cycle

    batch = data[keys.BATCH]
    dtype, device = data[keys.POSITIONS].dtype, data[keys.POSITIONS].device
    cells = []
    for graph in range(data[keys.CELL].shape[0]):
        atoms = batch == graph
        positions = data[keys.POSITIONS][atoms].detach().cpu().double().numpy()
        cell = data[keys.CELL][graph].detach().cpu().double().numpy()
        pbc = data[keys.PBC][graph].cpu().numpy()
        plan = plan_for_cell(model, positions, cell, pbc, memory_limit_gb, dtype=dtype, device=device,
                             born_charges=flags.get("born_charges", False),
                             polarizability=flags.get("polarizability", False))
        cells.append((atoms, positions, cell, pbc, plan))
    if all(plan.one_shot for *_, plan in cells):
        return compute_response(model, data, **flags)
    responses = [chunked_response(model, positions, cell, pbc, data[keys.SPECIES_INDEX][atoms].cpu().numpy(),
                                  data[keys.EFIELD][graph].detach().cpu().double().numpy(), grid=plan.grid,
                                  memory_limit_gb=memory_limit_gb, dtype=dtype, device=device, **flags)
                 for graph, (atoms, positions, cell, pbc, plan) in enumerate(cells)]
    names = {name for response in responses for name in response}
    merged = {}
    for name in names:
        present = [response[name] for response in responses if name in response]
        # a periodic graph's stress or polarization: NaN rows for the open graphs, as compute_response gives
        merged[name] = torch.cat([response.get(name, torch.full_like(present[0], float("nan")))
                                  for response in responses])
    return merged
