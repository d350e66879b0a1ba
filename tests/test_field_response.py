"""FieldResponseWorkChain: input validation, handlers and branches with fake children (aiida-quantumespresso style),
the derivation functions, and one real end-to-end run on rocksalt MgO checked against ph.x and pw.x's energies."""
import numpy as np
import pytest

from polmodel.data import units
from polmodel.workflows import response_functions as rf
from polmodel.workflows.field_response import pw_runs_per_label

pytestmark = pytest.mark.aiida


# --- pure derivation functions ---------------------------------------------------------------------------------


def test_fold_onto_branch_removes_whole_quanta_in_a_hexagonal_basis():
    quantum = np.array([[3.98, 0.0, 0.0], [-1.99, 3.44678, 0.0], [0.0, 0.0, 6.55]])
    reference = np.array([0.1, -0.2, 0.3])
    shifted = reference + np.array([0.01, 0.02, -0.03]) + np.array([2, -1, 3]) @ quantum
    assert rf.fold_onto_branch(shifted, reference, quantum) == pytest.approx(reference + [0.01, 0.02, -0.03])


# pw.x 6.7 on a 300 K MD frame of BaTiO3 (demo, 'fast' protocol, 0.0364 V/Å): the six lelfield dipoles and the
# zero-field Berry dipole (e·Å), quantum 8 e·Å (2e·R) along each axis of the 4 Å cubic cell.
MD_FRAME_FIELD_DIPOLES = {
    "x_plus": [46.725416680935, 56.972381521589, 29.739431553056],
    "x_minus": [46.655140237057, 56.972509596398, 29.725654164378],
    "y_plus": [46.690211963344, 57.00745620269, 29.728674176536],
    "y_minus": [46.690358773999, 56.937463500375, 29.736346069444],
    "z_plus": [46.697142666735, 56.96864019939, 29.770435401446],
    "z_minus": [46.683379927749, 56.976296733357, 29.694588050933],
}
MD_FRAME_BERRY_DIPOLE = [2.688200865719, -3.0430018599106, 1.737545301617]


def test_berry_dipole_half_a_quantum_off_the_field_dipoles_lands_on_their_centre():
    """The Berry dipole sits e·R (half the printed quantum) away from the lelfield branch; before the fix the
    zero-field reference landed 4 e·Å off and split the ±ε dipoles over two branches (ε∞ ≈ −307)."""
    quantum = 8.0 * np.eye(3)
    dipoles, shifts = rf.field_dipoles_on_one_branch(MD_FRAME_FIELD_DIPOLES, quantum)
    assert all(np.allclose(shift, 0) for shift in shifts.values())
    reference = rf.common_branch(MD_FRAME_BERRY_DIPOLE, dipoles, quantum, 4.0 * np.eye(3))
    assert reference == pytest.approx([46.688, 56.957, 29.738], abs=2e-3)
    alpha, _ = rf.polarizability_from_dipoles([dipoles[f"{a}_plus"] for a in "xyz"],
                                              [dipoles[f"{a}_minus"] for a in "xyz"], 0.0364)
    assert np.diag(alpha) == pytest.approx([0.9654, 0.9615, 1.0418], abs=1e-3)


def test_berry_dipole_snap_respects_the_valence_charge_parity():
    """Half a printed quantum is a lattice translation e·R only where pw.x prints 2e·R (all valence charges even).
    With an odd valence charge pw.x prints e·R: a Berry dipole half of that away is no branch and is refused,
    as is one a quarter quantum away in the even case; whole e·R steps are still snapped in both."""
    cell = 4.0 * np.eye(3)
    dipoles, _ = rf.field_dipoles_on_one_branch(MD_FRAME_FIELD_DIPOLES, 8.0 * np.eye(3))
    centre = np.mean(list(dipoles.values()), axis=0)
    # odd parity: printed quantum e·R = 4 e·Å
    assert rf.common_branch(centre + [4.0, -8.0, 12.0], dipoles, 4.0 * np.eye(3), cell) == pytest.approx(centre)
    with pytest.raises(ValueError, match="parity"):
        rf.common_branch(centre + [2.0, 0.0, 0.0], dipoles, 4.0 * np.eye(3), cell)
    # even parity: printed quantum 2e·R = 8 e·Å; a quarter of it is no lattice translation
    with pytest.raises(ValueError, match="parity"):
        rf.common_branch(centre + [0.0, 2.0, 0.0], dipoles, 8.0 * np.eye(3), cell)
    # a printed quantum that is neither e·R nor 2e·R of the cell
    with pytest.raises(ValueError, match="only e·R"):
        rf.common_branch(centre, dipoles, 6.0 * np.eye(3), cell)


def test_a_field_dipole_reported_a_quantum_away_is_folded_and_its_shift_returned():
    quantum = 8.0 * np.eye(3)
    moved = dict(MD_FRAME_FIELD_DIPOLES)
    moved["y_minus"] = list(np.array(moved["y_minus"]) + [0.0, -8.0, 16.0])
    dipoles, shifts = rf.field_dipoles_on_one_branch(moved, quantum)
    assert dipoles["y_minus"] == pytest.approx(MD_FRAME_FIELD_DIPOLES["y_minus"])
    assert shifts["y_minus"] == pytest.approx([0.0, 8.0, -16.0])
    assert shifts["x_plus"] == pytest.approx([0.0, 0.0, 0.0])


def test_born_charges_index_order_is_force_derivative_by_field():
    # Atom 0 feels F_y = 2 ε_x: Z*[0, x, y] = 2, everything else zero.
    magnitude = 0.01
    zero = np.zeros((2, 3))
    plus = [zero.copy(), zero.copy(), zero.copy()]
    minus = [zero.copy(), zero.copy(), zero.copy()]
    plus[0][0, 1], minus[0][0, 1] = 2 * magnitude, -2 * magnitude
    born = rf.born_charges_from_forces(plus, minus, magnitude)
    expected = np.zeros((2, 3, 3))
    expected[0, 0, 1] = 2.0
    assert born == pytest.approx(expected)
    assert rf.acoustic_sum_rule_residual(born) == pytest.approx(2.0)


def test_polarizability_and_dielectric_from_dipoles():
    alpha = np.array([[1.0, 0.1, 0.0], [0.1, 2.0, 0.0], [0.0, 0.0, 3.0]])
    magnitude = 0.02
    plus = [alpha[:, b] * magnitude for b in range(3)]
    minus = [-alpha[:, b] * magnitude for b in range(3)]
    symmetric, raw = rf.polarizability_from_dipoles(plus, minus, magnitude)
    assert raw == pytest.approx(alpha) and symmetric == pytest.approx(alpha)
    volume = 50.0
    dielectric = rf.dielectric_from_polarizability(alpha, volume)
    assert dielectric[2, 2] == pytest.approx(1 + 3.0 / (units.EPSILON0_E_PER_V_ANGSTROM * volume))


