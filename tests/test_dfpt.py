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
