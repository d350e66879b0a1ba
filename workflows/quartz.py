"""α-quartz against DFT: the held-out labels (group quartz/heldout) and the ph.x reference (group quartz/dfpt) that
`benchmarks/quartz_heldout.py` made, compared with a model. Used by that script and by the demo's report.

The ph.x reference is the newest finished `DfptWorkChain` of group quartz/dfpt with Γ phonons (else the newest);
its structure is the comparison's structure.
"""
import numpy as np

HELDOUT_GROUP = "quartz/heldout"
DFPT_GROUP = "quartz/dfpt"


def heldout_frames():
    """(frames, labels): every labelled frame of the finished workchains in group quartz/heldout, and one
    `heldout/tier<pk>` line per workchain."""
    from aiida import orm

    frames, done = [], []
    for node in sorted(orm.load_group(HELDOUT_GROUP).nodes, key=lambda node: node.pk):
        if node.is_finished_ok and "frames" in node.outputs:
            frames.extend(node.outputs.frames.get_atoms())
            done.append(f"{node.base.extras.get('heldout')}/{node.base.extras.get('tier')}<{node.pk}>")
    return frames, done


def reference_dfpt():
    """The DfptWorkChain the comparisons use (module docstring); ValueError when group quartz/dfpt has none."""
    from aiida import orm

    dfpt = [node for node in orm.load_group(DFPT_GROUP).nodes if node.is_finished_ok]
    if not dfpt:
        raise ValueError(f"no finished DfptWorkChain in group {DFPT_GROUP}")
    with_phonons = [node for node in dfpt if "gamma_phonons" in node.outputs]
    return max(with_phonons or dfpt, key=lambda node: node.ctime)


def harmonic_dfpt_spectrum(dfpt, wavenumber, fwhm=10.0):
    """α n(ν̃) (cm⁻¹) of ph.x's Γ modes on the grid `wavenumber`: the harmonic IR spectrum, Lorentzians of `fwhm`."""
    from polmodel.analysis.spectra import harmonic_ir_absorption

    phonons = dfpt.outputs.gamma_phonons
    volume = dfpt.inputs.structure.get_ase().get_volume()
    return harmonic_ir_absorption(phonons.get_array("wavenumbers"), phonons.get_array("mode_charges"), volume,
                                  wavenumber, fwhm=fwhm)


def perpendicular_parallel(tensor):
    """[⊥, ∥] = [mean of xx and yy, zz] of a (3, 3) tensor of the hexagonal cell (c along z); None stays None."""
    return None if tensor is None else [float(0.5 * (tensor[0, 0] + tensor[1, 1])), float(tensor[2, 2])]


def gamma_modes_against_dfpt(dfpt, calculator, atoms, model_born, model_eps):
    """The IR-active Γ modes of ph.x (intensity above 1 % of the strongest) and, for each, the model mode with the
    most similar pattern (its Hessian by autograd, its Z* and ε∞, at the same structure), and the harmonic ε0 of
    both. Both are evaluated at the DfptWorkChain's structure whether or not it is a minimum of either: the
    comparison is of second derivatives at one geometry, and the largest forces of each there are reported (pw.x's
    where its scf printed them)."""
    from polmodel.analysis import phonons

    dft = dfpt.outputs.gamma_phonons
    dft_wavenumbers = dft.get_array("wavenumbers")
    dft_intensity = dft.get_array("ir_intensities_km_per_mol")
    optical = ~dft.get_array("acoustic").astype(bool)
    model = phonons.gamma_response(phonons.model_force_constants(calculator, atoms), atoms.get_masses(), model_born,
                                   model_eps, atoms.get_volume())
    index, overlap = phonons.match_modes(dft.get_array("eigenvectors"), model["eigenvectors"], model["wavenumbers"])
    active = np.flatnonzero(optical & (dft_intensity > 0.01 * dft_intensity[optical].max()))
    scf = next(node for node in dfpt.called if node.process_label == "PwBaseWorkChain")
    trajectory = scf.outputs.output_trajectory
    dft_forces = trajectory.get_array("forces")[-1] if "forces" in trajectory.get_arraynames() else None
    dft_eps0 = dfpt.outputs.static_dielectric_tensor.get_array("static_dielectric_tensor") \
        if "static_dielectric_tensor" in dfpt.outputs else None

    return {
        "ir_active_modes": [{"ph.x_cm-1": float(dft_wavenumbers[m]), "ph.x_km_per_mol": float(dft_intensity[m]),
                             "model_cm-1": float(model["wavenumbers"][index[m]]),
                             "model_km_per_mol": float(model["ir_intensities"]["km_per_mol"][index[m]]),
                             "pattern_overlap": float(overlap[m])} for m in active],
        "epsilon_static_harmonic": {"ph.x": perpendicular_parallel(dft_eps0),
                                    "model": perpendicular_parallel(model["epsilon_static"]),
                                    "order": "perpendicular, parallel; None: an unstable optical mode"},
        "unstable_optical_modes": {"ph.x": int(np.sum(dft_wavenumbers[optical] < 0)),
                                   "model": int(np.sum(model["wavenumbers"][~model["acoustic"]] < 0))},
        "max_force_eV_per_A": {"pw.x": None if dft_forces is None else float(np.linalg.norm(dft_forces, axis=1).max()),
                               "model": float(np.linalg.norm(atoms.get_forces(), axis=1).max())},
    }