def test_unphysical_dielectric_tensor_is_named():
    assert rf.dielectric_defect(np.diag([5.4, 5.3, 5.35])) is None
    # the ε∞ a ±ε pair split over two branches gave (demo, before the branch fix)
    assert "not all positive" in rf.dielectric_defect(np.diag([-306.97, 3.708, -306.70]))
    assert "non-finite" in rf.dielectric_defect(np.full((3, 3), np.nan))


def test_stress_conversion_follows_ase_sign():
    """pw.x printed P = -26.19 kbar for this AlAs cell (a cell that wants to shrink); ASE's stress is then positive,
    as ase.io.espresso reads it (-σ_pw.x)."""
    import ase.units

    stress = rf.stress_from_pw(np.eye(3) * -2.619)  # GPa, pw.x sign
    assert stress == pytest.approx(np.eye(3) * 2.619 * ase.units.GPa, rel=1e-6)
    assert stress[0, 0] > 0


def test_string_extrapolation_recovers_the_dense_limit():
    dense_limit, slope = np.diag([2.0, 3.0, 4.0]), 5.0
    meshes = ([8, 8, 8], [6, 6, 7])

    def on(mesh):
        return dense_limit - slope * rf.string_density_error(mesh) * np.eye(3)

    assert rf.extrapolate_to_dense_strings(on(meshes[0]), on(meshes[1]), *meshes) == pytest.approx(dense_limit)
    # Measured with pw.x 6.7 on MgO (table below): ε∞ 2.926 at 6x6x6 and 2.994 at 8x8x8; ph.x converged: 3.094.
    extrapolated = 1.0 + rf.extrapolate_to_dense_strings(1.994, 1.926, [8] * 3, [6] * 3)
    assert extrapolated == pytest.approx(3.081, abs=1e-3)
    assert abs(extrapolated - 3.094) / 3.094 < 0.005
    with pytest.raises(ValueError, match="not coarser"):
        rf.extrapolate_to_dense_strings(1.0, 1.0, [6, 6, 6], [6, 6, 6])


def test_coarse_mesh_scales_every_direction_and_keeps_two_points():
    assert rf.coarse_mesh([8, 8, 8], 0.75) == [6, 6, 6]
    assert rf.coarse_mesh([4, 4, 6], 0.5) == [2, 2, 3]
    assert rf.coarse_mesh([2, 2, 3], 0.5) == [2, 2, 2]


def test_zener_limit():
    from polmodel.workflows.field_response import zener_field_limit

    cell = np.eye(3) * 4.0
    assert zener_field_limit(2.0, cell, [4, 4, 5]) == pytest.approx(2.0 / 20.0)


# --- validation of inputs -----------------------------------------------------------------------------------------


@pytest.fixture
def field_response_inputs(alas_structure, pw_code, alas_lda_family):
    """Valid inputs of a FieldResponseWorkChain on AlAs (not run by the tests that use them directly)."""
    from aiida import orm

    from polmodel.workflows.field_response import FieldResponseWorkChain

    def factory(structure=None, code=None, overrides=None):
        builder = FieldResponseWorkChain.get_builder_from_protocol(
            code or pw_code, structure or alas_structure, protocol="fast", pseudo_family=alas_lda_family.label,
            overrides=overrides or {"scf": {"kpoints_distance": 0.5}},
        )
        return builder

    factory.family_label = alas_lda_family.label
    return factory


def _validate(builder):
    from polmodel.workflows.response_inputs import validate_inputs

    inputs = builder._inputs(prune=True)
    return validate_inputs(inputs, None)


def test_valid_inputs_pass(field_response_inputs):
    builder = field_response_inputs()
    assert _validate(builder) is None
    parameters = builder.scf.pw.parameters.get_dict()
    assert parameters["SYSTEM"]["occupations"] == "fixed"
    assert parameters["SYSTEM"]["ecutwfc"] > 0 and parameters["ELECTRONS"]["conv_thr"] > 0
    assert builder.field_magnitude.value == pytest.approx(0.0364)


def test_overlapping_atoms_refused(field_response_inputs, alas_structure):
    from aiida import orm

    structure = orm.StructureData(cell=alas_structure.cell)
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")
    structure.append_atom(position=(0.2, 0.0, 0.0), symbols="As")
    with pytest.raises(ValueError, match="overlapping atoms"):
        field_response_inputs(structure=structure)
    builder = field_response_inputs()
    builder.structure = structure
    assert "overlapping atoms" in _validate(builder)


def test_missing_pseudopotential_refused(field_response_inputs, alas_structure):
    from aiida import orm

    builder = field_response_inputs()
    builder.scf.pw.pseudos = {"Al": builder.scf.pw.pseudos["Al"]}
    assert "no pseudopotential for kind(s) As" in _validate(builder)
    # A family that lacks an element says so when the builder is made.
    structure = orm.StructureData(cell=alas_structure.cell)
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")
    structure.append_atom(position=(1.4, 1.4, 1.4), symbols="Ga")
    with pytest.raises(ValueError, match="lacks a pseudopotential"):
        field_response_inputs(structure=structure)


def test_wrong_code_refused(field_response_inputs, ph_code):
    with pytest.raises(ValueError, match="quantumespresso.pw"):
        field_response_inputs(code=ph_code)
    builder = field_response_inputs()
    builder.scf.pw.code = ph_code
    assert "quantumespresso.pw" in _validate(builder)


def test_string_extrapolation_scale_must_lie_between_0_and_1(field_response_inputs):
    builder = field_response_inputs(overrides={"scf": {"kpoints_distance": 0.5}, "string_extrapolation_scale": 1.5})
    assert builder.string_extrapolation_scale.value == pytest.approx(1.5)
    assert "strictly between 0 and 1" in _validate(builder)


def test_smearing_refused(field_response_inputs):
    builder = field_response_inputs(overrides={"scf": {"pw": {"parameters": {"SYSTEM": {"occupations": "smearing"}}}}})
    assert "occupations='fixed'" in _validate(builder)


# --- handlers and branches with fake children ------------------------------------------------------------------------


@pytest.fixture
def started_workchain(field_response_inputs, generate_workchain):
    """A FieldResponseWorkChain on AlAs after `setup`, ready for fake children."""
    from polmodel.workflows.field_response import FieldResponseWorkChain

    def factory(field_magnitude=0.0364, max_field_halvings=3, string_extrapolation_scale=None):
        from aiida import orm

        builder = field_response_inputs()
        builder.field_magnitude = orm.Float(field_magnitude)
        builder.max_field_halvings = orm.Int(max_field_halvings)
        if string_extrapolation_scale is not None:
            builder.string_extrapolation_scale = orm.Float(string_extrapolation_scale)
        process = generate_workchain(FieldResponseWorkChain, builder._inputs(prune=True))
        process.ctx.setup_result = process.setup()
        return process

    return factory


