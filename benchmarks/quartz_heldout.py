"""α-quartz: DFT labels of structures the active-learning loop never labelled, and the model's errors on them.

    python benchmarks/quartz_heldout.py submit LOOP   # submit the held-out labels to the daemon (group quartz/heldout)
    python benchmarks/quartz_heldout.py report LOOP   # model of LOOP against them: errors JSON + parity plots
    python benchmarks/quartz_heldout.py reference LOOP  # model of LOOP against ph.x (group quartz/dfpt): ε∞, Z*,
                                                        # and with ph.x phonons the Γ IR modes and harmonic ε0

The held-out structures (all 9-atom cells, the loop's own cell):
- `md_*`: frames of the 300 K MD of LOOP's latest finished exploration (its ensemble of that iteration, Langevin)
  that the loop did not select, 50 fs apart at the end of the run, labelled like the loop's cheap labels
  (`energy_forces`: E, F, stress); with --with-full the last of them also with the `full` response (dipole,
  Born charges, polarizability, ±ε frames: 10 pw.x runs);
- `strained`: the CIF cell strained by +1.5 % along a, -1 % along c, atoms displaced by up to 0.04 Å (seeded),
  `energy_forces`.
The labels use the loop's own label protocol and pseudopotentials (LOOP.inputs.label), so the only difference
from the training labels is the structures. Nothing here is a benchmark of speed.
"""
import argparse
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
CIF = HERE.parent / "data" / "quartz" / "alpha_quartz.cif"
GROUP = "quartz/heldout"
MD_SEED = 20261126
MD_FRAMES = 3


def latest_model(loop):
    """The loop's final ensemble, or while it runs the latest one a finished training made (ModelData)."""
    if "model" in loop.outputs:
        return loop.outputs.model
    trainings = [link.node for link in loop.base.links.get_outgoing(link_label_filter="train_iteration_%").all()
                 if link.node.is_finished_ok]
    if not trainings:
        raise SystemExit(f"loop {loop.pk} has no trained model yet")
    return max(trainings, key=lambda node: node.ctime).outputs.model


def loop_model(loop, directory):
    model = latest_model(loop)
    print(f"model: ModelData<{model.pk}> ({'final' if 'model' in loop.outputs else 'latest training'})",
          file=sys.stderr)
    path = pathlib.Path(directory) / "model.pt"
    model.write(path)
    return path


def md_frames(loop):
    """MD_FRAMES 300 K frames (ase.Atoms) of the loop's latest finished exploration that it did not select."""
    explorations = [link.node for link in loop.base.links.get_outgoing(link_label_filter="explore_iteration_%").all()
                    if link.node.is_finished_ok]
    if not explorations:
        raise SystemExit(f"loop {loop.pk} has no finished exploration yet")
    exploration = max(explorations, key=lambda node: node.ctime)
    selected = [frame.positions for frame in exploration.outputs.candidates.get_atoms()]
    trajectory = exploration.outputs.trajectories[sorted(exploration.outputs.trajectories)[0]]
    frames = []
    for index in range(trajectory.numsteps - 1, 0, -5):  # 50 fs apart (frames every 10 fs), from the end
        atoms = trajectory.get_step_structure(index).get_ase()
        if not any(np.allclose(atoms.positions, positions, atol=1e-6) for positions in selected):
            atoms.info["exploration"] = f"{exploration.pk}/{index}"
            frames.append(atoms)
        if len(frames) == MD_FRAMES:
            break
    return frames[::-1]


def strained_cell():
    from polmodel.workflows.structures import read_structures

    atoms = read_structures(CIF)[0].get_ase()
    strain = np.diag([1.015, 1.0, 0.99])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.positions += np.random.default_rng(MD_SEED).uniform(-0.04, 0.04, size=atoms.positions.shape)
    return atoms


