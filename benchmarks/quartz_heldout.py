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
    from polmodel.workflows.quartz import HELDOUT_GROUP

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
    group, _ = orm.Group.collection.get_or_create(HELDOUT_GROUP)
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
    from ase.io import write

    from polmodel import load
    from polmodel.cli.evaluate import evaluate_frames, print_errors
    from polmodel.workflows.quartz import heldout_frames

    frames, done = heldout_frames()
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write(output / "heldout_frames.xyz", frames, format="extxyz")
    model = load(loop_model(loop, output))  # the loop's final ensemble
    result = {"loop": loop.uuid, "labels": done, **evaluate_frames(model, frames, output / "plots")}
    (output / "heldout_errors.json").write_text(json.dumps(result, indent=2))
    print_errors(result["errors"])
    return result


def reference(loop, output):
    """The loop's ensemble against the ph.x reference (polmodel.workflows.quartz.dfpt_reference)."""
    from polmodel.workflows.quartz import dfpt_reference

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    result = {"loop": loop.uuid, **dfpt_reference(loop_model(loop, output))}
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
