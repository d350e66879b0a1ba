"""DfptWorkChain: ph.x stdout parsing on a recorded real run, and input validation."""
import gzip
import pathlib

import numpy as np
import pytest

from polmodel.workflows.dfpt import parse_ph_born_charges, parse_ph_dielectric

PH_DATA = pathlib.Path(__file__).parent / "data" / "ph"


def ph_stdout(case):
    return gzip.decompress((PH_DATA / case / "aiida.out.gz").read_bytes()).decode()


def test_parse_ph_dielectric_and_born_charges():
    """Real ph.x 6.7 output: AlAs, LDA, 20 Ry, Γ-centred 4x4x4, epsil=.true., trans=.false."""
    text = ph_stdout("alas_epsil_k444")
    dielectric = parse_ph_dielectric(text)
    assert dielectric == pytest.approx(15.240265192 * np.eye(3), abs=1e-8)
    born = parse_ph_born_charges(text, 2)
    assert born[0] == pytest.approx(1.91652 * np.eye(3), abs=1e-5)
    assert born[1] == pytest.approx(-3.36617 * np.eye(3), abs=1e-5)


def test_parse_ph_without_tensors():
    assert parse_ph_dielectric("JOB DONE.") is None
    assert parse_ph_born_charges("JOB DONE.", 2) is None
    # Too few atoms printed for the structure: no silent truncation.
    assert parse_ph_born_charges(ph_stdout("alas_epsil_k444"), 3) is None


@pytest.mark.aiida
def test_dfpt_builder_and_wrong_codes(alas_structure, pw_code, ph_code, alas_lda_family):
    from polmodel.workflows.dfpt import DfptWorkChain, validate_inputs
    from polmodel.workflows.field_response import FieldResponseWorkChain

    source = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, alas_structure, protocol="fast", pseudo_family=alas_lda_family.label,
        overrides={"scf": {"kpoints_distance": 0.5}},
    )
    builder = DfptWorkChain.get_builder_from_field_response(source, ph_code)
    assert validate_inputs(builder._inputs(prune=True), None) is None
    assert builder.ph.ph.parameters["INPUTPH"]["epsil"] is True
    assert builder.scf.pw.parameters == source.scf.pw.parameters

    wrong = DfptWorkChain.get_builder_from_field_response(source, pw_code)
    assert "quantumespresso.ph" in validate_inputs(wrong._inputs(prune=True), None)


# --- Γ phonons from ph.x's dynamical matrix against dynmat.x ------------------------------------------------
ALAS_TRANS = PH_DATA / "alas_trans_k222"


def dynmat_table(text):
    """(wavenumbers cm⁻¹, IR (D/Å)²/amu) from dynmat.x's '# mode [cm-1] [THz] IR' table."""
    rows = text[text.index("# mode"):].splitlines()[1:]
    values = [[float(x) for x in row.split()] for row in rows if row.strip() and row.split()[0].isdigit()]
    return np.array(values)[:, 1], np.array(values)[:, 3]


def test_gamma_modes_from_a_recorded_dynamical_matrix_equal_dynmat_x():
    """Real ph.x 6.7 (AlAs, LDA, 16 Ry, 2x2x2, epsil + trans) and dynmat.x on its file, asr='no' and 'simple'."""
    from polmodel.analysis import phonons
    from polmodel.workflows.dfpt import parse_ph_dynamical_matrix

    matrix = parse_ph_dynamical_matrix((ALAS_TRANS / "alas.dyn").read_text())
    assert matrix["species"] == ["Al", "As"]
    assert matrix["masses"] == pytest.approx([26.98, 74.92])
    born = parse_ph_born_charges(gzip.decompress((ALAS_TRANS / "ph.out.gz").read_bytes()).decode(), 2)

    raw = phonons.gamma_modes(matrix["force_constants"], matrix["masses"], acoustic_sum_rule=False)
    wavenumbers, intensities = dynmat_table((ALAS_TRANS / "dynmat_asr_no.out").read_text())
    assert np.sort(raw["wavenumbers"]) == pytest.approx(wavenumbers, abs=0.01)
    charges = phonons.mode_effective_charges(born, raw["eigenvectors"], matrix["masses"])
    assert phonons.ir_intensities(charges)["debye2_per_angstrom2_amu"] == pytest.approx(intensities, rel=2e-4)

    # dynmat.x's 'simple' rule corrects only the diagonal blocks; the projection keeps the same optical modes here
    result = phonons.gamma_response(matrix["force_constants"], matrix["masses"], born, 1.0, 100.0)
    wavenumbers, intensities = dynmat_table((ALAS_TRANS / "dynmat_asr_simple.out").read_text())
    order = np.argsort(result["wavenumbers"])
    assert result["wavenumbers"][order] == pytest.approx(wavenumbers, abs=0.01)
    assert result["ir_intensities"]["debye2_per_angstrom2_amu"][order] == pytest.approx(intensities, rel=2e-4, abs=1e-4)


