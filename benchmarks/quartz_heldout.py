"""α-quartz: DFT labels of structures the active-learning loop never labelled, and the model's errors on them.

    python benchmarks/quartz_heldout.py submit LOOP   # submit the held-out labels to the daemon (group quartz/heldout)
    python benchmarks/quartz_heldout.py report LOOP   # model of LOOP against them: errors JSON + parity plots
    python benchmarks/quartz_heldout.py link-existing  # link held-out structures made before the calcfunctions did
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
#: the strained held-out cell: +1.5 % along a, -1 % along c, every coordinate moved by up to 0.04 Å (seed MD_SEED)
STRAIN = np.diag([1.015, 1.0, 0.99])
DISPLACEMENT_A = 0.04


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
    """MD_FRAMES 300 K frames of the loop's latest finished exploration that it did not select, each as
    (TrajectoryData, step index)."""
    explorations = [link.node for link in loop.base.links.get_outgoing(link_label_filter="explore_iteration_%").all()
                    if link.node.is_finished_ok]
    if not explorations:
        raise SystemExit(f"loop {loop.pk} has no finished exploration yet")
    exploration = max(explorations, key=lambda node: node.ctime)
    selected = [frame.positions for frame in exploration.outputs.candidates.get_atoms()]
    trajectory = exploration.outputs.trajectories[sorted(exploration.outputs.trajectories)[0]]
    frames = []
    for index in range(trajectory.numsteps - 1, 0, -5):  # 50 fs apart (frames every 10 fs), from the end
        positions = trajectory.get_step_structure(index).get_ase().positions
        if not any(np.allclose(positions, other, atol=1e-6) for other in selected):
            frames.append((trajectory, index))
        if len(frames) == MD_FRAMES:
            break
    return frames[::-1]


def heldout_structures(loop):
    """{key: StructureData} of the held-out structures, each made by a calcfunction from the node it comes from (an
    MD trajectory's step; the CIF structure strained and displaced), so that the graph links them."""
    from aiida import orm

    from polmodel.workflows.structures import read_structures, strained_structure, trajectory_frame

    structures = {f"md_{number}": trajectory_frame(trajectory, orm.Int(index))
                  for number, (trajectory, index) in enumerate(md_frames(loop))}
    structures["strained"] = strained_structure(read_structures(CIF)[0], orm.List(STRAIN.tolist()),
                                                orm.Float(DISPLACEMENT_A), orm.Int(MD_SEED))
    return structures


def submit(loop, with_full=False):
    from aiida import engine, orm

    from polmodel.workflows.field_response import FieldResponseWorkChain
    from polmodel.workflows.quartz import HELDOUT_GROUP

    label = loop.inputs.label
    kwargs = {"protocol": label.protocol.value}
    if "overrides" in label:
        kwargs["overrides"] = label.overrides.get_dict()
    if "pseudo_family" in label:
        kwargs["pseudo_family"] = label.pseudo_family.value
    structures = heldout_structures(loop)
    plan = [(key, "energy_forces") for key in structures]
    if with_full:
        plan.append((f"md_{len(structures) - 2}", "full"))
    group, _ = orm.Group.collection.get_or_create(HELDOUT_GROUP)
    for key, tier in plan:
        builder = FieldResponseWorkChain.get_builder_from_protocol(label.code, structures[key], tier=tier, **kwargs)
        node = engine.submit(builder)
        node.base.extras.set_many({"heldout": key, "tier": tier, "loop": loop.uuid})
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


def link_existing(log=print):
    """Link the held-out structures of group quartz/heldout made before `heldout_structures` made them by
    calcfunctions: each is remade by the calcfunction from what it came from (the trajectory step with its positions,
    searched in every TrajectoryData; the CIF structure strained) and a `structure_difference` record joins the
    remake and the structure. Returns how many were linked with differences below 1e-6 Å; a structure that matches
    nothing is reported, not guessed."""
    from aiida import orm

    from polmodel.workflows.quartz import HELDOUT_GROUP
    from polmodel.workflows.structures import (read_structures, strained_structure, structure_difference,
                                               trajectory_frame)

    # every trajectory's positions, read once for all the structures searched in them
    trajectories = [(trajectory, trajectory.get_positions())
                    for trajectory in orm.QueryBuilder().append(orm.TrajectoryData).all(flat=True)]
    linked, seen = 0, set()
    for node in sorted(orm.load_group(HELDOUT_GROUP).nodes, key=lambda node: node.pk):
        structure, key = node.inputs.structure, node.base.extras.get("heldout")
        already_linked = any(link.node.process_label == "structure_difference"
                             for link in structure.base.links.get_outgoing().all())
        if structure.creator is not None or already_linked or structure.uuid in seen:
            continue
        seen.add(structure.uuid)
        if key == "strained":
            remade = strained_structure(read_structures(CIF)[0], orm.List(STRAIN.tolist()), orm.Float(DISPLACEMENT_A),
                                        orm.Int(MD_SEED))
        else:
            positions = structure.get_ase().positions
            remade = None
            for trajectory, steps in trajectories:
                if steps.shape[1:] != positions.shape:
                    continue
                matching = np.flatnonzero(np.max(np.abs(steps - positions), axis=(1, 2)) < 1e-6)
                if matching.size:
                    remade = trajectory_frame(trajectory, orm.Int(int(matching[0])))
                    break
            if remade is None:
                log(f"{node.pk} {key}: no trajectory step has its positions")
                continue
        record = structure_difference(remade, structure).get_dict()
        log(f"{node.pk} {key}: remade as StructureData<{remade.pk}> by {remade.creator.process_label}, {record}")
        linked += max(record.values()) < 1e-6
    return linked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("submit", "report", "reference", "link-existing"))
    parser.add_argument("loop", nargs="?", help="pk or uuid of the finished ActiveLearningWorkChain")
    parser.add_argument("--output", default="quartz_heldout", help="report: folder of the errors and plots")
    parser.add_argument("--with-full", action="store_true", help="submit: also the full response of one MD frame")
    args = parser.parse_args(argv)
    from aiida import load_profile, orm

    load_profile()
    if args.action == "link-existing":
        print(f"{link_existing()} held-out structure(s) linked to what they came from")
        return 0
    if args.loop is None:
        parser.error(f"{args.action} needs LOOP")
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
