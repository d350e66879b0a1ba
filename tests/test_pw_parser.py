"""PolPwParser and its pure parse_* functions on recorded real pw.x 6.7 outputs (tests/data/pw, LDA Debian UPFs).

Units and Cartesian-ness are checked against pw.x itself: its enthalpy at ±ε must give back its own dipole, the
ionic dipole must be Σ Z_i r_i of the input positions, and α must be symmetric in a hexagonal cell.
"""
import numpy as np
import pytest

from polmodel.data import units
from polmodel.plugins import pw_parser
from fixtures_workflows import read_recorded_input, recorded_file

WURTZITE_FIELD_RY = 0.001
VALENCE = {"Al": 3.0, "As": 5.0}


def stdout(case):
    return recorded_file(case, "aiida.out").decode()


# --- pure functions -----------------------------------------------------------------------------------------------


def test_band_edges_of_insulator():
    edges = pw_parser.parse_band_edges(stdout("wurtzite_scf"))
    assert edges == {"highest_occupied_level": 4.8376, "lowest_unoccupied_level": 6.6208}


def test_band_edges_absent_without_empty_bands():
    # lelfield runs compute occupied bands only: pw.x prints the highest occupied level alone.
    edges = pw_parser.parse_band_edges(stdout("wurtzite_lelfield_efxp"))
    assert edges is None or edges["lowest_unoccupied_level"] is None
    assert pw_parser.parse_band_edges("no band information here") is None


def test_finite_field_dipole_is_minus_enthalpy_derivative():
    """d = -ΔE/Δε from pw.x's own total energies at ±ε, along x and along y of a hexagonal cell."""
    for plus, minus, axis in (("efxp", "efxm", 0), ("efyp", "efym", 1)):
        energies = []
        dipoles = []
        for case in (plus, minus):
            text = stdout(f"wurtzite_lelfield_{case}")
            energies.append(float([line for line in text.splitlines() if line.startswith("!")][-1].split()[-2]))
            dipoles.append(np.array(pw_parser.parse_finite_field_dipoles(text)["dipole"]))
        delta_field = 2 * units.field_ry_to_v_per_angstrom(WURTZITE_FIELD_RY)  # V/Å
        delta_energy = (energies[0] - energies[1]) * units.RYDBERG_EV  # eV
        central_dipole = 0.5 * (dipoles[0] + dipoles[1])[axis]  # e·Å
        assert central_dipole == pytest.approx(-delta_energy / delta_field, rel=1e-6)


def test_ionic_dipole_is_cartesian_sum_of_charges_times_positions():
    _, atoms = read_recorded_input("wurtzite_lelfield_efxp")
    parsed = pw_parser.parse_finite_field_dipoles(stdout("wurtzite_lelfield_efxp"))
    charges = np.array([VALENCE[s] for s in atoms.get_chemical_symbols()])
    expected = (charges[:, None] * atoms.positions).sum(axis=0)
    assert units.dipole_ry_to_e_angstrom(np.array(parsed["ionic_dipole_ry"])) == pytest.approx(expected, rel=1e-6)


def test_polarizability_symmetric_and_isotropic_in_plane_in_hexagonal_cell():
    """If pw.x's electronic dipole were not Cartesian in a hexagonal cell, α_yx would be ~-0.4 α_xx."""
    def electronic(case):
        return np.array(pw_parser.parse_finite_field_dipoles(stdout(f"wurtzite_lelfield_{case}"))["electronic_dipole_ry"])

    alpha_x = (electronic("efxp") - electronic("efxm")) / (2 * WURTZITE_FIELD_RY)
    alpha_y = (electronic("efyp") - electronic("efym")) / (2 * WURTZITE_FIELD_RY)
    assert abs(alpha_x[1] - alpha_y[0]) < 1e-3 * alpha_x[0]          # α_yx = α_xy
    assert abs(alpha_x[1]) < 0.02 * alpha_x[0]                       # off-diagonal ≈ 0 (hexagonal symmetry)
    assert alpha_y[1] == pytest.approx(alpha_x[0], rel=0.02)         # α_yy ≈ α_xx
    assert alpha_x[0] > 0


