"""Fixtures of the active-learning side: CalcJob/WorkChain factories (aiida-quantumespresso style), fake children,
tiny structures and frames, and real tiny model files made with `polmodel.nn.serialization`."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

BATIO3_SPECIES = ["Ba", "Ti", "O"]


def batio3_atoms(displacement=0.0, seed=0, a=4.0):
    """Cubic 5-atom BaTiO3; `displacement` Å of random noise on every atom."""
    from ase import Atoms

    atoms = Atoms(
        "BaTiO3",
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=np.eye(3) * a,
        pbc=True,
    )
    if displacement:
        rng = np.random.default_rng(seed)
        atoms.positions += rng.normal(scale=displacement, size=atoms.positions.shape)
    return atoms


def labelled_frames(count, seed=0, source=None):
    """`count` BaTiO3 frames with made-up but well-formed docs/conventions.md labels (for data-type and logic tests)."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        atoms = batio3_atoms(0.05, seed=seed * 100 + index)
        atoms.info["energy"] = float(-100.0 + rng.normal())
        atoms.info["efield"] = np.array([0.0, 0.0, 0.01 * index])
        atoms.info["dipole"] = rng.normal(size=3)
        atoms.info["polarization_quantum"] = np.eye(3) * 8.0
        atoms.arrays["forces"] = rng.normal(scale=0.1, size=(len(atoms), 3))
        atoms.info["source"] = source or f"00000000-0000-0000-0000-{seed:06d}{index:06d}"
        frames.append(atoms)
    return frames


@pytest.fixture
def generate_frames_data(aiida_profile):
    """Factory: stored FramesData of `count` labelled BaTiO3 frames."""

    def factory(count=3, seed=0, source=None, store=True):
        from polmodel.plugins.data import FramesData

        node = FramesData.from_atoms(labelled_frames(count, seed, source))
        return node.store() if store else node

    return factory


