"""Chunked (bounded-memory) evaluation equals the one-shot evaluation to float round-off (polmodel/nn/chunked.py)."""
import numpy as np
import pytest
import torch
from ase import Atoms

from mixins_model import distorted_perovskite, make_test_model, model_response, open_molecule
from polmodel.data import keys
from polmodel.data.graphs import species_indices
from polmodel.nn import chunked
from polmodel.nn.chunked import MemoryBudgetError, chunked_response

MODEL = make_test_model()          # 2 layers, 4.5 Å cutoff: halo 9 Å
FIELD = np.array([0.03, -0.02, 0.05])
COMPARED = (keys.ENERGY, keys.ATOMIC_ENERGY, keys.FORCES, keys.STRESS, keys.DIPOLE, keys.POLARIZATION,
            keys.BORN_CHARGES, keys.POLARIZABILITY, keys.DIELECTRIC)


def chunked_numpy(atoms, grid, **flags):
    result = chunked_response(MODEL, atoms.get_positions(), atoms.get_cell()[:], atoms.pbc,
                              species_indices(atoms.get_chemical_symbols(), MODEL.species), FIELD, grid=grid,
                              **flags)
    per_graph = {keys.ENERGY, keys.STRESS, keys.VIRIAL, keys.DIPOLE, keys.POLARIZATION, keys.POLARIZABILITY,
                 keys.DIELECTRIC}
    return {name: (value[0] if name in per_graph else value).numpy() for name, value in result.items()}


def assert_same_response(atoms, grid):
    one_shot = model_response(MODEL, atoms, FIELD, born_charges=True, polarizability=True)
    chunks = chunked_numpy(atoms, grid, born_charges=True, polarizability=True)
    compared = [name for name in COMPARED if name in one_shot]
    assert set(compared) <= set(chunks)
    for name in compared:
        if np.all(np.isnan(one_shot[name])):        # ε∞ of an open cluster
            assert np.all(np.isnan(chunks[name])), name
            continue
        scale = np.abs(one_shot[name]).max()
        assert scale > 0, name
        np.testing.assert_allclose(chunks[name], one_shot[name], rtol=0, atol=1e-10 * scale, err_msg=name)


def triclinic_supercell(repeat, seed=3):
    atoms = distorted_perovskite(seed=seed, displacement=0.05).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    atoms.positions += 0.3   # some atoms outside the cell: wrapping must not matter
    return atoms


def test_periodic_cell_cut_in_every_direction():
    """A 3×3×2 triclinic supercell (~12 × 12 × 8 Å, 90 atoms) in 2×2×2 chunks: every chunk is narrower than its
    9 Å halo, so halos overlap and wrap around the cell."""
    assert_same_response(triclinic_supercell((3, 3, 2)), (2, 2, 2))


def test_cell_smaller_than_twice_the_halo():
    """A 2×2×2 cell (~8 Å, narrower than the 9 Å halo itself): chunks need several periodic images of each atom."""
    atoms = triclinic_supercell((2, 2, 2))
    assert_same_response(atoms, (2, 3, 2))


def test_open_cluster():
    """An open-boundary cluster (a piece of perovskite, no cell) cut into 2×2×2 boxes."""
    piece = triclinic_supercell((3, 3, 3))
    cluster = Atoms(piece.get_chemical_symbols(), positions=piece.get_positions(), pbc=False)
    assert_same_response(cluster, (2, 2, 2))


def test_plan_fits_the_budget_with_the_coarsest_grid():
    """A 135,000-atom BaTiO3 cell (planned only, not evaluated) under 1 GB: the plan's chunks fit, and the grid
    one halving coarser would not; a budget that holds the whole cell is evaluated in one shot."""
    unit = 4.0 * np.eye(3)
    repeat = 30
    rng = np.random.default_rng(0)
    fractional = (np.argwhere(np.ones((repeat,) * 3))[:, None, :] + np.array(
        [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])).reshape(-1, 3) / repeat
    cell = unit * repeat
    positions = fractional @ cell + rng.normal(scale=0.02, size=fractional.shape)
    geometry = chunked.cell_geometry(positions, cell, [True] * 3)
    plan = chunked.plan_chunks(MODEL, geometry, 1.0, torch.float32)
    assert not plan.one_shot and plan.estimated_bytes <= 1e9
    coarser = np.array(plan.grid)
    coarser[np.argmin(geometry.widths / coarser)] //= 2
    assert chunked.estimated_chunk_bytes(MODEL, geometry, coarser, torch.float32) > 1e9
    whole = chunked.estimated_chunk_bytes(MODEL, geometry, None, torch.float32) / 1e9
    assert chunked.plan_chunks(MODEL, geometry, 1.01 * whole, torch.float32).one_shot


def perovskite_geometry(repeat):
    unit = 4.0 * np.eye(3)
    fractional = (np.argwhere(np.ones((repeat,) * 3))[:, None, :] + np.array(
        [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])).reshape(-1, 3) / repeat
    return chunked.cell_geometry(fractional @ (unit * repeat), unit * repeat, [True] * 3)