def test_berry_phase_dipole_along_lattice_vector():
    cell = np.array([[3.98, 0.0, 0.0], [-1.99, 3.44678, 0.0], [0.0, 0.0, 6.55]])
    dipole, quantum = pw_parser.berry_phase_dipole(0.25, 1.0, cell, 2)
    assert dipole == pytest.approx(0.25 * cell[1])
    assert quantum == pytest.approx(cell[1])
    with pytest.raises(ValueError, match="gdir"):
        pw_parser.berry_phase_dipole(0.25, 1.0, cell, 4)


def test_berry_phase_xml_of_hexagonal_cell_refers_to_lattice_vector():
    berry = pw_parser.parse_berry_phase_xml(recorded_file("wurtzite_berry_gdir2", "data-file-schema.xml"))
    _, atoms = read_recorded_input("wurtzite_berry_gdir2")
    a2 = atoms.cell[1]
    assert berry["direction"] == pytest.approx(a2 / np.linalg.norm(a2), abs=1e-5)
    assert berry["phase_modulus"] == 1.0   # odd valence charges (Al 3): pw.x's total phase is mod 1
    assert berry["total_phase"] == pytest.approx(berry["ionic_phase"] + berry["electronic_phase"], abs=1e-8)
    # The polarization pw.x prints, in (e/Omega).bohr, is the phase times |a2|.
    text = stdout("wurtzite_berry_gdir2")
    printed = float(text.split("(e/Omega).bohr")[0].split("P =")[-1].split("(mod")[0])
    assert berry["total_phase"] * np.linalg.norm(a2) / units.BOHR_ANGSTROM == pytest.approx(printed, abs=2e-7)


def test_berry_phase_branch_agrees_with_zero_field_lelfield_dipole():
    """The Berry dipole along c and the lelfield dipole at zero field differ by whole quanta (same string density)."""
    from polmodel.workflows.response_functions import fold_onto_branch

    _, atoms = read_recorded_input("wurtzite_lelfield_ef0")
    lelfield = np.array(pw_parser.parse_finite_field_dipoles(stdout("wurtzite_lelfield_ef0"))["dipole"])
    quantum = np.array(atoms.cell)  # mod 1 in every direction for odd valence charges
    coefficients = np.linalg.solve(quantum.T, lelfield)
    # In-plane the cell is non-polar: the lelfield dipole sits on a whole quantum; along c it is polar.
    assert coefficients[:2] - np.round(coefficients[:2]) == pytest.approx(0, abs=1e-5)
    folded = fold_onto_branch(lelfield, np.zeros(3), quantum)
    assert np.linalg.norm(folded) < 0.5 * np.linalg.norm(quantum[2])


def test_empty_electric_field_is_stripped():
    content = recorded_file("alas_scf_lberry", "data-file-schema.xml")
    assert b"<electric_field/>" in content
    cleaned = pw_parser.strip_empty_electric_field(content)
    assert b"<electric_field/>" not in cleaned and len(content) - len(cleaned) == len(b"<electric_field/>")


def test_efield_from_parameters():
    field = pw_parser.efield_from_parameters({"ELECTRONS": {"efield_cart": [0.001, 0.0, -0.002]}})
    assert field == pytest.approx([0.0363609, 0.0, -0.0727218], rel=1e-4)
    assert pw_parser.efield_from_parameters({}) == [0.0, 0.0, 0.0]


# --- the parser on stored nodes -------------------------------------------------------------------------------------


@pytest.mark.aiida
def test_parser_scf_with_lberry_no_longer_fails(parse_pw_case):
    """aiida-quantumespresso 5.1's own PwParser exits 350 here; PolPwParser parses it."""
    results, calcfunction = parse_pw_case("alas_scf_lberry")
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    assert results["output_parameters"]["energy"] == pytest.approx(-16.96746283 * units.RYDBERG_EV, abs=1e-4)


@pytest.mark.aiida
def test_stock_parser_fails_on_scf_with_lberry(generate_pw_calc_node):
    """Documents the gap PolPwParser closes; if aiida-quantumespresso fixes it, this test says so."""
    from aiida_quantumespresso.parsers.pw import PwParser

    _, calcfunction = PwParser.parse_from_node(generate_pw_calc_node("alas_scf_lberry"), store_provenance=False)
    assert calcfunction.exit_status == 350