def submit(loop, with_full=False):
    from aiida import engine, orm
    from ase import Atoms

    from polmodel.workflows.field_response import FieldResponseWorkChain

    label = loop.inputs.label
    kwargs = {"protocol": label.protocol.value}
    if "overrides" in label:
        kwargs["overrides"] = label.overrides.get_dict()
    if "pseudo_family" in label:
        kwargs["pseudo_family"] = label.pseudo_family.value
    structures = {f"md_{index}": frame for index, frame in enumerate(md_frames(loop))}
    structures["strained"] = strained_cell()
    plan = [(key, "energy_forces") for key in structures]
    if with_full:
        plan.append((f"md_{len(structures) - 2}", "full"))
    group, _ = orm.Group.collection.get_or_create(GROUP)
    for key, tier in plan:
        atoms = structures[key]
        plain = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
        builder = FieldResponseWorkChain.get_builder_from_protocol(label.code, orm.StructureData(ase=plain),
                                                                   tier=tier, **kwargs)
        node = engine.submit(builder)
        node.base.extras.set_many({"heldout": key, "tier": tier, "loop": loop.uuid,
                                   "source": atoms.info.get("exploration", "strained CIF cell")})
        group.add_nodes(node)
        print(f"submitted {key} ({tier}): FieldResponseWorkChain<{node.pk}>")


def report(loop, output):
    from aiida import orm
    from ase.io import write

    from polmodel import load
    from polmodel.cli.evaluate import evaluate_frames, print_errors

    group = orm.load_group(GROUP)
    frames, done = [], []
    for node in sorted(group.nodes, key=lambda node: node.pk):
        if node.is_finished_ok and "frames" in node.outputs:
            frames.extend(node.outputs.frames.get_atoms())
            done.append(f"{node.base.extras.get('heldout')}/{node.base.extras.get('tier')}<{node.pk}>")
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write(output / "heldout_frames.xyz", frames, format="extxyz")
    model = load(loop_model(loop, output))  # the loop's final ensemble
    result = {"loop": loop.uuid, "labels": done, **evaluate_frames(model, frames, output / "plots")}
    (output / "heldout_errors.json").write_text(json.dumps(result, indent=2))
    print_errors(result["errors"])
    return result


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


def reference(loop, output):
    """The loop's ensemble against the ph.x reference of group quartz/dfpt on the same structure: ε∞ (⊥ = mean of
    xx and yy, ∥ = zz) and Born charges (ph.x's with the acoustic sum rule imposed, like the labels); with ph.x
    phonons also the IR-active Γ modes and the harmonic ε0 (`gamma_modes_against_dfpt`)."""
    from aiida import orm

    from polmodel import PolCalculator, load
    from polmodel.analysis.phonons import born_charges_obeying_sum_rule

    dfpt = [node for node in orm.load_group("quartz/dfpt").nodes if node.is_finished_ok]
    if not dfpt:
        raise SystemExit("no finished DfptWorkChain in group quartz/dfpt")
    with_phonons = [node for node in dfpt if "gamma_phonons" in node.outputs]
    dfpt = max(with_phonons or dfpt, key=lambda node: node.ctime)
    atoms = dfpt.inputs.structure.get_ase()
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    calculator = PolCalculator(load(loop_model(loop, output)))
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
        "loop": loop.uuid, "dfpt": dfpt.uuid,
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
    (output / "reference.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("submit", "report", "reference"))
    parser.add_argument("loop", help="pk or uuid of the finished ActiveLearningWorkChain")
    parser.add_argument("--output", default="quartz_heldout", help="report: folder of the errors and plots")
    parser.add_argument("--with-full", action="store_true", help="submit: also the full response of one MD frame")
    args = parser.parse_args(argv)
    from aiida import load_profile, orm

    load_profile()
    loop = orm.load_node(args.loop)
    if args.action == "submit":
        submit(loop, args.with_full)
    elif args.action == "report":
        report(loop, args.output)
    else:
        reference(loop, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
