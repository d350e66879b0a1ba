"""calcfunctions that turn pw.x outputs into polarization, Born charges, polarizability, ε∞ and labelled frames.

Every derived number of `FieldResponseWorkChain` is made here, so provenance leads from each output back to the
pw.x runs it came from. The arithmetic lives in pure numpy functions (tested without AiiDA); the calcfunctions
only unpack nodes, call them and pack the results.

Units: docs/conventions.md. Inputs are the `output_parameters` written by `polmodel.pw` (`PolPwParser`): `berry_phase`
(dipole and quantum in e·Å), `finite_field` (dipole in e·Å, field in V/Å), `energy` (eV); forces come from
`output_trajectory` (eV/Å), stress from it too (GPa, pw.x sign).
"""
import numpy as np
from aiida import orm
from aiida.engine import calcfunction

from polmodel.analysis import spectra
from polmodel.data.polarization import fold_dipole_difference

# Field runs are labelled <axis>_<sign>; this order is the order of the six finite-field frames.
FIELD_LABELS = ("x_plus", "x_minus", "y_plus", "y_minus", "z_plus", "z_minus")
GPA_IN_EV_PER_ANGSTROM3 = 1.0 / 160.21766208


# --- pure functions ------------------------------------------------------------------------------------------


def field_vector(label, magnitude):
    """Field (3,) in V/Å of the run labelled `label` (e.g. 'y_minus') at `magnitude` V/Å."""
    axis, sign = label.split("_")
    vector = np.zeros(3)
    vector["xyz".index(axis)] = magnitude if sign == "plus" else -magnitude
    return vector


def fold_onto_branch(dipole, reference, quantum):
    """`dipole` moved by whole quanta to the branch of `reference`: minimum image of the difference.

    `quantum` (3, 3) has the quantum vectors as rows; the difference is expressed in that basis, the nearest
    integers are removed, and the result is added back to `reference`.
    """
    reference = np.asarray(reference, dtype=float)
    return reference + fold_dipole_difference(np.asarray(dipole, dtype=float) - reference, quantum)


def _reported_field_dipoles(outputs):
    """{label: the dipole (3,) e·Å pw.x reported} from the `parameters_<label>` of the six field runs."""
    return {label: outputs[f"parameters_{label}"]["finite_field"]["dipole"] for label in FIELD_LABELS}


def field_dipoles_on_one_branch(field_dipoles, quantum):
    """The six ±ε dipoles moved onto the branch of the first, and the shift each one got (whole quanta).

    They differ from each other by α·ε, far less than a quantum, so the minimum image is unambiguous. pw.x may still
    report one of them on another branch (the difference is then a whole quantum); differencing without the fold
    would turn that into an α of ~10² e·Å²/V. Returns ({label: dipole}, {label: shift}).
    """
    first = np.asarray(field_dipoles[FIELD_LABELS[0]], dtype=float)
    on_branch = {label: fold_onto_branch(field_dipoles[label], first, quantum) for label in FIELD_LABELS}
    shifts = {label: on_branch[label] - np.asarray(field_dipoles[label], dtype=float) for label in FIELD_LABELS}
    return on_branch, shifts


