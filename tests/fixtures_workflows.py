"""Factory fixtures for the DFT workflow tests, in the aiida-quantumespresso style.

``generate_pw_calc_node(case, caller=None)`` a stored, finished PwCalculation node whose retrieved files are the recorded pw.x
                                   output ``tests/data/pw/<case>`` (real runs; inputs rebuilt from the recorded
                                   ``aiida.in``), ready for ``PolPwParser.parse_from_node``.
``parse_pw_case(case)``           the parse results (dict of output nodes) and exit code of one recorded case.
``generate_workchain(cls, inputs)`` an instantiated, not yet running work chain (call its outline steps by hand).
``generate_fake_pw_base(...)``     a finished PwBaseWorkChain-like node with chosen exit status and outputs, standing
                                   in for a child in handler/branch tests.
``alas_structure``                zincblende AlAs (2 atoms, a = 5.66 Å).
"""
from __future__ import annotations

import gzip
import io
import pathlib

import numpy as np
import pytest

DATA_DIRECTORY = pathlib.Path(__file__).parent / "data" / "pw"


def read_recorded_input(case):
    """(parameters dict, ase.Atoms) of a recorded pw.x input."""
    import ase.io
    from ase.io.espresso import read_fortran_namelist

    text = (DATA_DIRECTORY / case / "aiida.in").read_text()
    namelists, _ = read_fortran_namelist(io.StringIO(text))
    parameters = {name.upper(): dict(values) for name, values in namelists.items()}
    # Indexed keys like efield_cart(1) come back as separate entries: fold them into lists as AiiDA writes them.
    for values in parameters.values():
        for key in [k for k in values if "(" in k]:
            base, index = key.rstrip(")").split("(")
            values.setdefault(base, [0.0, 0.0, 0.0])
            values[base][int(index) - 1] = values.pop(key)
    atoms = ase.io.read(io.StringIO(text), format="espresso-in")
    return parameters, atoms


def recorded_file(case, name):
    """Bytes of a recorded output file (stored gzipped)."""
    return gzip.decompress((DATA_DIRECTORY / case / f"{name}.gz").read_bytes())