def _zero_field(generate_fake_pw_base, homo, lumo):
    return generate_fake_pw_base(
        output_parameters={"band_edges": {"highest_occupied_level": homo, "lowest_unoccupied_level": lumo}}
    )


def test_metal_refused_before_field_runs(started_workchain, generate_fake_pw_base):
    process = started_workchain()
    process.ctx.zero_field = _zero_field(generate_fake_pw_base, 6.1, 6.05)  # bands overlap: a metal
    result = process.inspect_zero_field()
    assert result.status == process.exit_codes.ERROR_NOT_AN_INSULATOR.status
    assert "metallic" in result.message


def test_missing_band_edges_is_an_error(started_workchain, generate_fake_pw_base):
    process = started_workchain()
    process.ctx.zero_field = generate_fake_pw_base(output_parameters={})
    assert process.inspect_zero_field().status == process.exit_codes.ERROR_BAND_EDGES_MISSING.status


def test_failed_zero_field_scf(started_workchain, generate_fake_pw_base):
    process = started_workchain()
    process.ctx.zero_field = generate_fake_pw_base(exit_status=300)
    assert process.inspect_zero_field().status == process.exit_codes.ERROR_ZERO_FIELD_SCF_FAILED.status


def test_insulator_keeps_a_field_below_the_zener_limit(started_workchain, generate_fake_pw_base):
    process = started_workchain(field_magnitude=0.0364)
    process.ctx.zero_field = _zero_field(generate_fake_pw_base, 4.6, 6.0)
    assert process.inspect_zero_field() is None
    assert process.ctx.field_magnitude == pytest.approx(0.0364)


def test_field_above_zener_limit_is_halved(started_workchain, generate_fake_pw_base):
    from polmodel.workflows.field_response import zener_field_limit

    process = started_workchain(field_magnitude=0.2)
    process.ctx.zero_field = _zero_field(generate_fake_pw_base, 4.6, 6.0)
    assert process.inspect_zero_field() is None
    limit = 0.5 * zener_field_limit(1.4, process.inputs.structure.cell, process.ctx.mesh)
    assert process.ctx.field_magnitude <= limit < 2 * process.ctx.field_magnitude
    assert process.ctx.field_halvings >= 1


def test_zener_exit_when_halvings_run_out(started_workchain, generate_fake_pw_base):
    process = started_workchain(field_magnitude=0.2, max_field_halvings=2)
    process.ctx.zero_field = _zero_field(generate_fake_pw_base, 4.6, 4.75)  # gap 0.15 eV: insulating, tiny limit
    result = process.inspect_zero_field()
    assert result.status == process.exit_codes.ERROR_ZENER_LIMIT.status


def _set_field_children(process, generate_fake_pw_base, failing, **failure):
    """Fake finished children for every field run; the context keys in `failing` fail with `failure`."""
    for key in process._field_run_keys():
        process.ctx[key] = generate_fake_pw_base(**failure) if key in failing else generate_fake_pw_base()


def test_unconverged_field_run_halves_field_and_reruns_all(started_workchain, generate_fake_pw_base):
    process = started_workchain(field_magnitude=0.0364)
    _set_field_children(process, generate_fake_pw_base, {"field_z_plus"}, exit_status=401, calculation_exit_status=410)
    assert process.inspect_field_runs() is None
    assert process.ctx.field_magnitude == pytest.approx(0.0182)
    assert process.should_run_field_runs()  # all six are rerun at the halved field


def test_field_breakdown_exit_after_bounded_halvings(started_workchain, generate_fake_pw_base):
    process = started_workchain(field_magnitude=0.0364, max_field_halvings=1)
    _set_field_children(process, generate_fake_pw_base, {"field_x_minus"}, exit_status=300, calculation_exit_status=410)
    assert process.inspect_field_runs() is None
    _set_field_children(process, generate_fake_pw_base, {"field_x_minus"}, exit_status=300, calculation_exit_status=410)
    result = process.inspect_field_runs()
    assert result.status == process.exit_codes.ERROR_FIELD_RUNS_NOT_CONVERGED.status


def test_other_field_failures_are_not_retried(started_workchain, generate_fake_pw_base):
    process = started_workchain()
    _set_field_children(process, generate_fake_pw_base, {"field_y_plus"}, exit_status=300, calculation_exit_status=305)
    result = process.inspect_field_runs()
    assert result.status == process.exit_codes.ERROR_FIELD_RUN_FAILED.status
    assert "y_plus" in result.message


def test_field_runs_use_the_requested_berry_cycles(field_response_inputs, generate_workchain):
    from polmodel.workflows.field_response import FieldResponseWorkChain

    builder = field_response_inputs(overrides={"scf": {"kpoints_distance": 0.5, "pw": {"parameters": {"CONTROL": {"nberrycyc": 1}}}}})
    process = generate_workchain(FieldResponseWorkChain, builder._inputs(prune=True))
    process.setup()
    assert process.ctx.nberrycyc == 1
    assert "nberrycyc" not in process.ctx.pw_parameters.get("CONTROL", {})  # only field runs get it


def test_string_extrapolation_adds_coarse_field_runs(started_workchain, generate_fake_pw_base):
    process = started_workchain(string_extrapolation_scale=0.75)
    assert process.ctx.setup_result is None
    assert process.ctx.mesh == [4, 4, 4] and process.ctx.mesh_coarse == [3, 3, 3]
    assert process.ctx.field_kpoints["coarse_field"].get_kpoints_mesh()[0] == [3, 3, 3]
    keys = process._field_run_keys()
    assert len(keys) == 12 and "coarse_field_z_minus" in keys and "field_z_minus" in keys
    # a coarse-mesh breakdown halves the field for all twelve runs: central differences need one |ε|
    _set_field_children(process, generate_fake_pw_base, {"coarse_field_x_plus"}, exit_status=401,
                        calculation_exit_status=410)
    assert process.inspect_field_runs() is None
    assert process.ctx.field_magnitude == pytest.approx(0.0182) and process.should_run_field_runs()


def test_mesh_too_coarse_to_extrapolate(started_workchain):
    process = started_workchain(string_extrapolation_scale=0.9)  # round(0.9 * 4) = 4: nothing coarser
    assert process.ctx.setup_result.status == process.exit_codes.ERROR_MESH_TOO_COARSE_TO_EXTRAPOLATE.status


def test_all_field_runs_ok(started_workchain, generate_fake_pw_base):
    process = started_workchain()
    _set_field_children(process, generate_fake_pw_base, set())
    assert process.inspect_field_runs() is None
    assert not process.should_run_field_runs()


# --- label tiers, field magnitudes and the sum rule (no DFT) ----------------------------------------------------------