def common_branch(berry_dipole, field_dipoles, quantum, cell):
    """The zero-field Berry dipole moved onto the branch of the finite-field dipoles (`field_dipoles_on_one_branch`).

    pw.x's enthalpy under `lelfield` is E_0 − ε·d with d on the branch of its unwrapped ionic dipole Σ Z_i r_i;
    labelling every frame on that branch keeps energies and dipoles consistent (d = −∂E/∂ε across frames). The
    zero-field dipole is the centre of the ±ε dipoles up to O(ε²). pw.x 6.7's spin-degenerate Berry phase agrees
    with the lelfield dipole only modulo e·R: on a 300 K BaTiO3 MD frame its Berry dipole was 2.688 e·Å and the ±ε
    centre 46.690 e·Å, 5.5 printed quanta apart in every direction.

    So the Berry dipole is moved by lattice translations e·R of one charge. Where every valence charge is even, pw.x
    prints the quantum 2e·R and e·R is half of it; where an ion's valence charge is odd, pw.x prints e·R and the
    snap is by whole quanta (half of e·R translates no charge, so a Berry dipole that needs it is an error, not a
    branch). A printed quantum that is neither e·R nor 2e·R of `cell`, or a Berry dipole that no e·R brings within
    a tenth of the shortest lattice vector of the ±ε centre, is a ValueError naming the numbers.
    """
    cell = np.asarray(cell, dtype=float)
    lattice_lengths = np.linalg.norm(cell, axis=1)
    multiples = np.linalg.norm(np.asarray(quantum, dtype=float), axis=1) / lattice_lengths
    if not all(abs(m - 1.0) < 1e-3 or abs(m - 2.0) < 1e-3 for m in multiples):
        raise ValueError(f"pw.x's polarization quantum is {np.round(multiples, 4).tolist()} e·R along the lattice "
                         "vectors: only e·R (an odd valence charge) or 2e·R (all even) can be snapped")
    centre = np.mean([field_dipoles[label] for label in FIELD_LABELS], axis=0)
    snapped = fold_onto_branch(berry_dipole, centre, cell)
    miss = float(np.linalg.norm(snapped - centre))
    if miss > 0.1 * lattice_lengths.min():
        raise ValueError(f"the zero-field Berry dipole {np.round(berry_dipole, 4).tolist()} e·Å is {miss:.3f} e·Å "
                         f"from the centre of the ±ε dipoles {np.round(centre, 4).tolist()} e·Å after the nearest "
                         "lattice translation e·R: the runs are not on branches a valence-charge parity allows "
                         "(printed quantum: " + " ".join(f"{m:.0f}e·R" for m in multiples) + ")")
    return snapped


def born_charges_from_forces(forces_plus, forces_minus, magnitude):
    """Z*[i, a, b] = ∂F_ib/∂ε_a (e) by central differences.

    `forces_plus[a]`, `forces_minus[a]` (N, 3) eV/Å at +ε and −ε along Cartesian axis a; `magnitude` V/Å.
    """
    plus, minus = np.asarray(forces_plus, dtype=float), np.asarray(forces_minus, dtype=float)
    return np.transpose((plus - minus) / (2.0 * magnitude), (1, 0, 2))


def born_charges_one_sided(forces_field, forces_zero, field):
    """Z*[i, a, b] = (F_ib(c·ê_a) − F_ib(0)) / c (e), one-sided: `forces_field[a]` (N, 3) at the field c·ê_a (V/Å)."""
    forces_zero = np.asarray(forces_zero, dtype=float)
    return born_charges_from_forces(forces_field, [forces_zero] * 3, 0.5 * field)


def enforce_acoustic_sum_rule(born_charges):
    """Z* with the mean over atoms subtracted per component, so that Σ_i Z*[i] = 0 exactly.

    The residual of DFT Born charges is a k-point convergence error, not physics: the model's sum rule is exact, so
    the labels must be too. The raw charges' residual (`acoustic_sum_rule_residual`) is kept as its own output.
    """
    born_charges = np.asarray(born_charges, dtype=float)
    return born_charges - born_charges.mean(axis=0, keepdims=True)


def polarizability_from_dipoles(dipoles_plus, dipoles_minus, magnitude):
    """α[a, b] = ∂d_a/∂ε_b (e·Å²/V) by central differences, symmetrized.

    `dipoles_plus[b]`, `dipoles_minus[b]` (3,) e·Å at ±ε along axis b, on one branch. Returns (α_sym, α_raw).
    """
    raw = ((np.asarray(dipoles_plus) - np.asarray(dipoles_minus)) / (2.0 * magnitude)).T
    return 0.5 * (raw + raw.T), raw


def polarizability_one_sided(dipoles_field, dipole_zero, field):
    """α[a, b] = (d_a(c·ê_b) − d_a(0)) / c, symmetrized; `dipoles_field[b]` (3,) e·Å at c·ê_b, on the branch of
    `dipole_zero`. Returns (α_sym, α_raw)."""
    return polarizability_from_dipoles(dipoles_field, [np.asarray(dipole_zero, dtype=float)] * 3, 0.5 * field)


