"""Structures in (StructureData, ase.Atoms, pymatgen Structure, files), the active-learning protocols and
`polmodel launch`."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiida import orm

from fixtures_al import batio3_atoms

pytestmark = pytest.mark.aiida


def pymatgen_batio3(displacement=0.05):
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(batio3_atoms(displacement=displacement, seed=3))


def structure_facts(structure):
    return (np.array(structure.cell), [site.kind_name for site in structure.sites],
            np.array([site.position for site in structure.sites]))


def assert_same_structure(first, second, atol=1e-6):
    cell_a, kinds_a, positions_a = structure_facts(first)
    cell_b, kinds_b, positions_b = structure_facts(second)
    assert kinds_a == kinds_b
    np.testing.assert_allclose(cell_a, cell_b, atol=atol)
    np.testing.assert_allclose(positions_a, positions_b, atol=atol)


def test_to_structure_data_from_each_kind():
    from pymatgen.core import Lattice, Molecule, Structure

    from polmodel.workflows.structures import to_structure_data

    atoms = batio3_atoms(displacement=0.05, seed=3)
    from_ase = to_structure_data(atoms)
    from_pymatgen = to_structure_data(pymatgen_batio3())
    assert_same_structure(from_ase, from_pymatgen)
    assert to_structure_data(from_ase) is from_ase
    np.testing.assert_allclose(from_pymatgen.get_ase().positions, atoms.positions, atol=1e-10)

    disordered = Structure(Lattice.cubic(4.0), [{"Ba": 0.5, "Sr": 0.5}, "Ti"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="disordered"):
        to_structure_data(disordered)
    with pytest.raises(TypeError, match="not Molecule"):
        to_structure_data(Molecule(["H", "H"], [[0, 0, 0], [0, 0, 0.74]]))
    molecule = atoms.copy()
    molecule.pbc = False
    with pytest.raises(ValueError, match="periodic"):
        to_structure_data(molecule)


@pytest.fixture
def structure_files(tmp_path):
    """The same displaced BaTiO3 cell as a CIF (written by pymatgen) and as an extended XYZ (written by ASE)."""
    import ase.io
    from pymatgen.io.cif import CifWriter

    cif = tmp_path / "BaTiO3.cif"
    CifWriter(pymatgen_batio3()).write_file(cif)
    extxyz = tmp_path / "BaTiO3.extxyz"
    ase.io.write(extxyz, batio3_atoms(displacement=0.05, seed=3), format="extxyz")
    return {"cif": cif, "extxyz": extxyz}


def test_read_structures_through_pymatgen_and_ase(structure_files, tmp_path, monkeypatch):
    import ase.io
    import pymatgen.io.cif

    from polmodel.workflows.structures import read_structures

    used = []
    parse = pymatgen.io.cif.CifParser.parse_structures
    monkeypatch.setattr(pymatgen.io.cif.CifParser, "parse_structures",
                        lambda self, *a, **k: used.append("pymatgen") or parse(self, *a, **k))
    read = ase.io.read
    monkeypatch.setattr(ase.io, "read", lambda *a, **k: used.append("ase") or read(*a, **k))
    (from_cif,) = read_structures(structure_files["cif"])
    (from_extxyz,) = read_structures(structure_files["extxyz"])
    assert used == ["pymatgen", "ase"]
    assert_same_structure(from_cif, from_extxyz)

    frames = tmp_path / "two.extxyz"
    ase.io.write(frames, [batio3_atoms(), batio3_atoms(a=4.1)], format="extxyz")
    assert [s.cell[0][0] for s in read_structures(frames)] == [4.0, 4.1]
    broken = tmp_path / "broken.cif"
    broken.write_text("data_x\n_cell_length_a 4\nnot a cif\n")
    with pytest.raises(ValueError, match="broken.cif: pymatgen could not read"):
        read_structures(broken)
    with pytest.raises(ValueError, match="no such file"):
        read_structures(tmp_path / "missing.xyz")


def plain(value):
    """A builder (or a value in it) as plain Python, nodes by their content, for comparing two builders."""
    if isinstance(value, orm.StructureData):
        cell, kinds, positions = structure_facts(value)
        return ("structure", np.round(cell, 6).tolist(), kinds, np.round(positions, 6).tolist())
    if isinstance(value, orm.AbstractCode):
        return ("code", value.full_label)
    if isinstance(value, (orm.Dict, orm.List)):
        return value.get_dict() if isinstance(value, orm.Dict) else value.get_list()
    if isinstance(value, orm.BaseType):
        return value.value
    if isinstance(value, orm.Data):
        return (type(value).__name__, value.uuid)  # e.g. a pseudopotential: same node in both
    if hasattr(value, "items"):
        return {key: plain(item) for key, item in value.items()}
    return value


def launch_builders(argv):
    from polmodel.cli import launch
    from polmodel.cli import build_parser

    return launch.build(build_parser().parse_args(["launch", *argv]))


def test_launch_cif_and_extxyz_build_the_same_inputs(structure_files, pw_code, polmodel_code, pseudo_family):
    [(_, from_cif)] = launch_builders(["active-learning", str(structure_files["cif"]), "--protocol", "fast"])
    [(_, from_extxyz)] = launch_builders(["active-learning", str(structure_files["extxyz"]), "--protocol", "fast"])
    inputs = plain(from_cif._inputs(prune=True))
    assert inputs == plain(from_extxyz._inputs(prune=True))
    assert list(inputs["structures"]) == ["BaO3Ti_000"]
    assert inputs["label"]["code"] == ("code", pw_code.full_label)
    assert inputs["train"]["ensemble_size"] == 3  # the fast protocol


def test_launch_field_response_and_dfpt(structure_files, pw_code, ph_code, pseudo_family):
    [(_, response)] = launch_builders(["field-response", str(structure_files["cif"]), "--protocol", "fast",
                                       "--overrides", '{"scf": {"kpoints_distance": 0.55}}'])
    assert response.scf.kpoints_distance.value == 0.55
    [(_, dfpt)] = launch_builders(["dfpt", str(structure_files["extxyz"]), "--protocol", "fast"])
    assert dfpt.ph.ph.code.full_label == ph_code.full_label
    assert_same_structure(dfpt.structure, response.structure)


def test_field_response_builder_takes_pymatgen_and_ase(pw_code, pseudo_family):
    from polmodel.workflows.field_response import FieldResponseWorkChain

    from_pymatgen = FieldResponseWorkChain.get_builder_from_protocol(pw_code, pymatgen_batio3(), protocol="fast")
    from_ase = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, batio3_atoms(displacement=0.05, seed=3), protocol="fast")
    assert_same_structure(from_pymatgen.structure, from_ase.structure)
    assert plain(from_pymatgen.scf.pw.parameters) == plain(from_ase.scf.pw.parameters)


def test_launch_refuses_bad_input(structure_files, tmp_path, pw_code, polmodel_code, capsys, aiida_profile):
    from polmodel.cli import main

    import ase.io

    not_a_number = tmp_path / "nan.extxyz"
    broken = batio3_atoms(displacement=0.05, seed=3)
    broken.positions[1, 2] = np.nan
    ase.io.write(not_a_number, broken, format="extxyz")
    base = ["launch", "active-learning", "--profile", aiida_profile.name]
    cases = [
        ([str(tmp_path / "missing.cif")], "missing.cif: no such file"),
        ([str(structure_files["cif"]), "--overrides", "{not json"], "--overrides: neither JSON"),
        ([str(structure_files["cif"]), "--pw-code", "nonexistent@nowhere"], "--pw-code nonexistent@nowhere"),
        ([str(structure_files["cif"]), "--pseudo-family", "no-such-family"], "no-such-family` is not installed"),
        ([str(structure_files["cif"]), "--max-iterations", "2"], "--max-iterations goes with `continue`"),
        ([str(structure_files["extxyz"]), str(structure_files["extxyz"])], "structures 1 and 2 (BaO3Ti) are the same"),
        ([str(not_a_number)], "NaN or infinite positions or cell"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    base = ["launch", "continue", "--profile", aiida_profile.name]
    cases = [
        (["999999"], "continue 999999: no loop 999999"),
        ([str(pw_code.pk)], "is not an active-learning loop"),
        (["1", "--protocol", "fast"], "takes the finished loop's protocol"),
        (["1", "--overrides", "{not json"], "--overrides: neither JSON"),
        (["1", str(tmp_path / "missing.cif")], "missing.cif: no such file"),
        (["1", "--max-iterations", "0"], "--max-iterations must be >= 1"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["launch", "field-response", str(not_a_number), "--profile", aiida_profile.name]) == 2
    assert "NaN or infinite positions" in capsys.readouterr().err
    assert main(["launch", "active-learning", str(structure_files["cif"]), "--profile", "noprofile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("polmodel launch: no AiiDA profile noprofile"), err


@pytest.mark.parametrize("workflow, expected", [
    ("dfpt", ["dfpt: protocols (--protocol; default balanced):", "  fast: ", "scf.kpoints_distance = 0.25",
              "field_magnitude = 0.0364"]),
    ("active-learning", ["active-learning: protocols", "override keys"]),
    ("train", ["train: STRUCTURE_FILE is one source card"])])
def test_launch_help_lists_the_workflows_inputs(workflow, expected, capsys):
    """`launch WORKFLOW --help` adds the workflow's protocols and every override key with its default."""
    from polmodel.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["launch", workflow, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polmodel launch")
    for line in expected:
        assert line in out, line
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    assert "override keys (--overrides" not in capsys.readouterr().out


# --- the protocol builder -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["fast", "balanced", "stringent"])
def test_each_protocol_validates(protocol, pw_code, polmodel_code, pseudo_family):
    from polmodel.plugins.calculations import validate_md_parameters, validate_train_parameters
    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    builder = ActiveLearningWorkChain.get_builder_from_protocol(
        pw_code, polmodel_code, [pymatgen_batio3(), batio3_atoms()], protocol=protocol)
    # as a process does when it is created: defaults first (e.g. the polmodel CalcJobs' resources), then validation
    namespace = ActiveLearningWorkChain.spec().inputs
    assert namespace.validate(namespace.pre_process(builder._inputs(prune=True))) is None
    assert validate_train_parameters(builder.train.train.parameters, None) is None
    # the exploration checks each (field, temperature) run the same way when it starts
    for field in builder.explore.fields.get_list():
        for temperature in builder.explore.temperatures.get_list():
            trial = orm.Dict(dict(builder.explore.parameters.get_dict(), field=field, temperature=temperature))
            assert validate_md_parameters(trial, None) is None
    assert builder.label.protocol.value == protocol
    assert sorted(builder.structures) == ["BaO3Ti_000", "BaO3Ti_001"]


def test_overrides_reach_the_children(pw_code, polmodel_code, pseudo_family):
    from aiida.common import AttributeDict

    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    overrides = {"label": {"overrides": {"scf": {"kpoints_distance": 0.55}}},
                 "train": {"parameters": {"epochs": 7}}, "ensemble_size": 2,
                 "explore": {"parameters": {"steps": 11}, "temperatures": [50.0], "selection": {"max_candidates": 1}},
                 "max_iterations": 2}
    builder = ActiveLearningWorkChain.get_builder_from_protocol(
        pw_code, polmodel_code, {"cubic": batio3_atoms()}, protocol="fast", overrides=overrides)
    assert builder.train.train.parameters["epochs"] == 7 and builder.train.ensemble_size.value == 2
    assert builder.explore.parameters["steps"] == 11 and builder.explore.parameters["timestep"] == 2.0  # fast kept
    assert builder.explore.temperatures.get_list() == [50.0] and builder.explore.selection["max_candidates"] == 1
    assert builder.max_iterations.value == 2
    assert builder.initial_data.count.value == 6 and builder.label_budget.value == 20  # fast's loop economy
    assert [stage["steps"] for stage in builder.schedule.get_list()] == [200, 400]
    # the loop's own label_builder makes each DFT label's builder from these inputs
    loop = AttributeDict({"inputs": AttributeDict(builder._inputs(prune=True)),
                          "label_workchain": lambda: ActiveLearningWorkChain.label_workchain(None)})
    loop.inputs.label = AttributeDict(loop.inputs.label)
    label = ActiveLearningWorkChain.label_builder(loop, builder.structures["cubic"], "full")
    assert label.scf.kpoints_distance.value == 0.55
    assert label.field_magnitude.value == 0.0364  # the fast field-response protocol


def test_bad_protocol_inputs_are_refused(pw_code, polmodel_code, pseudo_family):
    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    with pytest.raises(ValueError, match="not a valid protocol"):
        ActiveLearningWorkChain.get_builder_from_protocol(pw_code, polmodel_code, batio3_atoms(), protocol="quick")
    with pytest.raises(ValueError, match="force_lower < force_upper"):
        ActiveLearningWorkChain.get_builder_from_protocol(
            pw_code, polmodel_code, batio3_atoms(), overrides={"explore": {"selection": {"force_upper": 0.01}}})
    with pytest.raises(ValueError, match="max_iteration"):  # a typo'd override key is refused, not ignored
        ActiveLearningWorkChain.get_builder_from_protocol(
            pw_code, polmodel_code, batio3_atoms(), overrides={"max_iteration": 2})
    with pytest.raises(ValueError, match="label_budgt"):
        ActiveLearningWorkChain.get_builder_from_protocol(
            pw_code, polmodel_code, batio3_atoms(), overrides={"label_budgt": 2})
    squeezed = batio3_atoms()
    squeezed.positions[1] = squeezed.positions[0] + [0.2, 0.0, 0.0]
    with pytest.raises(ValueError, match="overlapping atoms"):
        ActiveLearningWorkChain.get_builder_from_protocol(pw_code, polmodel_code, [squeezed])


# --- submitting to the daemon ---------------------------------------------------------------------------------------

#: Run in a throwaway configuration (AIIDA_PATH): the profile `make setup` makes (core.sqlite_dos + core.zeromq, no
#: daemon started), its `localhost` computer and `stand-in@localhost`, a code whose executable does nothing, so that a
#: job the daemon may start before it is stopped costs nothing beside the other tests.
THROWAWAY_SETUP = """
from aiida import orm
from aiida.manage.configuration import get_config

from polmodel.plugins.bootstrap import PROFILE_NAME, ensure_computer, ensure_profile

ensure_profile(print)
config = get_config()
config.set_option("daemon.timeout", 30, scope=PROFILE_NAME)   # circus calls on two busy cores (fixtures_aiida.py)
config.store()
ensure_computer(print)
orm.InstalledCode(label="stand-in", computer=orm.load_computer("localhost"), filepath_executable="/bin/true").store()
"""


@pytest.mark.daemon
def test_launch_daemon_starts_the_daemon_that_make_setup_leaves_stopped(tmp_path):
    """`polmodel launch ... --daemon` with the daemon not running (the state `make setup` leaves) starts it and
    submits. Everything happens in a profile of its own under tmp_path, so the session's test daemon is never
    touched; the daemon it starts is stopped at the end, waiting until it is down."""
    bin_folder = Path(sys.executable).parent
    environment = {**os.environ, "AIIDA_PATH": str(tmp_path / "config"), "OMP_NUM_THREADS": "1"}

    def run(*argv, timeout=300):
        return subprocess.run([str(word) for word in argv], env=environment, capture_output=True, text=True,
                              timeout=timeout)

    def daemon_running():
        return run(bin_folder / "verdi", "-p", "polmodel", "daemon", "status").returncode == 0

    setup = run(sys.executable, "-c", THROWAWAY_SETUP)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert not daemon_running()
    card = Path(__file__).resolve().parents[1] / "data" / "allegro_pol" / "BaTiO3.yaml"
    try:
        launched = run(bin_folder / "polmodel", "launch", "train", card, "--daemon", "--profile", "polmodel",
                       "--polmodel-code", "stand-in@localhost")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert "the AiiDA daemon is not running: starting it" in launched.stdout
        assert re.search(r"^submitted TrainEnsembleWorkChain<\d+>", launched.stdout, flags=re.MULTILINE), \
            launched.stdout
        assert daemon_running()
    finally:
        stopped = run(bin_folder / "verdi", "-p", "polmodel", "daemon", "stop")   # waits for the shutdown
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not daemon_running()


@pytest.mark.daemon
def test_launch_daemon_submits(structure_files, pw_code, polmodel_code, pseudo_family, started_daemon_client,
                               aiida_profile, capsys):
    from aiida.engine.processes.control import kill_processes

    from polmodel.cli import main

    assert main(["launch", "active-learning", str(structure_files["cif"]), "--protocol", "fast", "--daemon",
                 "--profile", aiida_profile.name]) == 0
    output = capsys.readouterr().out
    pk = int(re.search(r"ActiveLearningWorkChain<(\d+)>", output).group(1))
    assert f"verdi process report {pk}" in output and f"verdi process status {pk}" in output
    node = orm.load_node(pk)
    try:
        verdi = Path(sys.executable).parent / "verdi"
        listing = subprocess.run([str(verdi), "-p", aiida_profile.name, "process", "list", "-a", "-p", "1"],
                                 capture_output=True, text=True, timeout=120, check=True).stdout
        assert re.search(rf"^\s*{pk}\s", listing, flags=re.MULTILINE), listing
        assert "ActiveLearningWorkChain" in listing
    finally:
        if not node.is_terminated:  # do not leave pw.x runs behind
            kill_processes([node], timeout=60)


@pytest.mark.dft
def test_a_metal_ends_the_launch_within_one_short_pw_run(tmp_path, pw_code, pseudo_family, aiida_profile, capsys):
    """Two-atom Al run here (no daemon): the first pw.x run (at most FIRST_RUN_ELECTRON_MAXSTEP SCF steps) shows the
    metal and the whole workchain ends right after it, not a 60 s poll later."""
    import time

    import ase.build

    from polmodel.cli import main
    from polmodel.workflows.field_response import FIRST_RUN_ELECTRON_MAXSTEP

    path = tmp_path / "al2.xyz"
    ase.build.bulk("Al", "bcc", a=3.2, cubic=True).write(path)
    started = time.monotonic()
    status = main(["launch", "field-response", str(path), "--protocol", "fast", "--profile", aiida_profile.name,
                   "--pw-code", f"{pw_code.label}@{pw_code.computer.label}", "--pseudo-family", pseudo_family.label])
    elapsed = time.monotonic() - started
    assert status == 1
    pk = int(re.search(r"FieldResponseWorkChain<(\d+)> finished with exit status", capsys.readouterr().out).group(1))
    node = orm.load_node(pk)
    assert node.exit_status == node.process_class.exit_codes.ERROR_NOT_AN_INSULATOR.status
    calculations = [n for n in node.called_descendants if n.process_label == "PwCalculation"]
    assert len(calculations) == 1
    assert calculations[0].inputs.parameters["ELECTRONS"]["electron_maxstep"] == FIRST_RUN_ELECTRON_MAXSTEP
    assert elapsed < 45, elapsed