@pytest.fixture
def alas_structure(aiida_profile):
    from aiida import orm

    a = 5.66
    structure = orm.StructureData(cell=[[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")
    structure.append_atom(position=(a / 4, a / 4, a / 4), symbols="As")
    return structure


@pytest.fixture
def generate_pw_calc_node(aiida_localhost):
    """Factory: a finished `quantumespresso.pw` CalcJobNode carrying a recorded real output."""
    from aiida import orm
    from aiida.common import LinkType
    from aiida.plugins.entry_point import format_entry_point_string

    def factory(case, caller=None):
        """`caller`: a stored workflow node that called this calculation (linked before the node is stored)."""
        parameters, atoms = read_recorded_input(case)
        node = orm.CalcJobNode(
            computer=aiida_localhost, process_type=format_entry_point_string("aiida.calculations", "quantumespresso.pw")
        )
        node.set_option("resources", {"num_machines": 1, "num_mpiprocs_per_machine": 1})
        node.set_option("max_wallclock_seconds", 1800)
        node.set_option("output_filename", "aiida.out")
        node.set_option("parser_name", "polmodel.pw")
        parameters_node = orm.Dict(parameters).store()
        structure_node = orm.StructureData(ase=atoms).store()
        node.base.links.add_incoming(parameters_node, link_type=LinkType.INPUT_CALC, link_label="parameters")
        node.base.links.add_incoming(structure_node, link_type=LinkType.INPUT_CALC, link_label="structure")
        if caller is not None:
            node.base.links.add_incoming(caller, link_type=LinkType.CALL_CALC, link_label="iteration_01")
        node.store()

        retrieved = orm.FolderData()
        for name in ("aiida.out", "data-file-schema.xml"):
            retrieved.base.repository.put_object_from_bytes(recorded_file(case, name), name)
        retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label="retrieved")
        retrieved.store()
        return node

    return factory


@pytest.fixture
def parse_pw_case(generate_pw_calc_node):
    """Factory: ``(results, calcfunction node)`` of PolPwParser on a recorded case."""
    from polmodel.plugins.pw_parser import PolPwParser

    def factory(case):
        node = generate_pw_calc_node(case)
        results, calcfunction = PolPwParser.parse_from_node(node, store_provenance=False)
        return results, calcfunction

    return factory


@pytest.fixture
def generate_workchain():
    """Factory: an instantiated work chain (not running) whose outline steps a test calls one by one."""
    from aiida.engine.utils import instantiate_process
    from aiida.manage.manager import get_manager

    def factory(process_class, inputs):
        runner = get_manager().get_runner()
        return instantiate_process(runner, process_class, **inputs)

    return factory


@pytest.fixture
def generate_fake_pw_base(aiida_profile):
    """Factory: a finished PwBaseWorkChain stand-in with `exit_status`, `output_parameters` and a forces trajectory.

    ``calculation_exit_status`` adds a called PwCalculation node with that exit status (what the field-breakdown
    handler inspects).
    """
    from aiida import orm
    from aiida.common import LinkType
    from aiida.engine import ProcessState
    from aiida.plugins import CalculationFactory, WorkflowFactory

    def factory(exit_status=0, output_parameters=None, forces=None, calculation_exit_status=None):
        node = orm.WorkflowNode(process_type=WorkflowFactory("quantumespresso.pw.base").build_process_type())
        node.set_process_state(ProcessState.FINISHED)
        node.set_exit_status(exit_status)
        node.store()
        if calculation_exit_status is not None:
            calculation = orm.CalcJobNode(process_type=CalculationFactory("quantumespresso.pw").build_process_type())
            calculation.set_process_state(ProcessState.FINISHED)
            calculation.set_exit_status(calculation_exit_status)
            calculation.base.links.add_incoming(node, link_type=LinkType.CALL_CALC, link_label="iteration_01")
            calculation.store()
        outputs = {}
        if output_parameters is not None:
            outputs["output_parameters"] = orm.Dict(output_parameters)
        if forces is not None:
            trajectory = orm.ArrayData()
            trajectory.set_array("forces", np.asarray(forces)[None])
            outputs["output_trajectory"] = trajectory
        for label, output in outputs.items():
            output.store()
            output.base.links.add_incoming(node, link_type=LinkType.RETURN, link_label=label)
        return node

    return factory


DEBIAN_PSEUDO_DIRECTORY = pathlib.Path("/usr/share/espresso/pseudo")
#: Debian's LDA pseudopotentials for AlAs (norm-conserving, soft): cheap enough for CI-sized pw.x/ph.x runs.
ALAS_LDA_PSEUDOS = {"Al": "Al.pz-vbc.UPF", "As": "As.pz-bhs.UPF"}
ALAS_LDA_FAMILY = "polmodel-tests/debian/LDA/AlAs"
ALAS_LDA_CUTOFFS_RY = (20.0, 80.0)


@pytest.fixture
def generate_debian_pseudo_family(aiida_profile, tmp_path):
    """Factory: get-or-create an aiida-pseudo family `label` of Debian UPFs `{element: filename}` with cutoffs (Ry).

    Skips the test when one of the files is not installed.
    """
    import shutil

    from aiida.plugins import DataFactory, GroupFactory

    def factory(label, pseudos, cutoffs_ry):
        family_class = GroupFactory("pseudo.family.cutoffs")
        existing = family_class.collection.find(filters={"label": label})
        if existing:
            return existing[0]
        folder = tmp_path / label.replace("/", "_")
        folder.mkdir()
        for name in pseudos.values():
            if not (DEBIAN_PSEUDO_DIRECTORY / name).is_file():
                pytest.skip(f"Debian pseudopotential {name} is not installed")
            shutil.copy(DEBIAN_PSEUDO_DIRECTORY / name, folder / name)
        family = family_class.create_from_folder(folder, label, pseudo_type=DataFactory("pseudo.upf"))
        wfc, rho = cutoffs_ry
        family.set_cutoffs({element: {"cutoff_wfc": wfc, "cutoff_rho": rho} for element in pseudos}, "normal", unit="Ry")
        return family

    return factory


@pytest.fixture
def alas_lda_family(generate_debian_pseudo_family):
    """aiida-pseudo family of Debian's Al/As LDA UPFs with 20/80 Ry recommended cutoffs (get-or-create)."""
    return generate_debian_pseudo_family(ALAS_LDA_FAMILY, ALAS_LDA_PSEUDOS, ALAS_LDA_CUTOFFS_RY)