def axis_field_triple(field_vectors, tolerance=1e-9):
    """(c, [k_x, k_y, k_z]): indices of three field vectors c·x̂, c·ŷ, c·ẑ with one c (the smallest |c| when
    several triples are run), or None. One-sided Z* and α need exactly such a triple."""
    vectors = np.asarray(field_vectors, dtype=float).reshape(-1, 3)
    along = {}  # c -> {axis: index}
    for index, vector in enumerate(vectors):
        axis = int(np.argmax(np.abs(vector)))
        c = float(vector[axis])
        if c == 0.0 or np.abs(np.delete(vector, axis)).max() > tolerance * abs(c):
            continue
        key = next((known for known in along if abs(known - c) <= tolerance * abs(c)), c)
        along.setdefault(key, {}).setdefault(axis, index)
    triples = [(c, [axes[a] for a in range(3)]) for c, axes in along.items() if len(axes) == 3]
    return min(triples, key=lambda triple: abs(triple[0])) if triples else None


def lattice_polarization_quantum(cell, valence_charges):
    """Quantum vectors (rows, e·Å) of a spin-degenerate cell: 2e·a_i, or e·a_i when an ion has an odd valence charge
    (moving it by a lattice vector changes the ionic dipole by an odd multiple of e·a_i), as pw.x's `(mod m)`."""
    odd = any(abs(z - 2.0 * round(z / 2.0)) > 1e-6 for z in valence_charges)
    return (1.0 if odd else 2.0) * np.asarray(cell, dtype=float)


def dielectric_from_polarizability(polarizability, volume):
    """ε∞ = 1 + α/(ε0 Ω) with α in e·Å²/V and Ω in Å³ (polmodel/data/dielectric.py holds the formula)."""
    return spectra.dielectric_from_polarizability(polarizability, volume)


def dielectric_defect(dielectric):
    """Why ε∞ (3, 3) cannot be a clamped-ion dielectric tensor (not symmetric positive definite), or None."""
    dielectric = np.asarray(dielectric, dtype=float)
    if not np.all(np.isfinite(dielectric)):
        return "it has non-finite entries"
    eigenvalues = np.linalg.eigvalsh(0.5 * (dielectric + dielectric.T))
    if eigenvalues.min() <= 0.0:
        return f"its eigenvalues {np.round(eigenvalues, 3).tolist()} are not all positive"
    return None


def string_density_error(mesh):
    """Σ_i 1/N_i²: the discretization error of Berry-string derivatives of a mesh is proportional to it (O(Δk²))."""
    return float(sum(1.0 / float(n) ** 2 for n in mesh))


def extrapolate_to_dense_strings(value_dense, value_coarse, mesh_dense, mesh_coarse):
    """Richardson extrapolation of a finite-field response to infinitely dense Berry strings.

    pw.x's `lelfield` couples the field through a finite-difference dψ/dk along the strings, so a polarizability
    computed on an N-point string is low by ~c/N² (benchmarks/README.md "Berry-phase strings"). Two meshes give the
    limit: value = value_∞ − c·h with h = Σ_i 1/N_i², exact when the coarse mesh is a uniform scaling of the dense one.
    """
    h_dense, h_coarse = string_density_error(mesh_dense), string_density_error(mesh_coarse)
    if not h_coarse > h_dense:
        raise ValueError(f"the coarse mesh {list(mesh_coarse)} is not coarser than {list(mesh_dense)}")
    value_dense, value_coarse = np.asarray(value_dense, dtype=float), np.asarray(value_coarse, dtype=float)
    return (h_coarse * value_dense - h_dense * value_coarse) / (h_coarse - h_dense)


def coarse_mesh(mesh, scale):
    """The mesh scaled by `scale` (< 1) for the string extrapolation, at least 2 points per direction."""
    return [max(2, int(round(scale * n))) for n in mesh]


def acoustic_sum_rule_residual(born_charges):
    """Largest |Σ_i Z*[i, a, b]| over a, b (e): zero for an exact translation-invariant response."""
    return float(np.abs(np.asarray(born_charges).sum(axis=0)).max())


def stress_from_pw(stress_gpa):
    """pw.x stress (GPa, pw.x sign) → eV/Å³ in ASE's sign ((1/Ω) ∂E/∂strain: positive when expanding costs energy)."""
    return -np.asarray(stress_gpa, dtype=float) * GPA_IN_EV_PER_ANGSTROM3


# --- calcfunctions ---------------------------------------------------------------------------------------------


def _last(trajectory, name):
    return np.asarray(trajectory.get_array(name))[-1]


def field_run_label(index):
    """Context key and frame label of the `index`-th requested field vector (sorts in request order)."""
    return f"field_vector_{index:03d}"