def test_asr_exact_labels_keep_the_raw_residual():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(5, 3, 3))
    raw[0] += 0.3  # a DFT-like residual of 1.5 e in every component
    corrected = rf.enforce_acoustic_sum_rule(raw)
    assert np.abs(corrected.sum(axis=0)).max() < 1e-12
    # only the per-component mean moves: differences between atoms are the raw ones
    assert corrected - corrected[0] == pytest.approx(raw - raw[0], abs=1e-12)
    assert rf.acoustic_sum_rule_residual(raw) == pytest.approx(np.abs(raw.sum(axis=0)).max())


def _fake_run(forces, dipole, efield):
    """Unstored output_parameters / output_trajectory of one field run, as PolPwParser writes them."""
    from aiida import orm

    parameters = orm.Dict({"energy": -100.0, "finite_field": {"dipole": list(dipole), "efield": list(efield)}})
    trajectory = orm.ArrayData()
    trajectory.set_array("forces", np.asarray(forces, dtype=float)[None])
    return parameters, trajectory


def test_field_response_calcfunction_outputs_asr_exact_charges_and_raw_residual(alas_structure):
    """Three atoms' worth of ±ε forces with a net force (the k-point error of DFT Born charges)."""
    from aiida import orm

    rng = np.random.default_rng(1)
    structure = orm.StructureData(cell=alas_structure.cell)
    for position, symbol in (((0, 0, 0), "Al"), ((1.4, 1.4, 1.4), "As"), ((2.8, 0, 2.8), "As")):
        structure.append_atom(position=position, symbols=symbol)
    magnitude = 0.02
    quantum = 2 * np.array(structure.cell)
    polarization = orm.ArrayData({"polarization_quantum": quantum, "dipole": np.zeros(3)})
    inputs, forces = {}, {}
    for label in rf.FIELD_LABELS:
        forces[label] = rng.normal(size=(3, 3))
        field = rf.field_vector(label, magnitude)
        inputs[f"parameters_{label}"], inputs[f"trajectory_{label}"] = _fake_run(forces[label], 0.5 * field, field)
    outputs = rf.compute_field_response(structure, polarization, orm.Float(magnitude), **inputs)
    born = outputs["born_effective_charges"].get_array("born_effective_charges")
    raw = outputs["born_effective_charges"].get_array("born_effective_charges_raw")
    for a, axis in enumerate("xyz"):
        assert raw[:, a, :] == pytest.approx((forces[f"{axis}_plus"] - forces[f"{axis}_minus"]) / (2 * magnitude))
    assert np.abs(born.sum(axis=0)).max() < 1e-12                      # labels obey the sum rule
    assert outputs["asr_residual"].value == pytest.approx(np.abs(raw.sum(axis=0)).max())  # the raw residual
    assert outputs["asr_residual"].value > 1.0
    assert outputs["polarizability"].get_array("polarizability") == pytest.approx(0.5 * np.eye(3))


def test_axis_field_triple_finds_the_smallest_complete_triple():
    vectors = [[0, 0, 0.1], [0.03, 0, 0], [0, 0.03, 0], [0.1, 0, 0], [0, 0, 0.03], [0.02, 0.02, 0], [0, 0.1, 0]]
    field, indices = rf.axis_field_triple(vectors)
    assert field == pytest.approx(0.03) and indices == [1, 2, 4]
    assert rf.axis_field_triple([[0.03, 0, 0], [0, 0.03, 0], [0, 0, 0.05]]) is None
    assert rf.axis_field_triple([[0.03, 0, 0], [0, 0.03, 0], [0, 1e-4, 0.03]]) is None  # not along an axis


def test_one_sided_response_is_a_forward_difference():
    born = rf.born_charges_one_sided([np.full((2, 3), 0.1), np.zeros((2, 3)), np.zeros((2, 3))], np.zeros((2, 3)), 0.05)
    assert born[:, 0, :] == pytest.approx(np.full((2, 3), 2.0)) and np.all(born[:, 1:] == 0)
    alpha, raw = rf.polarizability_one_sided([[1.1, 0, 0], [0, 1.2, 0.01], [0, 0.03, 1.3]], [1.0, 0, 0], 0.1)
    assert np.diag(raw) == pytest.approx([1.0, 12.0, 13.0]) and raw[1, 2] == pytest.approx(0.3)
    assert alpha == pytest.approx(alpha.T) and alpha[1, 2] == pytest.approx(0.2)


def test_polarization_quantum_halves_with_an_odd_valence_charge():
    cell = np.eye(3) * 4.0
    assert rf.lattice_polarization_quantum(cell, [2.0, 6.0]) == pytest.approx(2 * cell)
    assert rf.lattice_polarization_quantum(cell, [3.0, 5.0]) == pytest.approx(cell)


@pytest.mark.parametrize(
    ("tier", "overrides", "field_vectors", "expected"),
    [
        ("full", {}, None, None),
        ("full", {"field_magnitudes": [0.1]}, None, [[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]]),
        ("field_frames", {"field_magnitude": 0.03, "field_magnitudes": [0.09]}, None,
         [[0.03, 0, 0], [0, 0.03, 0], [0, 0, 0.03], [0.09, 0, 0], [0, 0.09, 0], [0, 0, 0.09]]),
        ("field_frames", {"field_magnitudes": [0.09]}, [[0.0, 0.01, 0.05]], [[0.0, 0.01, 0.05]]),
        ("field_frames", {}, np.array([[0.0, 0.0, 0.05], [0.01, 0.0, 0.0]]), [[0.0, 0.0, 0.05], [0.01, 0.0, 0.0]]),
        ("energy_forces", {"field_magnitudes": [0.09]}, None, None),
    ],
)
def test_builder_labels_at_several_field_magnitudes(field_response_inputs, tier, overrides, field_vectors, expected):
    from polmodel.workflows.field_response import FieldResponseWorkChain

    builder = FieldResponseWorkChain.get_builder_from_protocol(
        field_response_inputs().scf.pw.code, field_response_inputs().structure, protocol="fast",
        pseudo_family=field_response_inputs.family_label, overrides={"scf": {"kpoints_distance": 0.5}, **overrides},
        tier=tier, field_vectors=field_vectors,
    )
    assert builder.tier.value == tier
    if expected is None:
        assert "field_vectors" not in builder
    else:
        assert np.array(builder.field_vectors.get_list()) == pytest.approx(np.array(expected, dtype=float))
    assert _validate(builder) is None


def test_pw_runs_per_label_for_budgets():
    assert pw_runs_per_label("energy_forces") == 1
    assert pw_runs_per_label("field_frames", [[0, 0, 0.05]]) == 2
    assert pw_runs_per_label("full") == 10 and pw_runs_per_label("full", string_extrapolation=True) == 16
    assert pw_runs_per_label("full", [[0.1, 0, 0]] * 3) == 13