@pytest.mark.aiida
def test_parser_lelfield_dipole_in_e_angstrom(parse_pw_case):
    results, calcfunction = parse_pw_case("wurtzite_lelfield_efyp")
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    finite_field = results["output_parameters"]["finite_field"]
    assert finite_field["efield"] == pytest.approx([0.0, units.field_ry_to_v_per_angstrom(WURTZITE_FIELD_RY), 0.0])
    raw = np.array(finite_field["electronic_dipole_ry"]) + np.array(finite_field["ionic_dipole_ry"])
    assert finite_field["dipole"] == pytest.approx(raw * units.RY_DIPOLE_E_ANGSTROM)
    # aiida-quantumespresso's "electronic_dipole_cartesian_axes" (from the XML) is NOT Cartesian in this hexagonal
    # cell: it holds pw.x's per-lattice-vector el_pol(j); Σ_j el_pol(j) â_j gives back the Cartesian stdout value.
    stock = results["output_trajectory"].get_array("electronic_dipole_cartesian_axes")[-1]
    assert not np.allclose(stock, finite_field["electronic_dipole_ry"], atol=1e-3)
    _, atoms = read_recorded_input("wurtzite_lelfield_efyp")
    unit_vectors = atoms.cell / np.linalg.norm(atoms.cell, axis=1)[:, None]
    assert stock @ unit_vectors == pytest.approx(finite_field["electronic_dipole_ry"], abs=1e-8)
    # The energy aiida-quantumespresso reports is the electric enthalpy pw.x prints.
    assert results["output_parameters"]["energy"] == pytest.approx(-34.05226277 * units.RYDBERG_EV, abs=1e-4)


@pytest.mark.aiida
def test_parser_berry_phase_nscf(parse_pw_case):
    results, calcfunction = parse_pw_case("wurtzite_berry_gdir2")
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    berry = results["output_parameters"]["berry_phase"]
    _, atoms = read_recorded_input("wurtzite_berry_gdir2")
    assert berry["gdir"] == 2
    assert berry["quantum"] == pytest.approx(atoms.cell[1])
    assert berry["dipole"] == pytest.approx(berry["total_phase"] * atoms.cell[1])


@pytest.mark.aiida
def test_parser_band_edges(parse_pw_case):
    results, calcfunction = parse_pw_case("wurtzite_scf")
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    edges = results["output_parameters"]["band_edges"]
    assert edges["lowest_unoccupied_level"] - edges["highest_occupied_level"] == pytest.approx(1.7832)


# --- band edges of a metal (recorded: 2-atom Al, fixed occupations, 6x6x6, 15 Ry, 30 scf steps, not converged) -------


def test_band_edges_from_xml_agree_with_stdout():
    from_xml = pw_parser.parse_band_edges_xml(recorded_file("wurtzite_scf", "data-file-schema.xml"))
    from_stdout = pw_parser.parse_band_edges(stdout("wurtzite_scf"))
    for key in from_stdout:
        assert from_xml[key] == pytest.approx(from_stdout[key], abs=1e-4)  # stdout prints 4 decimals


def test_unconverged_metal_has_band_edges_only_in_its_xml():
    """pw.x prints no band energies when the scf does not converge, but its XML holds both levels: LUMO < HOMO."""
    assert "convergence NOT achieved" in stdout("al_metal_scf_unconverged")
    assert pw_parser.parse_band_edges(stdout("al_metal_scf_unconverged")) is None
    edges = pw_parser.parse_band_edges_xml(recorded_file("al_metal_scf_unconverged", "data-file-schema.xml"))
    assert edges["lowest_unoccupied_level"] - edges["highest_occupied_level"] < -1.0


@pytest.mark.aiida
def test_parser_gives_band_edges_of_an_unconverged_metal(parse_pw_case):
    from aiida_quantumespresso.calculations.pw import PwCalculation

    results, calcfunction = parse_pw_case("al_metal_scf_unconverged")
    assert calcfunction.exit_status == PwCalculation.exit_codes.ERROR_ELECTRONIC_CONVERGENCE_NOT_REACHED.status
    edges = results["output_parameters"]["band_edges"]
    # the XML's <highestOccupiedLevel> 0.6564018342 and <lowestUnoccupiedLevel> 0.2695127451 Hartree
    assert edges["highest_occupied_level"] == pytest.approx(0.6564018342 * 27.211386, abs=1e-5)
    assert edges["lowest_unoccupied_level"] == pytest.approx(0.2695127451 * 27.211386, abs=1e-5)
