"""The shipped α-quartz campaign (data/quartz): the archive imports into an empty profile with its provenance, and
the shipped ensemble is the loop's final model."""
import hashlib
import pathlib

import numpy as np
import pytest

QUARTZ = pathlib.Path(__file__).resolve().parent.parent / "data" / "quartz"

pytestmark = pytest.mark.skipif(not (QUARTZ / "campaign.aiida").is_file(), reason="no shipped quartz archive")


def test_shipped_ensemble_loads_and_answers_on_the_cif_structure():
    from polmodel import PolCalculator, load
    from polmodel.workflows.structures import read_structures

    ensemble = load(QUARTZ / "ensemble.pt")
    assert sorted(ensemble.species) == ["O", "Si"] and len(ensemble.members) >= 2
    atoms = read_structures(QUARTZ / "alpha_quartz.cif")[0].get_ase()
    atoms.calc = PolCalculator(ensemble)
    forces = atoms.get_forces()
    assert forces.shape == (9, 3) and np.all(np.isfinite(forces))
    assert np.allclose(forces.sum(axis=0), 0.0, atol=1e-4)


@pytest.mark.aiida
def test_shipped_archive_imports_with_provenance_to_the_pw_runs(aiida_profile_for_import):
    from aiida import orm
    from aiida.tools.archive import import_archive

    from polmodel.workflows.active_learning import ActiveLearningWorkChain
    from polmodel.workflows.provenance import pw_runs_for_model

    import_archive(QUARTZ / "campaign.aiida")
    loops = orm.QueryBuilder().append(ActiveLearningWorkChain,
                                      filters={"attributes.exit_status": 0}).all(flat=True)
    assert loops, "the archive holds no finished active-learning loop"
    loop = max(loops, key=lambda node: node.ctime)
    runs = pw_runs_for_model(loop.outputs.model)
    assert len(runs) >= 10 and all(run.is_finished_ok for run in runs)
    shipped = hashlib.sha256((QUARTZ / "ensemble.pt").read_bytes()).hexdigest()
    assert hashlib.sha256(loop.outputs.model.get_content()).hexdigest() == shipped
    # a continuation can be built from the imported loop (codes are this machine's)
    builder = ActiveLearningWorkChain.get_builder_continuing(loop.uuid, max_iterations=1)
    assert builder.initial_frames.uuid == loop.outputs.dataset.uuid