def test_tier_and_field_vectors_can_come_from_overrides(field_response_inputs):
    builder = field_response_inputs(overrides={"scf": {"kpoints_distance": 0.5}, "tier": "field_frames",
                                               "field_vectors": [[0.0, 0.0, 0.05]]})
    assert builder.tier.value == "field_frames" and builder.field_vectors.get_list() == [[0.0, 0.0, 0.05]]


def test_bad_tiers_and_field_vectors_are_refused(field_response_inputs):
    from aiida import orm

    with pytest.raises(ValueError, match="energy_forces` tier runs no field"):
        field_response_inputs(overrides={"tier": "energy_forces", "field_vectors": [[0.01, 0, 0]]})
    with pytest.raises(ValueError, match="unknown tier `cheap`"):
        field_response_inputs(overrides={"tier": "cheap"})
    with pytest.raises(ValueError, match="field vector 1 is zero"):
        field_response_inputs(overrides={"tier": "field_frames", "field_vectors": [[0.01, 0, 0], [0, 0, 0]]})
    builder = field_response_inputs(overrides={"tier": "field_frames"})
    builder.field_vectors = orm.List([[0.01, 0.0]])
    assert "not three finite numbers" in _validate(builder)
    builder.tier = orm.Str("energy_forces")
    builder.field_vectors = orm.List([[0.01, 0.0, 0.0]])
    assert "runs no field" in _validate(builder)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"scf": {"kpoints_distanc": 0.3}}, "`scf.kpoints_distanc`"),
        ({"field_magnitud": 0.01}, "`field_magnitud`"),
        ({"scf": {"pw": {"parameters": {"SYSTME": {"ecutwfc": 30}}}}}, "`scf.pw.parameters.SYSTME`"),
        ({"scf": {"pw": {"metadata": {"options": {"max_wallclock_second": 10}}}}},
         "`scf.pw.metadata.options.max_wallclock_second`"),
        ({"meta_parameters": {"cutoff_factr": 1.1}}, "`meta_parameters.cutoff_factr`"),
    ],
)
def test_unknown_override_keys_are_errors_naming_the_key(field_response_inputs, overrides, named):
    with pytest.raises(ValueError, match=f"unknown key {named} in protocol overrides"):
        field_response_inputs(overrides=overrides)


def test_known_override_keys_pass(field_response_inputs):
    """Keys the protocol has, optional ports it leaves out, and pw.x keywords inside a namelist (pw.x's business)."""
    builder = field_response_inputs(overrides={
        "scf": {"kpoints_distance": 0.5, "pw": {"parameters": {"SYSTEM": {"ecutwfc": 25, "ecutrho": 100}},
                                                "metadata": {"options": {"resources": {"num_mpiprocs_per_machine": 1}}}}},
        "zener_margin": 0.4, "meta_parameters": {"cutoff_factor": 1.1},
    })
    assert builder.scf.pw.parameters["SYSTEM"]["ecutwfc"] == 25
    assert builder.scf.pw.metadata.options["resources"] == {"num_machines": 1, "num_mpiprocs_per_machine": 1}


def test_merge_overrides_leaves_its_arguments_alone():
    from polmodel.workflows.protocol_utils import merge_overrides

    inputs, overrides = {"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}
    assert merge_overrides(inputs, overrides) == {"a": {"b": 3, "c": 2}}
    assert inputs == {"a": {"b": 1, "c": 2}} and overrides == {"a": {"b": 3}}
    with pytest.raises(ValueError, match=r"unknown keys `a.d`, `e` in protocol overrides"):
        merge_overrides(inputs, {"a": {"d": 1}, "e": 2})


def test_odd_electron_count_refused_before_submission(field_response_inputs, alas_structure):
    from aiida import orm

    structure = orm.StructureData(cell=alas_structure.cell)
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")  # 3 valence electrons
    with pytest.raises(ValueError, match="3 valence electrons cannot fill"):
        field_response_inputs(structure=structure)
    builder = field_response_inputs()
    builder.structure = structure
    builder.scf.pw.pseudos = {"Al": builder.scf.pw.pseudos["Al"]}
    assert "3 valence electrons cannot fill" in _validate(builder)


# --- the metal check after the first pw.x run -------------------------------------------------------------------------


@pytest.fixture
def generate_metal_calculation(generate_pw_calc_node):
    """Factory: the recorded unconverged Al scf (fixed occupations, exit 410) as a finished PwCalculation with its
    parsed outputs, called by `caller` if given."""
    from aiida.common import LinkType
    from aiida.engine import ProcessState

    from polmodel.plugins.pw_parser import PolPwParser

    def factory(caller=None):
        node = generate_pw_calc_node("al_metal_scf_unconverged", caller=caller)
        results, calcfunction = PolPwParser.parse_from_node(node, store_provenance=False)
        for label, output in results.items():
            output.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label=label)
            output.store()
        node.set_process_state(ProcessState.FINISHED)
        node.set_exit_status(calcfunction.exit_status)
        return node

    return factory


def test_metal_stops_the_zero_field_run_before_any_restart(started_workchain, generate_workchain,
                                                           generate_metal_calculation):
    """The stock handler would restart this unconverged run with smaller mixing; the metal handler stops first."""
    from aiida import orm

    from polmodel.workflows.field_response import InsulatorPwBaseWorkChain

    parent = started_workchain()
    inputs = parent._base_inputs(parent._parameters(control={"calculation": "scf"}), "zero_field")
    inputs.min_band_gap = orm.Float(0.1)
    process = generate_workchain(InsulatorPwBaseWorkChain, inputs)
    process.setup()
    process.validate_kpoints()
    process.ctx.children = [generate_metal_calculation()]
    process.ctx.iteration = 1
    result = process.inspect_process()
    assert result.status == InsulatorPwBaseWorkChain.exit_codes.ERROR_NOT_AN_INSULATOR.status
    assert "gap -10.528 eV < 0.1 eV" in result.message
    assert process.ctx.iteration == 1  # nothing restarted


def test_the_first_run_is_capped_and_a_run_with_a_gap_gets_the_full_limit_back(
        started_workchain, generate_workchain, generate_metal_calculation):
    """The first pw.x run stops after FIRST_RUN_ELECTRON_MAXSTEP SCF steps (a metal shows itself there, not after
    the protocol's 150); an unconverged run with a gap is restarted by the stock handler with the full limit."""
    from aiida import orm

    from polmodel.workflows.field_response import FIRST_RUN_ELECTRON_MAXSTEP, InsulatorPwBaseWorkChain

    parent = started_workchain()
    inputs = parent._base_inputs(parent._parameters(control={"calculation": "scf"}), "zero_field")
    full = inputs.pw.parameters.get_dict()["ELECTRONS"]["electron_maxstep"]
    assert full > FIRST_RUN_ELECTRON_MAXSTEP
    inputs.min_band_gap = orm.Float(-20.0)          # the recorded Al run's gap (-10.5 eV) counts as a gap here
    process = generate_workchain(InsulatorPwBaseWorkChain, inputs)
    process.setup()
    assert process.ctx.inputs.parameters["ELECTRONS"]["electron_maxstep"] == FIRST_RUN_ELECTRON_MAXSTEP
    assert process.handle_metal(generate_metal_calculation()) is None     # a gap: the stock handlers go on
    assert process.ctx.inputs.parameters["ELECTRONS"]["electron_maxstep"] == full