@calcfunction
def compute_polarization(structure, **berry_parameters):
    """Zero-field cell dipole, polarization and quantum from the three Berry-phase nscf runs (gdir = 1, 2, 3).

    Returns ArrayData with `polarization` (3,) e/Å², `polarization_quantum` (3, 3) e·Å (rows f·e·R_i, as pw.x
    reports them) and `dipole` (3,) e·Å (the branch pw.x reported).
    """
    dipole = np.zeros(3)
    quantum = np.zeros((3, 3))
    for parameters in berry_parameters.values():
        berry = parameters["berry_phase"]
        dipole += np.asarray(berry["dipole"])
        quantum[berry["gdir"] - 1] = berry["quantum"]
    if np.any(np.linalg.norm(quantum, axis=1) == 0):
        raise ValueError("the Berry-phase runs do not cover the three lattice directions")
    volume = structure.get_cell_volume()
    return orm.ArrayData({"polarization": dipole / volume, "polarization_quantum": quantum, "dipole": dipole})


@calcfunction
def compute_field_response(structure, polarization, field_magnitude, **field_outputs):
    """Born charges, polarizability, ε∞ and the acoustic-sum-rule residual from the six ±ε runs.

    `field_outputs` holds `parameters_<label>` (output_parameters) and `trajectory_<label>` (output_trajectory)
    for every label in FIELD_LABELS (other runs passed along are ignored). Dipoles are folded onto one branch
    (`field_dipoles_on_one_branch`) before differencing. The Born charges are made ASR-exact
    (`enforce_acoustic_sum_rule`); the raw ones sit beside them and `asr_residual` is theirs.
    """
    magnitude = field_magnitude.value
    quantum = polarization.get_array("polarization_quantum")
    forces = {label: _last(field_outputs[f"trajectory_{label}"], "forces") for label in FIELD_LABELS}
    dipoles, _ = field_dipoles_on_one_branch(_reported_field_dipoles(field_outputs), quantum)
    axes = "xyz"
    born = born_charges_from_forces(
        [forces[f"{a}_plus"] for a in axes], [forces[f"{a}_minus"] for a in axes], magnitude
    )
    alpha, alpha_raw = polarizability_from_dipoles(
        [dipoles[f"{a}_plus"] for a in axes], [dipoles[f"{a}_minus"] for a in axes], magnitude
    )
    return _response_outputs(structure, born, alpha, alpha_raw)


def _response_outputs(structure, born_raw, alpha, alpha_raw):
    """The response output nodes: ASR-exact Z* (raw beside them), α, ε∞ and the raw ASR residual."""
    return {
        "born_effective_charges": orm.ArrayData({
            "born_effective_charges": enforce_acoustic_sum_rule(born_raw), "born_effective_charges_raw": born_raw,
        }),
        "polarizability": orm.ArrayData({"polarizability": alpha, "polarizability_unsymmetrized": alpha_raw}),
        "dielectric_tensor": orm.ArrayData(
            {"dielectric_tensor": dielectric_from_polarizability(alpha, structure.get_cell_volume())}),
        "asr_residual": orm.Float(acoustic_sum_rule_residual(born_raw)),
    }


def _field_run_labels(pw_outputs):
    """Labels `<label>` of the finite-field runs among `parameters_<label>` inputs, zero field excluded, sorted."""
    return sorted(key[len("parameters_"):] for key in pw_outputs
                  if key.startswith("parameters_") and key != "parameters_zero_field")


def band_gap(output_parameters):
    """Lowest unoccupied minus highest occupied level (eV) from `band_edges` of `PolPwParser`, or None."""
    edges = output_parameters.get("band_edges") or {}
    if edges.get("lowest_unoccupied_level") is None or edges.get("highest_occupied_level") is None:
        return None
    return edges["lowest_unoccupied_level"] - edges["highest_occupied_level"]


@calcfunction
def compute_band_gap(output_parameters):
    """The gap (eV) between the highest occupied and lowest unoccupied level of a pw.x run, as a node."""
    gap = band_gap(output_parameters.get_dict())
    if gap is None:
        raise ValueError("the pw.x run reports no band edges")
    return orm.Float(gap)


@calcfunction
def compute_polarization_quantum(structure, **pseudos):
    """`polarization_quantum` (3, 3) e·Å of `structure` from the pseudopotentials' valence charges
    (`lattice_polarization_quantum`); the tiers without Berry-phase runs have no pw.x-printed quantum."""
    valence = [float(pseudos[site.kind_name].z_valence) for site in structure.sites]
    return orm.ArrayData({"polarization_quantum": lattice_polarization_quantum(structure.cell, valence)})


