"""The shipped ensembles trained on Allegro-pol's published frames (data/allegro_pol): they load, answer, and the
shipped archive takes each back through its TrainCalculation and import to the published file."""
import hashlib
import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "allegro_pol"
SYSTEMS = {"SiO2": ("SiO2-72-ortho-phrelax.xyz", ["O", "Si"], "scripts/3.Parity/SiO2/SiO2.xyz"),
           "BaTiO3": ("BaTiO3-135-pbe.xyz", ["Ba", "O", "Ti"], "scripts/3.Parity/BaTiO3/BaTiO3.xyz")}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_shipped_ensemble_loads_and_answers(system):
    import ase.io

    from polmodel import PolCalculator, load

    structure, species, _ = SYSTEMS[system]
    ensemble = load(DATA / f"{system}.pt")
    assert sorted(ensemble.species) == species and len(ensemble.members) >= 3
    atoms = ase.io.read(DATA / structure)
    atoms.calc = PolCalculator(ensemble)
    forces = atoms.get_forces()
    assert np.all(np.isfinite(forces)) and np.allclose(forces.sum(axis=0), 0.0, atol=1e-3)
    born = atoms.calc.get_property("born_effective_charges", atoms).reshape(-1, 3, 3)
    assert np.abs(born.sum(axis=0)).max() < 1e-3     # the acoustic sum rule holds by construction


@pytest.mark.aiida
def test_shipped_archive_names_the_published_files_behind_each_model(aiida_profile_for_import):
    from aiida import orm
    from aiida.tools.archive import import_archive

    from polmodel.workflows.provenance import external_sources, training_calculation
    from polmodel.workflows.train_ensemble import TrainEnsembleWorkChain

    import_archive(DATA / "provenance.aiida")
    trainings = orm.QueryBuilder().append(TrainEnsembleWorkChain, filters={"attributes.exit_status": 0}).all(flat=True)
    by_sha = {hashlib.sha256(node.outputs.model.get_content()).hexdigest(): node for node in trainings}
    for system, (_, _, path) in SYSTEMS.items():
        training = by_sha[hashlib.sha256((DATA / f"{system}.pt").read_bytes()).hexdigest()]
        model = training.outputs.model
        assert training_calculation(model) is not None
        (record,) = external_sources(model)
        assert record["repository"] == "https://github.com/mir-group/allegro-pol" and record["path"] == path
        assert record["licence"] == "MIT"
        source, frames = record["imports"][0]
        published = hashlib.sha256(source.get_content(mode="rb")).hexdigest()
        assert published == record["sha256"]