def test_parse_dynamical_matrix_rejects_other_files():
    from polmodel.workflows.dfpt import parse_ph_dynamical_matrix

    assert parse_ph_dynamical_matrix("JOB DONE.") is None
    truncated = (ALAS_TRANS / "alas.dyn").read_text().split("    2    2\n")[0]
    assert parse_ph_dynamical_matrix(truncated) is None


@pytest.mark.aiida
@pytest.mark.dft
def test_dfpt_workchain_gamma_phonons_equal_dynmat_x(alas_structure, pw_code, ph_code, alas_lda_family, tmp_path):
    """The DfptWorkChain on AlAs (LDA, 20 Ry, 2x2x2, real pw.x + ph.x): its Γ modes and IR intensities equal
    dynmat.x's on the dynamical matrix the same ph.x run wrote; ε0 > ε∞ from the polar mode."""
    import shutil
    import subprocess

    from aiida.engine import run_get_node

    from polmodel.workflows.dfpt import DfptWorkChain
    from polmodel.workflows.field_response import FieldResponseWorkChain

    if shutil.which("dynmat.x") is None:
        pytest.skip("dynmat.x is not installed")
    source = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, alas_structure, protocol="fast", pseudo_family=alas_lda_family.label,
        overrides={"scf": {"kpoints_distance": 1.0}},
    )
    builder = DfptWorkChain.get_builder_from_field_response(source, ph_code)
    assert builder.ph.ph.parameters["INPUTPH"]["trans"] is True
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    modes = results["gamma_phonons"]

    ph_calculation = [c for c in node.called_descendants if c.process_type.endswith("quantumespresso.ph")][-1]
    retrieved = ph_calculation.outputs.retrieved
    name = [n for n in retrieved.base.repository.list_object_names("DYN_MAT") if not n.endswith("-0")][0]
    (tmp_path / "dyn").write_text(retrieved.base.repository.get_object_content(f"DYN_MAT/{name}", mode="r"))
    # asr='no': the same matrix, the same numbers. asr='simple' corrects the diagonal blocks where the workchain
    # projects out the translations: the same rule to first order (measured: 0.016 cm⁻¹ apart at 351 cm⁻¹).
    for asr, key, ir_key, tolerance in (("no", "wavenumbers_raw", None, 0.01),
                                        ("simple", "wavenumbers", "ir_intensities", 0.05)):
        output = subprocess.run(["dynmat.x"], input=f"&input fildyn='dyn', asr='{asr}' /\n", cwd=tmp_path,
                                capture_output=True, text=True, check=True, timeout=60).stdout
        wavenumbers, intensities = dynmat_table(output)
        order = np.argsort(modes.get_array(key))
        assert modes.get_array(key)[order] == pytest.approx(wavenumbers, abs=tolerance)
        if ir_key:
            assert modes.get_array(ir_key)[order] == pytest.approx(intensities, rel=1e-3, abs=1e-4)
    optical = ~modes.get_array("acoustic")
    assert np.all(modes.get_array("wavenumbers")[optical] > 300)  # AlAs TO ≈ 360 cm⁻¹
    epsilon_inf = results["dielectric_tensor"].get_array("dielectric_tensor")
    epsilon_static = results["static_dielectric_tensor"].get_array("static_dielectric_tensor")
    assert np.all(np.diag(epsilon_static) > np.diag(epsilon_inf))


@pytest.mark.aiida
@pytest.mark.dft
def test_dfpt_without_phonons_computes_no_phonon(alas_structure, pw_code, ph_code, alas_lda_family):
    """phonons=False: ph.x (real, AlAs LDA 2x2x2) computes only the electric-field perturbation: ε∞ and Z*, no
    atomic-displacement representation, no Γ modes."""
    from aiida.engine import run_get_node

    from polmodel.workflows.dfpt import DfptWorkChain
    from polmodel.workflows.field_response import FieldResponseWorkChain

    source = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, alas_structure, protocol="fast", pseudo_family=alas_lda_family.label,
        overrides={"scf": {"kpoints_distance": 1.0}},
    )
    builder = DfptWorkChain.get_builder_from_field_response(source, ph_code, phonons=False)
    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    ph_calculation = [c for c in node.called_descendants if c.process_type.endswith("quantumespresso.ph")][-1]
    output = ph_calculation.outputs.retrieved.base.repository.get_object_content("aiida.out", mode="r")
    assert "Electric Fields Calculation" in output
    assert "Representation #" not in output and "Diagonalizing the dynamical matrix" not in output
    assert "ldisp = .true." not in ph_calculation.base.repository.get_object_content("aiida.in", mode="r").lower()
    assert "gamma_phonons" not in results
    born = results["born_effective_charges"].get_array("born_effective_charges")
    assert born.shape == (2, 3, 3) and np.abs(born).max() > 0.1
    assert np.all(np.diag(results["dielectric_tensor"].get_array("dielectric_tensor")) > 1.0)