def test_metal_exit_of_the_zero_field_run_names_the_gap(started_workchain, generate_fake_pw_base,
                                                        generate_metal_calculation):
    from polmodel.workflows.field_response import InsulatorPwBaseWorkChain

    process = started_workchain()
    child = generate_fake_pw_base(exit_status=InsulatorPwBaseWorkChain.exit_codes.ERROR_NOT_AN_INSULATOR.status)
    generate_metal_calculation(caller=child)
    process.ctx.zero_field = child
    result = process.inspect_zero_field()
    assert result.status == process.exit_codes.ERROR_NOT_AN_INSULATOR.status
    assert "gap -10.528 eV" in result.message


# --- one real end-to-end run ------------------------------------------------------------------------------------------

#: Rocksalt MgO with Debian's LDA pseudopotentials (norm-conserving Mg, ultrasoft O): a wide-gap polar insulator whose
#: finite-field response converges with k-points far faster than small-gap AlAs's (ε∞ 7.2 vs ph.x 15.2 at 4x4x4).
MGO_LDA_PSEUDOS = {"Mg": "Mg.pz-n-vbc.UPF", "O": "O.pz-rrkjus.UPF"}
MGO_LDA_FAMILY = "polmodel-tests/debian/LDA/MgO"
MGO_LDA_CUTOFFS_RY = (30.0, 240.0)
MGO_LATTICE_ANGSTROM = 4.21

# Measured by hand (pw.x/ph.x 6.7, these pseudopotentials and cutoffs, field 0.001 Ry a.u., conv_thr 1e-11, Γ-centred):
#   mesh   finite field ε∞  Z*(Mg)     ph.x ε∞  Z*(Mg)  Z*(O)   (ph.x ASR residual)   cpu per field run
#   4x4x4       2.769       1.913        3.274   1.925  -1.993   (0.068)              4 s
#   6x6x6       2.926       1.908        3.106   1.932  -1.904   (0.028)              16 s
#   8x8x8       2.994       1.907        3.094   1.932  -1.900   (0.033)              30 s
#   10x10x10    3.029       1.906        3.095   1.932  -1.900   (0.033)              75 s
# Z* agrees with ph.x within the issue's 0.05 e from 6x6x6 on. ε∞ of one mesh does not reach the issue's 2 % at a
# CI-sized mesh: the discretized Berry strings of lelfield underestimate α by ~c/N^2 (c ≈ 5.6), while ph.x's analytic
# dψ/dk is converged at 8x8x8; one mesh would need ~12x12x12 (~130 s cpu per field run). LiF (ld1.x LDA TM
# pseudopotentials, 60 Ry) behaves alike: 9.7 % at 4x4x4, 4.0 % at 6x6x6. The workchain's string extrapolation
# removes the c/N^2 term from a second set of field runs on a coarser mesh: 8x8x8 with 6x6x6 gives 3.081 (0.4 % from
# ph.x), 6x6x6 with 4x4x4 3.052 (1.7 % from ph.x's 6x6x6 3.106). The test runs the 6x6x6/4x4x4 pair: the same
# workflow as the `balanced` protocol's 8x8x8/6x6x6 at less than half the pw.x time per field run (table above).
MGO_E2E_OVERRIDES = {
    "scf": {"kpoints_distance": 0.45,  # |b| = 2π√3/a = 2.585 / Å: a 6x6x6 mesh
            "pw": {"parameters": {"CONTROL": {"nberrycyc": 1}, "ELECTRONS": {"conv_thr": 1.0e-10}}}},
    "string_extrapolation_scale": 0.75,  # field runs again on 4x4x4
}
# Nine pw.x runs go in parallel; one rank each avoids MPI ranks spinning against each other on two cores.
E2E_OPTIONS = {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1}, "withmpi": False,
               "max_wallclock_seconds": 1800}