def test_a_budget_that_makes_the_halos_cost_a_multiple_is_named():
    """2,560-atom BaTiO3, float64 with Born charges (the case that ran 24 CPU minutes against one) at 0.6 GB: the
    plan warns how many times the one-shot work the halos add. 135,000 atoms at 1 GB (chunks 30-60 Å wide, halo
    9 Å) cost under 2x and do not warn."""
    import warnings

    small = perovskite_geometry(8)
    with pytest.warns(chunked.ChunkOverheadWarning, match=r"about \d+x the work of the one-shot call"):
        plan = chunked.plan_chunks(MODEL, small, 0.6, torch.float64, born_charges=True)
    assert chunked.chunk_overhead(MODEL, small, plan.grid, torch.float64, born_charges=True) > 2.0
    large = perovskite_geometry(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunked.ChunkOverheadWarning)
        plan = chunked.plan_chunks(MODEL, large, 1.0, torch.float32)
    assert not plan.one_shot and chunked.chunk_overhead(MODEL, large, plan.grid, torch.float32) <= 2.0


def test_compute_response_with_a_memory_limit(monkeypatch):
    """compute_response(memory_limit_gb=...) evaluates through the chunk plan (here forced to 2×2×2: on a cell this
    small no budget would cut it) and agrees with the one-shot call."""
    from polmodel.data.graphs import atoms_to_graph
    from polmodel.nn.response import compute_response
    atoms = triclinic_supercell((2, 2, 2))
    graph = atoms_to_graph(atoms, MODEL.species, MODEL.cutoff, efield=FIELD, dtype=torch.float64)
    monkeypatch.setattr(chunked, "plan_chunks", lambda *args, **kwargs: chunked.ChunkPlan((2, 2, 2), False, 0.0))
    limited = compute_response(MODEL, graph, memory_limit_gb=1.0)
    one_shot = compute_response(MODEL, graph)
    assert set(limited) == set(one_shot)
    for name in one_shot:
        scale = one_shot[name].abs().max()
        torch.testing.assert_close(limited[name], one_shot[name], rtol=0, atol=1e-10 * float(scale))


def test_chunk_larger_than_its_budget_is_split(caplog):
    """A chunk whose neighbour list exceeds the budget (the plan assumed a lower density) is split in two before
    it is evaluated, and the result stays exact."""
    atoms = triclinic_supercell((2, 2, 2))
    species = species_indices(atoms.get_chemical_symbols(), MODEL.species)
    per_edge = chunked.bytes_per_edge(MODEL, torch.float64)
    whole_chunk = chunked.build_chunk(chunked.cell_geometry(atoms.positions, atoms.cell[:], atoms.pbc),
                                      atoms.positions, MODEL, np.zeros(3), np.ones(3), np.zeros(len(atoms), int), 0)
    limit = 0.9 * whole_chunk.edge_index.shape[1] * per_edge / 1e9
    with caplog.at_level("INFO", logger="polmodel.nn.chunked"):
        split = chunked_response(MODEL, atoms.positions, atoms.cell[:], atoms.pbc, species, FIELD, grid=(1, 1, 1),
                                 memory_limit_gb=limit)
    evaluated = [record for record in caplog.records if "edges" in record.getMessage()]
    assert len(evaluated) >= 2
    one_shot = model_response(MODEL, atoms, FIELD)
    for name in (keys.ENERGY, keys.FORCES, keys.STRESS, keys.DIPOLE):
        np.testing.assert_allclose(split[name].numpy().reshape(one_shot[name].shape), one_shot[name], rtol=0,
                                   atol=1e-10 * np.abs(one_shot[name]).max())


def test_too_small_budget_is_a_clear_error():
    from polmodel.dynamics.calculator import PolCalculator
    atoms = triclinic_supercell((3, 3, 3))
    with pytest.raises(MemoryBudgetError, match="too small"):
        chunked.plan_for_cell(MODEL, atoms.positions, atoms.cell[:], atoms.pbc, 1e-6, dtype=torch.float64,
                              device="cpu")
    atoms.calc = PolCalculator(MODEL, memory_limit_gb=1e-6)
    with pytest.raises(MemoryBudgetError, match="memory_limit_gb=1e-06 is too small"):
        atoms.get_forces()
    with pytest.raises(ValueError, match="memory_limit_gb"):
        PolCalculator(MODEL, memory_limit_gb=-1)


def test_overlapping_atoms_are_refused_on_the_chunked_path_too():
    """A cell evaluated by chunks never builds the whole graph; the calculator still finds the overlapping pair."""
    from polmodel.dynamics.calculator import OverlappingAtomsError, PolCalculator
    atoms = triclinic_supercell((3, 3, 3))
    atoms.positions[1] = atoms.positions[0] + [0.2, 0.0, 0.0]
    one_chunk = chunked.plan_for_cell(MODEL, atoms.positions, atoms.cell[:], atoms.pbc, 1.0, dtype=torch.float64,
                                      device="cpu")
    assert one_chunk.one_shot
    limit = 0.02   # a budget that needs several chunks for this cell
    assert not chunked.plan_for_cell(MODEL, atoms.positions, atoms.cell[:], atoms.pbc, limit, dtype=torch.float64,
                                     device="cpu").one_shot
    atoms.calc = PolCalculator(MODEL, memory_limit_gb=limit)
    with pytest.raises(OverlappingAtomsError, match="0.200 Å apart"):
        atoms.get_forces()