@pytest.fixture
def generate_fake_model_data(aiida_profile):
    """Factory: a ModelData with the attributes a real one has and an arbitrary file, for workchain logic tests."""

    def factory(species=tuple(BATIO3_SPECIES), ensemble_size=2, store=True):
        from polmodel.plugins.data import MODEL_FILENAME, ModelData

        content = b"not a model: workchain logic tests never load it"
        node = ModelData()
        node.base.repository.put_object_from_bytes(content, MODEL_FILENAME)
        for key, value in {
            "kind": "ensemble" if ensemble_size > 1 else "model",
            "ensemble_size": ensemble_size,
            "species": list(species),
            "cutoff": 4.0,
            "hyperparameters": {},
            "metrics": {},
            "sha256": hashlib.sha256(content).hexdigest(),
        }.items():
            node.base.attributes.set(key, value)
        return node.store() if store else node

    return factory


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A real, untrained 2-member BaTiO3 ensemble file (small hyperparameters), written by polmodel.nn.serialization."""
    import torch

    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel
    from polmodel.nn.serialization import save

    torch.manual_seed(0)
    members = [PolModel(BATIO3_SPECIES, 4.0, **TINY_HYPERPARAMETERS) for _ in range(2)]
    path = tmp_path_factory.mktemp("model") / "ensemble.pt"
    save(PolEnsemble(members), path)
    return path


#: Hyperparameters of a model small enough for tests (seconds of training, sub-second MD steps).
TINY_HYPERPARAMETERS = {"num_features": 4, "lmax": 1, "num_layers": 1, "num_radial": 4, "radial_hidden": 8,
                        "readout_hidden": 4}
#: `polmodel train --hyperparameters` of tests: the tiny model plus a short, small-batch training.
TINY_TRAINING = {**TINY_HYPERPARAMETERS, "cutoff": 4.0, "batch_size": 4}


@pytest.fixture
def generate_al_calc_job(aiida_profile, tmp_path):
    """Factory `generate_al_calc_job(entry_point, inputs) -> (Folder, CalcInfo)`: runs prepare_for_submission only."""

    def factory(entry_point_name, inputs):
        from aiida.common.folders import Folder
        from aiida.engine.utils import instantiate_process
        from aiida.manage.manager import get_manager
        from aiida.plugins import CalculationFactory

        (tmp_path / "sandbox").mkdir(exist_ok=True)
        folder = Folder(str(tmp_path / "sandbox"))
        process = instantiate_process(get_manager().get_runner(), CalculationFactory(entry_point_name), **inputs)
        return folder, process.prepare_for_submission(folder)

    return factory


@pytest.fixture
def generate_al_workchain(aiida_profile):
    """Factory `generate_al_workchain(entry_point, inputs) -> WorkChain instance` whose steps a test calls directly."""

    def factory(entry_point_name, inputs):
        from aiida.engine.utils import instantiate_process
        from aiida.manage.manager import get_manager
        from aiida.plugins import WorkflowFactory

        return instantiate_process(get_manager().get_runner(), WorkflowFactory(entry_point_name), **inputs)

    return factory


@pytest.fixture
def generate_fake_child(aiida_profile):
    """Factory: a stored, finished WorkflowNode standing in for a child process, `outputs` linked as its results.

    Children are only ever read through `is_finished_ok`, `exit_status` and `outputs`, which this node provides.
    """

    def factory(outputs=None, exit_status=0, process_label="FakeChild"):
        from aiida import orm
        from aiida.common.links import LinkType
        from plumpy.process_states import ProcessState

        node = orm.WorkflowNode()
        node.set_process_label(process_label)
        node.set_process_state(ProcessState.FINISHED)
        node.set_exit_status(exit_status)
        node.store()
        for label, output in (outputs or {}).items():
            if not output.is_stored:
                output.store()
            output.base.links.add_incoming(node, link_type=LinkType.RETURN, link_label=label)
        return node

    return factory


@pytest.fixture
def generate_calc_job_node(aiida_localhost):
    """Factory: a stored CalcJobNode of `entry_point` whose `retrieved` FolderData holds the files of `directory`
    (only the names in `names`, when given): what a parser sees after a real run."""

    def factory(entry_point_name, directory, names=None):
        import pathlib

        from aiida import orm
        from aiida.common.links import LinkType
        from aiida.plugins.entry_point import format_entry_point_string

        node = orm.CalcJobNode(computer=aiida_localhost,
                               process_type=format_entry_point_string("aiida.calculations", entry_point_name))
        node.set_option("resources", {"num_machines": 1, "num_mpiprocs_per_machine": 1})
        node.store()
        retrieved = orm.FolderData()
        directory = pathlib.Path(directory)
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory).as_posix()
            if path.is_file() and (names is None or relative.split("/")[0] in names):
                retrieved.base.repository.put_object_from_file(str(path), relative)
        retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label="retrieved")
        retrieved.store()
        return node

    return factory


def run_polmodel(arguments, cwd, timeout=600):
    """Run the real `polmodel` executable of this environment; return the CompletedProcess (check=True)."""
    import os
    import pathlib
    import subprocess
    import sys

    executable = pathlib.Path(sys.executable).parent / "polmodel"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([str(executable), *arguments], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=True)


@pytest.fixture(scope="session")
def real_train_run(tmp_path_factory):
    """A directory in which the real `polmodel train` trained a 2-member ensemble on 6 labelled frames, with the
    command-line TrainCalculation writes (metrics.json, plots/, model.pt)."""
    import json

    from ase.io import write

    directory = tmp_path_factory.mktemp("train_run")
    write(directory / "frames.xyz", labelled_frames(6, seed=3), format="extxyz")
    (directory / "hyperparameters.json").write_text(json.dumps(TINY_TRAINING))
    run_polmodel(["train", "frames.xyz", "--output", "model.pt", "--metrics", "metrics.json", "--plots", "plots",
                  "--quiet", "--ensemble", "2", "--seed", "1", "--epochs", "2", "--hyperparameters",
                  "hyperparameters.json"], cwd=directory)
    return directory


@pytest.fixture(scope="session")
def real_md_run(real_train_run, tmp_path_factory):
    """A directory in which the real `polmodel md` ran 6 steps of ensemble MD under a cosine field."""
    import json
    import shutil

    from ase.io import write

    directory = tmp_path_factory.mktemp("md_run")
    shutil.copy(real_train_run / "model.pt", directory / "model.pt")
    write(directory / "structure.xyz", batio3_atoms(0.05, seed=1), format="extxyz")
    (directory / "field.json").write_text(json.dumps({"kind": "cosine", "amplitude": 0.05, "period_fs": 10.0,
                                                      "axis": [0, 0, 1]}))
    run_polmodel(["md", "--model", "model.pt", "--structure", "structure.xyz", "--output", "trajectory.xyz",
                  "--steps", "6", "--timestep", "1.0", "--temperature", "300", "--thermostat", "langevin",
                  "--field", "field.json", "--interval", "2", "--born-spread", "--seed", "3", "--quiet"],
                 cwd=directory)
    return directory