@calcfunction
def compute_one_sided_response(structure, polarization_quantum, **pw_outputs):
    """Z*, α, ε∞ and the ASR residual from a zero-field `lelfield` run and three runs at c·x̂, c·ŷ, c·ẑ, one-sided.

    `pw_outputs` holds `parameters_<label>`, `trajectory_<label>` for 'zero_field' and each field run; the triple is
    found from the fields the runs applied (`axis_field_triple`). Dipoles are moved onto the zero-field one's branch.
    """
    quantum = polarization_quantum.get_array("polarization_quantum")
    labels = _field_run_labels(pw_outputs)
    fields = [pw_outputs[f"parameters_{label}"]["finite_field"]["efield"] for label in labels]
    triple = axis_field_triple(fields)
    if triple is None:
        raise ValueError("one-sided response needs field runs at c·x̂, c·ŷ and c·ẑ with one c")
    field, indices = triple
    axis_labels = [labels[index] for index in indices]
    dipole_zero = np.asarray(pw_outputs["parameters_zero_field"]["finite_field"]["dipole"], dtype=float)
    dipoles = [fold_onto_branch(pw_outputs[f"parameters_{label}"]["finite_field"]["dipole"], dipole_zero, quantum)
               for label in axis_labels]
    born = born_charges_one_sided([_last(pw_outputs[f"trajectory_{label}"], "forces") for label in axis_labels],
                                  _last(pw_outputs["trajectory_zero_field"], "forces"), field)
    alpha, alpha_raw = polarizability_one_sided(dipoles, dipole_zero, field)
    return _response_outputs(structure, born, alpha, alpha_raw)


@calcfunction
def extrapolate_polarizability(structure, polarizability_dense, polarizability_coarse, mesh_dense, mesh_coarse):
    """α and ε∞ extrapolated to infinitely dense Berry strings from two meshes (`extrapolate_to_dense_strings`).

    Returns `polarizability` (arrays `polarizability` (3, 3) e·Å²/V extrapolated, `polarizability_dense_mesh`,
    `polarizability_coarse_mesh`, `meshes` (2, 3): dense then coarse) and `dielectric_tensor`.
    """
    dense = polarizability_dense.get_array("polarizability")
    coarse = polarizability_coarse.get_array("polarizability")
    alpha = extrapolate_to_dense_strings(dense, coarse, mesh_dense.get_list(), mesh_coarse.get_list())
    return {
        "polarizability": orm.ArrayData({
            "polarizability": alpha, "polarizability_dense_mesh": dense, "polarizability_coarse_mesh": coarse,
            "meshes": np.array([mesh_dense.get_list(), mesh_coarse.get_list()]),
        }),
        "dielectric_tensor": orm.ArrayData(
            {"dielectric_tensor": dielectric_from_polarizability(alpha, structure.get_cell_volume())}),
    }


def _new_frame(structure, parameters, trajectory):
    """A frame of `structure` with the energy, forces and source of one pw.x run (labels as in docs/conventions.md)."""
    atoms = structure.get_ase()
    atoms.info["energy"] = float(parameters["energy"])
    atoms.arrays["forces"] = _last(trajectory, "forces")
    atoms.info["source"] = parameters.creator.uuid
    return atoms


def _add_field_frame(frames, atoms, parameters, dipole_on_branch, shift):
    """Label `atoms` with its field and its dipole moved by `shift` onto the frames' branch; the enthalpy's −ε·d
    term moves with the dipole's branch."""
    efield = np.asarray(parameters["finite_field"]["efield"])
    atoms.info["efield"] = efield
    atoms.info["dipole"] = np.asarray(dipole_on_branch, dtype=float)
    atoms.info["energy"] -= float(efield @ shift)
    frames.append(atoms)


