"""The archive check of cached runs (workflows/cached_runs.py, `polmodel provenance check-archive`) and the
calcfunctions that make held-out structures from what they come from (workflows/structures.py).

The cached runs here are calcfunctions (cheap, and cached by AiiDA like CalcJobs); the check reads the archive file
that `create_archive` writes, as it reads a shipped one.
"""
import numpy as np
import pytest
from aiida import orm
from aiida.engine import calcfunction
from aiida.manage.caching import disable_caching, enable_caching
from aiida.tools.archive import create_archive

from polmodel.cli import main as polmodel_main
from polmodel.workflows.cached_runs import (CACHED_FROM_EXTRA, DIFFERENCES_EXTRA, REPRODUCES_EXTRA,
                                            cached_runs_in_archive, restore_cached_marks)
from polmodel.workflows.structures import strained_structure, structure_difference, trajectory_frame


@calcfunction
def scaled(value, factor):
    return orm.Float(value.value * factor.value)


@pytest.fixture
def original_and_copy(aiida_profile_clean):
    """(original, copy): the same calcfunction run twice with caching on; the second is a cache copy of the first."""
    value, factor = orm.Float(2.0).store(), orm.Float(3.0).store()
    with enable_caching():
        _, original = scaled.run_get_node(value, factor)
        _, copy = scaled.run_get_node(value, factor)
    assert copy.base.extras.get(CACHED_FROM_EXTRA) == original.uuid
    return original, copy


def _archive(tmp_path, nodes, name="runs.aiida"):
    path = tmp_path / name
    create_archive(nodes, filename=path)
    return path


def test_check_fails_on_a_cached_copy_without_its_original(original_and_copy, tmp_path):
    original, copy = original_and_copy
    path = _archive(tmp_path, [copy])
    report = cached_runs_in_archive(path)
    assert report.cached == [copy.uuid] and report.missing == [copy.uuid]
    assert not report.whole
    assert polmodel_main(["provenance", "check-archive", str(path)]) == 1


def test_check_passes_with_the_original_in_the_archive(original_and_copy, tmp_path):
    original, copy = original_and_copy
    path = _archive(tmp_path, [copy, original])
    report = cached_runs_in_archive(path)
    assert report.originals_present == [copy.uuid] and report.whole
    assert polmodel_main(["provenance", "check-archive", str(path)]) == 0


@pytest.mark.parametrize("difference, whole", [(0.0, True), (1.0, False)])
def test_a_reproduction_stands_in_for_a_lost_original_only_when_its_results_agree(original_and_copy, tmp_path,
                                                                                  difference, whole):
    _, copy = original_and_copy
    with disable_caching():
        _, rerun = scaled.run_get_node(copy.inputs.value, copy.inputs.factor)
    # what reproduce_cached_calculation records for a pw.x rerun: the copy it reproduces, differences by result
    rerun.base.extras.set_many({REPRODUCES_EXTRA: copy.uuid, DIFFERENCES_EXTRA: {"energy": difference}})
    report = cached_runs_in_archive(_archive(tmp_path, [copy, rerun]))
    assert report.whole is whole
    assert (copy.uuid in report.reproduced) is whole


def test_import_drops_the_cached_mark_and_restore_puts_it_back(original_and_copy, tmp_path, aiida_profile_clean):
    _, copy = original_and_copy
    path = _archive(tmp_path, [copy])
    uuid = copy.uuid
    aiida_profile_clean.reset_storage()
    from aiida.tools.archive import import_archive
    import_archive(path)
    assert CACHED_FROM_EXTRA not in orm.load_node(uuid).base.extras.all   # why the check reads the file itself
    assert restore_cached_marks(path) == 1
    assert orm.load_node(uuid).base.extras.get(CACHED_FROM_EXTRA) == cached_runs_in_archive(path).missing_originals[uuid]


def test_check_archive_refuses_a_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "frames.xyz"
    path.write_text("1\n\nH 0 0 0\n")
    assert polmodel_main(["provenance", "check-archive", str(path)]) == 2


def test_heldout_structures_are_linked_to_what_they_came_from(aiida_profile_clean):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43)
    positions = np.stack([atoms.positions + 0.01 * step for step in range(3)])
    trajectory = orm.TrajectoryData()
    trajectory.set_trajectory(atoms.get_chemical_symbols(), positions, cells=np.stack([atoms.cell.array] * 3))
    trajectory.store()
    frame = trajectory_frame(trajectory, orm.Int(2))
    assert frame.creator.inputs.trajectory.uuid == trajectory.uuid
    assert np.allclose(frame.get_ase().positions, positions[2])

    cif = orm.StructureData(ase=atoms).store()
    strain = orm.List([[1.01, 0, 0], [0, 1, 0], [0, 0, 0.99]])
    strained = strained_structure(cif, strain, orm.Float(0.04), orm.Int(7))
    assert strained.creator.inputs.structure.uuid == cif.uuid
    displacement = strained.get_ase().positions - atoms.positions @ np.diag([1.01, 1, 0.99])
    assert 0 < np.max(np.abs(displacement)) <= 0.04
    # a structure made before the calcfunctions: the record joins it to the remake and says how far apart they are
    existing = orm.StructureData(ase=frame.get_ase()).store()
    record = structure_difference(frame, existing)
    assert record.get_dict()["max_position_difference_A"] == 0.0
    moved = frame.get_ase()
    moved.positions[0, 0] += 0.5
    assert structure_difference(frame, orm.StructureData(ase=moved)).get_dict()["max_position_difference_A"] == \
        pytest.approx(0.5)