def dfpt_reference(model_path, dfpt=None):
    """A model or ensemble file against the ph.x reference `dfpt` (default `reference_dfpt()`) on its structure: ε∞
    (⊥ = mean of xx and yy, ∥ = zz) and Born charges (ph.x's with the acoustic sum rule imposed, like the labels);
    with ph.x phonons also the IR-active Γ modes and the harmonic ε0 (`gamma_modes_against_dfpt`)."""
    from polmodel import PolCalculator, load
    from polmodel.analysis.phonons import born_charges_obeying_sum_rule

    dfpt = reference_dfpt() if dfpt is None else dfpt
    atoms = dfpt.inputs.structure.get_ase()
    calculator = PolCalculator(load(model_path))
    atoms.calc = calculator
    model_eps = np.asarray(calculator.get_property("dielectric_tensor", atoms))
    model_born = np.asarray(calculator.get_property("born_effective_charges", atoms))
    model_born_std = np.asarray(calculator.get_property("born_effective_charges_std", atoms))
    dft_eps = dfpt.outputs.dielectric_tensor.get_array("dielectric_tensor")
    dft_born = born_charges_obeying_sum_rule(dfpt.outputs.born_effective_charges.get_array("born_effective_charges"))
    symbols = atoms.get_chemical_symbols()

    def mean_trace(born, element):
        return float(np.mean([np.trace(born[i]) / 3 for i, symbol in enumerate(symbols) if symbol == element]))

    structure, creator = dfpt.inputs.structure, dfpt.inputs.structure.creator
    result = {
        "dfpt": dfpt.uuid,
        "structure": f"the DfptWorkChain's input, StructureData {structure.uuid}"
                     + (f" (output of {creator.process_label} {creator.uuid})" if creator else ""),
        "epsilon_inf": {"model": perpendicular_parallel(model_eps), "ph.x": perpendicular_parallel(dft_eps),
                        "order": "perpendicular (xx, yy mean), parallel (zz)"},
        "born_mean_trace": {element: {"model": mean_trace(model_born, element), "ph.x": mean_trace(dft_born, element)}
                            for element in sorted(set(symbols))},
        "born_mae": float(np.mean(np.abs(model_born - dft_born))),
        "born_ensemble_std_mean": float(np.mean(model_born_std)),
        "asr_residual_ph.x": float(dfpt.outputs.asr_residual.value),
    }
    if "gamma_phonons" in dfpt.outputs:
        result["gamma"] = gamma_modes_against_dfpt(dfpt, calculator, atoms, model_born, model_eps)
    return result


def epsilon_inf_references():
    """Every DFT ε∞ of α-quartz in the profile, as `[(name, how, ase.Atoms, ε∞ (3, 3))]`: each finished ph.x
    DfptWorkChain of group quartz/dfpt (one per structure: the pw.x-relaxed positions, the CIF positions, the
    held-out strained cell), and each held-out `full` label of group quartz/heldout (ε∞ from its finite-field α)."""
    from aiida import orm

    from polmodel.data.dielectric import dielectric_from_polarizability

    references, seen = [], set()
    for node in sorted(orm.load_group(DFPT_GROUP).nodes, key=lambda node: node.ctime, reverse=True):
        if node.process_label != "DfptWorkChain" or not node.is_finished_ok or node.inputs.structure.uuid in seen:
            continue
        structure = node.inputs.structure
        seen.add(structure.uuid)
        name = node.base.extras.get("heldout", None) or ("relaxed" if structure.creator else "cif")
        references.append((name, f"ph.x DfptWorkChain {node.uuid}", structure.get_ase(),
                           node.outputs.dielectric_tensor.get_array("dielectric_tensor")))
    for node in sorted(orm.load_group(HELDOUT_GROUP).nodes, key=lambda node: node.pk):
        if node.base.extras.get("tier", None) != "full" or not node.is_finished_ok:
            continue
        for frame in node.outputs.frames.get_atoms():
            if "polarizability" in frame.info:
                epsilon = dielectric_from_polarizability(np.asarray(frame.info["polarizability"]).reshape(3, 3),
                                                         frame.get_volume())
                references.append((f"{node.base.extras.get('heldout')}", f"pw.x finite-field α, "
                                   f"FieldResponseWorkChain {node.uuid}", frame, epsilon))
    return references


def epsilon_inf_against_dft(model_paths, references=None):
    """ε∞ [⊥, ∥] of each model file (`{name: path}`) on each DFT reference (`epsilon_inf_references()`), with the
    relative errors (%), as a list of rows."""
    from ase import Atoms

    from polmodel import PolCalculator, load

    references = epsilon_inf_references() if references is None else references
    calculators = {name: PolCalculator(load(path)) for name, path in model_paths.items()}
    rows = []
    for name, how, atoms, dft in references:
        bare = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
        row = {"structure": name, "dft": how, "dft_eps_inf": perpendicular_parallel(dft)}
        for model, calculator in calculators.items():
            bare.calc = calculator
            eps = perpendicular_parallel(np.asarray(calculator.get_property("dielectric_tensor", bare)))
            row[model] = {"eps_inf": eps, "error_percent": [100.0 * (m - d) / d for m, d in
                                                            zip(eps, row["dft_eps_inf"])]}
        rows.append(row)
    return rows