@calcfunction
def build_frames(structure, polarization, born_effective_charges, polarizability, **pw_outputs):
    """The labelled frames of the full response: zero field, ±ε along x, y, z, then any further field runs.

    `pw_outputs` holds `parameters_<label>` and `trajectory_<label>` for 'zero_field', every FIELD_LABELS entry and
    any further field run (`field_vector_<i>`). `info['source']` is the UUID of the pw.x calculation that produced
    each frame's labels. All dipoles lie on one branch, the one of pw.x's enthalpies (`field_dipoles_on_one_branch`,
    `common_branch`; a field frame moved to it has its energy moved by −ε·shift), so d = −ΔE/Δε holds between frames.
    """
    from polmodel.plugins.data import FramesData

    quantum = polarization.get_array("polarization_quantum")
    field_dipoles, shifts = field_dipoles_on_one_branch(_reported_field_dipoles(pw_outputs), quantum)
    reference = common_branch(polarization.get_array("dipole"), field_dipoles, quantum, structure.cell)

    def new_frame(label):
        atoms = _new_frame(structure, pw_outputs[f"parameters_{label}"], pw_outputs[f"trajectory_{label}"])
        atoms.info["polarization_quantum"] = quantum.copy()
        return atoms

    atoms = new_frame("zero_field")
    atoms.info["efield"] = np.zeros(3)
    atoms.info["stress"] = stress_from_pw(_last(pw_outputs["trajectory_zero_field"], "stress"))
    atoms.info["dipole"] = reference.copy()
    atoms.info["polarizability"] = polarizability.get_array("polarizability")
    atoms.arrays["born_effective_charges"] = born_effective_charges.get_array("born_effective_charges").reshape(-1, 9)
    frames = [atoms]

    for label in FIELD_LABELS:
        _add_field_frame(frames, new_frame(label), pw_outputs[f"parameters_{label}"], field_dipoles[label],
                         shifts[label])
    first = field_dipoles[FIELD_LABELS[0]]
    for label in _field_run_labels(pw_outputs):
        if label in FIELD_LABELS:
            continue
        parameters = pw_outputs[f"parameters_{label}"]
        reported = np.asarray(parameters["finite_field"]["dipole"], dtype=float)
        on_branch = fold_onto_branch(reported, first, quantum)
        _add_field_frame(frames, new_frame(label), parameters, on_branch, on_branch - reported)

    return FramesData.from_atoms(frames)


@calcfunction
def build_tier_frames(structure, polarization_quantum=None, born_effective_charges=None, polarizability=None,
                      **pw_outputs):
    """The labelled frames of the cheaper tiers: the zero-field run, then one frame per field run (sorted labels).

    `pw_outputs` holds `parameters_<label>` and `trajectory_<label>` for 'zero_field' and each field run. The zero-field
    frame has `energy`, `forces`, `stress`, and its `dipole` when the run was a zero-field `lelfield` run; each field
    frame has `energy`, `forces`, `efield` and its `dipole`, moved onto the zero-field dipole's branch. Z* and α are
    attached to the zero-field frame when given. What a tier does not compute is absent.
    """
    from polmodel.plugins.data import FramesData

    quantum = polarization_quantum.get_array("polarization_quantum") if polarization_quantum is not None else None
    zero_parameters = pw_outputs["parameters_zero_field"]
    atoms = _new_frame(structure, zero_parameters, pw_outputs["trajectory_zero_field"])
    atoms.info["efield"] = np.zeros(3)
    atoms.info["stress"] = stress_from_pw(_last(pw_outputs["trajectory_zero_field"], "stress"))
    reference = None
    if "finite_field" in zero_parameters.get_dict():
        reference = np.asarray(zero_parameters["finite_field"]["dipole"], dtype=float)
        atoms.info["dipole"] = reference.copy()
        atoms.info["polarization_quantum"] = quantum.copy()
    if polarizability is not None:
        atoms.info["polarizability"] = polarizability.get_array("polarizability")
    if born_effective_charges is not None:
        atoms.arrays["born_effective_charges"] = (
            born_effective_charges.get_array("born_effective_charges").reshape(-1, 9))
    frames = [atoms]

    for label in _field_run_labels(pw_outputs):
        parameters = pw_outputs[f"parameters_{label}"]
        reported = np.asarray(parameters["finite_field"]["dipole"], dtype=float)
        if reference is None:  # the branch of the first field run is the frames' branch
            reference = reported
        on_branch = fold_onto_branch(reported, reference, quantum)
        atoms = _new_frame(structure, parameters, pw_outputs[f"trajectory_{label}"])
        atoms.info["polarization_quantum"] = quantum.copy()
        _add_field_frame(frames, atoms, parameters, on_branch, on_branch - reported)

    return FramesData.from_atoms(frames)
