"""α-quartz: DFT labels of structures the active-learning loop never labelled, and the model's errors on them.

    python benchmarks/quartz_heldout.py submit LOOP   # submit the held-out labels to the daemon (group quartz/heldout)
    python benchmarks/quartz_heldout.py submit LOOP --trajectory md_O2Si_000_field0_T600 --with-full  # 600 K ones
    python benchmarks/quartz_heldout.py report LOOP   # model of LOOP against them: errors JSON + parity plots
    python benchmarks/quartz_heldout.py link-existing  # link held-out structures made before the calcfunctions did
    python benchmarks/quartz_heldout.py reference LOOP  # model of LOOP against ph.x (group quartz/dfpt): ε∞, Z*,
                                                        # and with ph.x phonons the Γ IR modes and harmonic ε0
    python benchmarks/quartz_heldout.py dfpt-strained LOOP  # ph.x ε∞ and Z* of the held-out strained cell
    python benchmarks/quartz_heldout.py epsilon --model old=A.pt --model new=B.pt  # ε∞ of model files against
                                                        # every DFT ε∞ in the profile (ph.x; held-out full labels);
                                                        # --members: each member of an ensemble too
    python benchmarks/quartz_heldout.py continue LOOP --overrides data/quartz/loop4.yaml  # the campaign goes on
                                                        # from LOOP, also exploring from two other strained cells

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
#: MD starting cells of the campaign's going-on (`continue`), on either side of the held-out strain and not it:
#: -1.5 % along x and +1 % along z; +1 % along all three (displaced as the held-out one, other seeds)
EXPLORATION_STRAINS = {"strained_x_minus": (np.diag([0.985, 1.0, 1.01]), 1), "strained_iso_plus": (np.eye(3) * 1.01, 2)}


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


def md_frames(loop, trajectory_key=None):
    """MD_FRAMES frames of the loop's latest finished exploration that it did not select, each as (TrajectoryData,
    step index): of its trajectory `trajectory_key` (e.g. md_O2Si_000_field0_T600), by default of its first one (a
    300 K run in every loop of the campaign)."""
    explorations = [link.node for link in loop.base.links.get_outgoing(link_label_filter="explore_iteration_%").all()
                    if link.node.is_finished_ok]
    if not explorations:
        raise SystemExit(f"loop {loop.pk} has no finished exploration yet")
    exploration = max(explorations, key=lambda node: node.ctime)
    selected = [frame.positions for frame in exploration.outputs.candidates.get_atoms()]
    keys = sorted(exploration.outputs.trajectories)
    if trajectory_key is not None and trajectory_key not in keys:
        raise SystemExit(f"no trajectory {trajectory_key} in the loop's last exploration: {', '.join(keys)}")
    trajectory = exploration.outputs.trajectories[trajectory_key or keys[0]]
    frames = []
    for index in range(trajectory.numsteps - 1, 0, -5):  # 50 fs apart (frames every 10 fs), from the end
        positions = trajectory.get_step_structure(index).get_ase().positions
        if not any(np.allclose(positions, other, atol=1e-6) for other in selected):
            frames.append((trajectory, index))
        if len(frames) == MD_FRAMES:
            break
    return frames[::-1]


def heldout_structures(loop, trajectory_key=None):
    """{key: StructureData} of the held-out structures, each made by a calcfunction from the node it comes from (an
    MD trajectory's step; the CIF structure strained and displaced), so that the graph links them. With
    `trajectory_key` only that trajectory's frames, keyed by its temperature (`md600K_0`, ...)."""
    from aiida import orm

    from polmodel.workflows.structures import read_structures, strained_structure, trajectory_frame

    prefix = "md" if trajectory_key is None else f"md{trajectory_key.rsplit('_T', 1)[-1]}K"
    structures = {f"{prefix}_{number}": trajectory_frame(trajectory, orm.Int(index))
                  for number, (trajectory, index) in enumerate(md_frames(loop, trajectory_key))}
    if trajectory_key is None:
        structures["strained"] = strained_structure(read_structures(CIF)[0], orm.List(STRAIN.tolist()),
                                                    orm.Float(DISPLACEMENT_A), orm.Int(MD_SEED))
    return structures


def label_protocol(loop):
    """The keyword arguments of `FieldResponseWorkChain.get_builder_from_protocol` that label like `loop` does."""
    label = loop.inputs.label
    kwargs = {"protocol": label.protocol.value}
    if "overrides" in label:
        kwargs["overrides"] = label.overrides.get_dict()
    if "pseudo_family" in label:
        kwargs["pseudo_family"] = label.pseudo_family.value
    return kwargs


def submit(loop, with_full=False, trajectory_key=None):
    from aiida import engine, orm

    from polmodel.workflows.field_response import FieldResponseWorkChain
    from polmodel.workflows.quartz import HELDOUT_GROUP

    kwargs = label_protocol(loop)
    structures = heldout_structures(loop, trajectory_key)
    md_keys = [key for key in structures if key.startswith("md")]
    plan = [(key, "energy_forces") for key in structures]
    if with_full:   # the last MD frame of the run
        plan.append((md_keys[-1], "full"))
    group, _ = orm.Group.collection.get_or_create(HELDOUT_GROUP)
    for key, tier in plan:
        builder = FieldResponseWorkChain.get_builder_from_protocol(loop.inputs.label.code, structures[key], tier=tier,
                                                                   **kwargs)
        node = engine.submit(builder)
        node.base.extras.set_many({"heldout": key, "tier": tier, "loop": loop.uuid})
        group.add_nodes(node)
        print(f"submitted {key} ({tier}): FieldResponseWorkChain<{node.pk}>")


def strained_heldout_structure():
    """The structure node of the newest held-out `strained` label (group quartz/heldout): the ph.x reference is
    then made on the very node the held-out label was."""
    from aiida import orm

    from polmodel.workflows.quartz import HELDOUT_GROUP

    labels = [node for node in orm.load_group(HELDOUT_GROUP).nodes if node.base.extras.get("heldout", None) == "strained"]
    if not labels:
        raise SystemExit(f"group {HELDOUT_GROUP} has no `strained` label: run `submit LOOP` first")
    return max(labels, key=lambda node: node.ctime).inputs.structure


def submit_strained_dfpt(loop):
    """ph.x ε∞ and Z* (no phonons) of the held-out strained cell with the loop's label settings, in group
    quartz/dfpt with extra `heldout` = 'strained'."""
    from aiida import engine, orm

    from polmodel.workflows.dfpt import DfptWorkChain
    from polmodel.workflows.field_response import FieldResponseWorkChain
    from polmodel.workflows.quartz import DFPT_GROUP

    kwargs = label_protocol(loop)
    # this machine's codes: an imported loop's codes are the machine's that ran it
    builder = FieldResponseWorkChain.get_builder_from_protocol(orm.load_code("pw@localhost"),
                                                               strained_heldout_structure(), **kwargs)
    builder = DfptWorkChain.get_builder_from_field_response(builder, "ph@localhost", phonons=False)
    node = engine.submit(builder)
    node.base.extras.set_many({"heldout": "strained", "loop": loop.uuid})
    orm.Group.collection.get_or_create(DFPT_GROUP)[0].add_nodes(node)
    print(f"submitted ph.x ε∞ of the held-out strained cell: DfptWorkChain<{node.pk}>")


def continue_campaign(loop, overrides_path):
    """Submit a loop going on from `loop` with the overrides in `overrides_path` (YAML, the loop's input ports),
    exploring also from the EXPLORATION_STRAINS cells of the loop's first structure (made by calcfunction)."""
    from aiida import engine, orm

    from polmodel.cli.launch import read_overrides
    from polmodel.workflows.active_learning import ActiveLearningWorkChain
    from polmodel.workflows.structures import strained_structure

    start = loop.inputs.structures[sorted(loop.inputs.structures)[0]]
    cells = {key: strained_structure(start, orm.List(strain.tolist()), orm.Float(DISPLACEMENT_A), orm.Int(seed))
             for key, (strain, seed) in EXPLORATION_STRAINS.items()}
    builder = ActiveLearningWorkChain.get_builder_continuing(loop, pw_code="pw@localhost",
                                                             polmodel_code="polmodel@localhost",
                                                             overrides=read_overrides(overrides_path),
                                                             structures=cells)
    builder.metadata.label = f"α-quartz campaign going on from {loop.uuid} ({pathlib.Path(overrides_path).name})"
    node = engine.submit(builder)
    print(f"submitted ActiveLearningWorkChain<{node.pk}> ({node.uuid})")
    return node


def member_files(paths, directory):
    """{NAME[k]: file} of member k of each ensemble in `paths` ({NAME: file}), written to `directory`: the members
    compared one by one, where one member's α can pull the ensemble's mean (data/quartz/README.md, loop 4)."""
    from polmodel import load
    from polmodel.training.evaluation import ensemble_members

    files = {}
    for name, path in paths.items():
        for k, member in enumerate(ensemble_members(load(path)) or []):
            files[f"{name}[{k}]"] = directory / f"{name}_member{k}.pt"
            member.save(files[f"{name}[{k}]"])
    return files


def epsilon(models, output, members=False):
    """ε∞ [⊥, ∥] of each NAME=FILE model against every DFT ε∞ (polmodel.workflows.quartz.epsilon_inf_against_dft);
    with `members` also of each member of an ensemble, as NAME[k]."""
    from polmodel.workflows.quartz import epsilon_inf_against_dft

    paths = dict(model.split("=", 1) for model in models)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if members:
        paths.update(member_files(paths, output))
    rows = epsilon_inf_against_dft(paths)
    models = {name: str(path) for name, path in paths.items()}
    (output / "epsilon_inf.json").write_text(json.dumps({"models": models, "rows": rows}, indent=2))
    for row in rows:
        cells = "  ".join(f"{name} {row[name]['eps_inf'][0]:.3f}/{row[name]['eps_inf'][1]:.3f} "
                          f"({row[name]['error_percent'][0]:+.1f}%/{row[name]['error_percent'][1]:+.1f}%)"
                          for name in paths)
        print(f"{row['structure']:>9}  DFT {row['dft_eps_inf'][0]:.3f}/{row['dft_eps_inf'][1]:.3f}  {cells}  "
              f"[{row['dft']}]")
    return rows


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
    parser.add_argument("action", choices=("submit", "report", "reference", "link-existing", "dfpt-strained",
                                           "continue", "epsilon"))
    parser.add_argument("loop", nargs="?", help="pk or uuid of the finished ActiveLearningWorkChain")
    parser.add_argument("--output", default="quartz_heldout", help="report: folder of the errors and plots")
    parser.add_argument("--with-full", action="store_true", help="submit: also the full response of one MD frame")
    parser.add_argument("--trajectory", default=None, metavar="KEY",
                        help="submit: frames of this trajectory of the last exploration only (no strained cell)")
    parser.add_argument("--overrides", help="continue: the new loop's overrides (YAML, e.g. data/quartz/loop4.yaml)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE",
                        help="epsilon: a model or ensemble file to compare (repeatable)")
    parser.add_argument("--members", action="store_true", help="epsilon: each member of an ensemble too")
    args = parser.parse_args(argv)
    from aiida import load_profile, orm

    load_profile()
    if args.action == "link-existing":
        print(f"{link_existing()} held-out structure(s) linked to what they came from")
        return 0
    if args.action == "epsilon":
        if not args.model or not all("=" in model for model in args.model):
            parser.error("epsilon needs --model NAME=FILE (one or more)")
        epsilon(args.model, args.output, args.members)
        return 0
    if args.loop is None:
        parser.error(f"{args.action} needs LOOP")
    loop = orm.load_node(args.loop)
    if args.action == "submit":
        submit(loop, args.with_full, args.trajectory)
    elif args.action == "dfpt-strained":
        submit_strained_dfpt(loop)
    elif args.action == "continue":
        if args.overrides is None:
            parser.error("continue needs --overrides")
        continue_campaign(loop, args.overrides)
    elif args.action == "report":
        report(loop, args.output)
    else:
        reference(loop, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