@pytest.fixture
def mgo_structure(aiida_profile):
    from aiida import orm

    a = MGO_LATTICE_ANGSTROM
    structure = orm.StructureData(cell=[[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Mg")
    structure.append_atom(position=(a / 2, 0.0, 0.0), symbols="O")
    return structure


@pytest.fixture
def mgo_lda_family(generate_debian_pseudo_family):
    """aiida-pseudo family of Debian's Mg/O LDA UPFs with 30/240 Ry recommended cutoffs (get-or-create)."""
    return generate_debian_pseudo_family(MGO_LDA_FAMILY, MGO_LDA_PSEUDOS, MGO_LDA_CUTOFFS_RY)


@pytest.mark.dft
@pytest.mark.daemon
def test_mgo_end_to_end_through_the_daemon(mgo_structure, pw_code, ph_code, mgo_lda_family, submit_and_await):
    from aiida import orm
    from aiida.engine import run_get_node

    from polmodel.workflows.dfpt import DfptWorkChain
    from polmodel.workflows.field_response import FieldResponseWorkChain

    builder = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, mgo_structure, protocol="fast", overrides=MGO_E2E_OVERRIDES, pseudo_family=mgo_lda_family.label,
        options=E2E_OPTIONS,
    )
    node = submit_and_await(builder, timeout=1500)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    outputs = node.outputs
    frames = outputs.frames.get_atoms()
    assert orm.load_node(frames[0].info["source"]).inputs.kpoints.get_kpoints_mesh()[0] == [6, 6, 6]

    born = outputs.born_effective_charges.get_array("born_effective_charges")
    dielectric = outputs.dielectric_tensor.get_array("dielectric_tensor")
    alpha = outputs.polarizability.get_array("polarizability")
    alpha_dense_mesh = outputs.polarizability.get_array("polarizability_dense_mesh")
    assert outputs.polarizability.get_array("meshes").tolist() == [[6, 6, 6], [4, 4, 4]]
    # the extrapolation raises α above both meshes' values (both are low by c/N^2)
    assert np.all(np.diag(alpha) > np.diag(alpha_dense_mesh))
    assert np.all(np.diag(alpha_dense_mesh) > np.diag(outputs.polarizability.get_array("polarizability_coarse_mesh")))
    assert born.shape == (2, 3, 3) and dielectric.shape == (3, 3)
    # Cubic symmetry: isotropic tensors; Mg is the cation.
    assert born[0] == pytest.approx(born[0, 0, 0] * np.eye(3), abs=0.02)
    assert dielectric == pytest.approx(dielectric[0, 0] * np.eye(3), abs=0.05)
    assert 1.5 < born[0, 0, 0] < 2.5
    # Two atoms: pw.x removes the net force, so the finite-field residual vanishes by construction (ph.x's does not).
    assert outputs.asr_residual.value < 0.05
    assert np.all(np.linalg.eigvalsh(dielectric) > 1)

    # Polarization: even valence charges (Mg 2, O 6) and no spin: the quantum is 2 e times the lattice vectors.
    polarization = outputs.polarization
    quantum = polarization.get_array("polarization_quantum")
    assert quantum == pytest.approx(2 * np.array(mgo_structure.cell), abs=1e-6)
    volume = mgo_structure.get_cell_volume()
    assert polarization.get_array("polarization") == pytest.approx(polarization.get_array("dipole") / volume)

    # Frames: seven, labelled as docs/conventions.md says, each traced to its pw.x run.
    assert len(frames) == 7
    zero = frames[0]
    assert zero.info["efield"] == pytest.approx(np.zeros(3)) and zero.info["stress"].shape == (3, 3)
    # extxyz keeps 8 decimals: compare to that precision.
    assert zero.arrays["born_effective_charges"].reshape(2, 3, 3) == pytest.approx(born, abs=1e-6)
    assert zero.info["polarizability"] == pytest.approx(alpha, abs=1e-6)
    for frame in frames:
        source = orm.load_node(frame.info["source"])
        assert source.process_type.endswith("quantumespresso.pw") and source.is_finished_ok
        assert frame.arrays["forces"].shape == (2, 3)

    # pw.x's own energies: the cell dipole at ±ε equals −ΔE/Δε along every axis, on the frames' branch. With Mg at
    # the origin and O at (a/2, 0, 0) pw.x's branch carries a large dipole along x (ionic 33.75 Ry a.u.) and none along
    # y, z, where E(+ε) = E(−ε): the absolute tolerance is pw.x's printed energy precision (1e-8 Ry) over 2ε.
    magnitude = outputs.field_magnitude.value
    assert abs(0.5 * (frames[1].info["dipole"] + frames[2].info["dipole"])[0]) > 5.0  # e·Å: the check is not 0 ≈ 0
    for axis in range(3):
        plus, minus = frames[1 + 2 * axis], frames[2 + 2 * axis]
        assert plus.info["efield"][axis] == pytest.approx(magnitude)
        central = 0.5 * (plus.info["dipole"] + minus.info["dipole"])[axis]
        from_energies = -(plus.info["energy"] - minus.info["energy"]) / (2 * magnitude)
        assert central == pytest.approx(from_energies, rel=1e-4, abs=2e-5)
        # α from the frames' dipoles is the dense mesh's polarizability (one branch for all frames).
        assert ((plus.info["dipole"] - minus.info["dipole"])[axis] / (2 * magnitude)
                == pytest.approx(alpha_dense_mesh[axis, axis], rel=1e-4))

    # ph.x on the same structure and settings.
    dfpt_builder = DfptWorkChain.get_builder_from_field_response(builder, ph_code)
    dfpt_results, dfpt_node = run_get_node(dfpt_builder)
    assert dfpt_node.is_finished_ok, (dfpt_node.exit_status, dfpt_node.exit_message)
    born_ph = dfpt_results["born_effective_charges"].get_array("born_effective_charges")
    dielectric_ph = dfpt_results["dielectric_tensor"].get_array("dielectric_tensor")
    print(f"MgO 6x6x6 finite field (4x4x4 for the string extrapolation): Z*(Mg) {born[0, 0, 0]:.4f} Z*(O) {born[1, 0, 0]:.4f} eps {dielectric[0, 0]:.4f} "
          f"ASR {outputs.asr_residual.value:.4f}; ph.x: Z*(Mg) {born_ph[0, 0, 0]:.4f} Z*(O) {born_ph[1, 0, 0]:.4f} "
          f"eps {dielectric_ph[0, 0]:.4f} ASR {dfpt_results['asr_residual'].value:.4f}")
    # The issue's Born-charge tolerance, every atom and every component (measured by hand: 0.024 e for Mg).
    assert born == pytest.approx(born_ph, abs=0.05)
    assert dfpt_results["asr_residual"].value < 0.05
    # The issue's ε∞ tolerance, every component (the string-extrapolated finite-field tensor against ph.x).
    assert dielectric_ph == pytest.approx(dielectric_ph[0, 0] * np.eye(3), abs=1e-3)
    assert dielectric == pytest.approx(dielectric_ph, rel=0.02, abs=0.02 * dielectric_ph[0, 0])


# --- each label tier through AiiDA with real pw.x on a tiny cell ------------------------------------------------------

#: AlAs (2 atoms, Debian LDA, 20 Ry) on a 3x3x3 mesh: about a second of pw.x per run; one MPI rank each.
TIER_OVERRIDES = {"scf": {"kpoints_distance": 0.7}}
TIER_OPTIONS = {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1}, "withmpi": False,
                "max_wallclock_seconds": 600}


def _pw_calculations(node):
    from aiida import orm

    return [child for child in node.called_descendants
            if isinstance(child, orm.CalcJobNode) and child.process_type.endswith("quantumespresso.pw")]


def _run_tier(pw_code, structure, family, **kwargs):
    from aiida.engine import run_get_node

    from polmodel.workflows.field_response import FieldResponseWorkChain

    builder = FieldResponseWorkChain.get_builder_from_protocol(
        pw_code, structure, protocol="fast", overrides=kwargs.pop("overrides", TIER_OVERRIDES),
        pseudo_family=family.label, options=TIER_OPTIONS, **kwargs,
    )
    _, node = run_get_node(builder)
    return node


def _assert_frame_sources(frames, node):
    """Every frame's `source` is one of the label's pw.x runs, finished and on the label's structure."""
    from aiida import orm

    runs = {calculation.uuid for calculation in _pw_calculations(node)}
    for frame in frames:
        assert frame.info["source"] in runs
        source = orm.load_node(frame.info["source"])
        assert source.is_finished_ok and source.inputs.structure.uuid == node.inputs.structure.uuid


@pytest.mark.dft
@pytest.mark.slow
def test_energy_forces_tier_with_pw(pw_code, alas_structure, alas_lda_family):
    node = _run_tier(pw_code, alas_structure, alas_lda_family, tier="energy_forces")
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert len(_pw_calculations(node)) == pw_runs_per_label("energy_forces") == 1
    frames = node.outputs.frames.get_atoms()
    assert len(frames) == 1
    frame = frames[0]
    assert frame.info["efield"] == pytest.approx(np.zeros(3))
    assert frame.info["stress"].shape == (3, 3) and frame.arrays["forces"].shape == (2, 3)
    # AlAs at its ideal positions: no force by symmetry; an LDA gap of about 1.4 eV
    assert np.abs(frame.arrays["forces"]).max() < 1e-3 and 1.0 < node.outputs.band_gap.value < 2.0
    for absent in ("dipole", "polarization_quantum", "polarizability"):
        assert absent not in frame.info
    assert "born_effective_charges" not in frame.arrays
    for absent in ("born_effective_charges", "polarizability", "polarization", "asr_residual"):
        assert absent not in node.outputs
    _assert_frame_sources(frames, node)


@pytest.fixture
def displaced_alas(alas_structure):
    """AlAs with As moved off its site: forces, and a field response that differs along x, y and z."""
    from aiida import orm

    structure = orm.StructureData(cell=alas_structure.cell)
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")
    a = 5.66
    structure.append_atom(position=(a / 4 + 0.05, a / 4, a / 4 - 0.03), symbols="As")
    return structure


@pytest.mark.dft
@pytest.mark.slow
def test_field_frames_tier_with_pw(pw_code, displaced_alas, alas_lda_family):
    from aiida import orm

    from polmodel.data import units as project_units

    field = 0.0364
    extra = [0.02, -0.02, 0.01]
    node = _run_tier(pw_code, displaced_alas, alas_lda_family, tier="field_frames",
                     field_vectors=[[field, 0, 0], [0, field, 0], [0, 0, field], extra])
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    calculations = _pw_calculations(node)
    assert len(calculations) == pw_runs_per_label("field_frames", node.inputs.field_vectors.get_list()) == 5
    assert all(calc.inputs.parameters["CONTROL"]["lelfield"] for calc in calculations)
    frames = node.outputs.frames.get_atoms()
    assert len(frames) == 5
    expected_fields = [np.zeros(3), [field, 0, 0], [0, field, 0], [0, 0, field], extra]
    for frame, expected in zip(frames, expected_fields):
        assert frame.info["efield"] == pytest.approx(np.asarray(expected, dtype=float), abs=1e-9)
        assert frame.info["dipole"].shape == (3,) and frame.info["polarization_quantum"].shape == (3, 3)
    # stress at zero field only; Z*, α on the zero-field frame only (one-sided from the x, y, z runs)
    assert frames[0].info["stress"].shape == (3, 3) and all("stress" not in f.info for f in frames[1:])
    assert all("born_effective_charges" not in f.arrays and "polarizability" not in f.info for f in frames[1:])
    born = frames[0].arrays["born_effective_charges"].reshape(2, 3, 3)
    assert np.abs(born.sum(axis=0)).max() < 1e-6  # ASR-exact labels
    raw = node.outputs.born_effective_charges.get_array("born_effective_charges_raw")
    assert node.outputs.asr_residual.value == pytest.approx(np.abs(raw.sum(axis=0)).max())
    assert 1.5 < born[0, 0, 0] < 2.7  # Z*(Al) of AlAs: about 2.1 e
    alpha = node.outputs.polarizability.get_array("polarizability")
    assert frames[0].info["polarizability"] == pytest.approx(alpha, abs=1e-6)
    assert np.all(np.linalg.eigvalsh(alpha) > 0)
    assert "polarization" not in node.outputs
    # pw.x's own enthalpies: −(E(c·ê_a) − E(0))/c is the mean of the two dipoles along a (exact for a quadratic E)
    for axis in range(3):
        frame = frames[1 + axis]
        from_energies = -(frame.info["energy"] - frames[0].info["energy"]) / field
        mean_dipole = 0.5 * (frame.info["dipole"] + frames[0].info["dipole"])[axis]
        assert from_energies == pytest.approx(mean_dipole, abs=2e-3)
    assert frames[0].info["polarization_quantum"] == pytest.approx(np.array(displaced_alas.cell))  # Al: odd valence
    _assert_frame_sources(frames, node)
    for frame in frames:  # each frame's field is the one its pw.x run applied
        applied = orm.load_node(frame.info["source"]).inputs.parameters["ELECTRONS"]["efield_cart"]
        assert project_units.field_ry_to_v_per_angstrom(np.asarray(applied)) == pytest.approx(frame.info["efield"])


@pytest.mark.dft
@pytest.mark.slow
def test_full_tier_with_an_extra_field_with_pw(pw_code, displaced_alas, alas_lda_family):
    extra = [0.0, 0.0, 0.05]
    node = _run_tier(pw_code, displaced_alas, alas_lda_family, tier="full", field_vectors=[extra])
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    assert len(_pw_calculations(node)) == pw_runs_per_label("full", [extra]) == 1 + 3 + 6 + 1
    frames = node.outputs.frames.get_atoms()
    assert len(frames) == 8
    assert frames[-1].info["efield"] == pytest.approx(extra)
    assert "stress" not in frames[-1].info and "born_effective_charges" not in frames[-1].arrays
    born = frames[0].arrays["born_effective_charges"].reshape(2, 3, 3)
    assert np.abs(born.sum(axis=0)).max() < 1e-6
    outputs = node.outputs
    raw = outputs.born_effective_charges.get_array("born_effective_charges_raw")
    assert born == pytest.approx(raw - raw.mean(axis=0), abs=1e-6)
    assert outputs.asr_residual.value == pytest.approx(np.abs(raw.sum(axis=0)).max())
    for present in ("polarization", "polarizability", "dielectric_tensor", "field_magnitude", "band_gap"):
        assert present in outputs
    # the extra frame's dipole is on the branch of the ±ε frames: its enthalpy follows −d·ε from the zero field
    zero, extra_frame = frames[0], frames[-1]
    from_energies = -(extra_frame.info["energy"] - zero.info["energy"]) / extra[2]
    assert from_energies == pytest.approx(0.5 * (extra_frame.info["dipole"] + zero.info["dipole"])[2], abs=5e-3)
    _assert_frame_sources(frames, node)


@pytest.fixture
def aluminium(aiida_profile):
    from aiida import orm

    a = 2.86
    structure = orm.StructureData(cell=np.eye(3) * a)
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols="Al")
    structure.append_atom(position=(a / 2, a / 2, a / 2), symbols="Al")
    return structure


@pytest.mark.dft
def test_metal_stops_after_the_first_pw_run(pw_code, aluminium, generate_debian_pseudo_family):
    """Two Al atoms (6 electrons): the zero-field scf does not converge with fixed occupations; the label stops after
    that one pw.x run with the metal exit code and the gap, where it used to restart three times and exit 401."""
    family = generate_debian_pseudo_family("polmodel-tests/debian/LDA/Al", {"Al": "Al.pz-vbc.UPF"}, (15.0, 60.0))
    overrides = {"scf": {"kpoints_distance": 0.4, "pw": {"parameters": {"ELECTRONS": {"electron_maxstep": 30}}}}}
    node = _run_tier(pw_code, aluminium, family, tier="energy_forces", overrides=overrides)
    assert node.exit_status == node.process_class.exit_codes.ERROR_NOT_AN_INSULATOR.status
    assert "gap -" in node.exit_message and "eV < 0.1 eV" in node.exit_message
    assert len(_pw_calculations(node)) == 1
