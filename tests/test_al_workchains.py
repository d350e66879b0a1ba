"""Workchain logic with fake children (aiida-quantumespresso style): every branch of the outlines, no pw.x, no daemon.

The workchain is instantiated, its context filled with finished fake child nodes, and its outline steps called one
by one; submissions are intercepted, so each test runs in well under a second.
"""
import json

import numpy as np
import pytest
from aiida import orm
from aiida.engine import ToContext

from fixtures_al import batio3_atoms

pytestmark = pytest.mark.aiida

FIELDS = [{"kind": "static", "vector": [0.0, 0.0, 0.01]}, {"kind": "cosine", "amplitude": 0.02, "period_fs": 50.0,
                                                           "axis": [0, 0, 1]}]
MD_PARAMETERS = {"steps": 20, "timestep": 1.0, "thermostat": "langevin", "interval": 5}


class SubmitRecorder:
    """Stands in for `WorkChain.submit`: records (process class or builder, inputs) and returns a placeholder."""

    def __init__(self, generate_fake_child):
        self.calls = []
        self._fake = generate_fake_child

    def __call__(self, process, inputs=None, **kwargs):
        self.calls.append((process, dict(inputs or {}, **kwargs)))
        return self._fake()


@pytest.fixture
def structures(aiida_profile):
    return {f"s{index}": orm.StructureData(ase=batio3_atoms(0.05, seed=index)) for index in range(2)}


@pytest.fixture
def explore_inputs(generate_fake_model_data, polmodel_code, structures):
    def factory(**overrides):
        inputs = {
            "model": generate_fake_model_data(),
            "structures": structures,
            "md": {"code": polmodel_code},
            "parameters": orm.Dict(MD_PARAMETERS),
            "fields": orm.List(FIELDS),
            "temperatures": orm.List([100.0, 300.0]),
            "selection": orm.Dict({"force_lower": 0.05, "force_upper": 0.5, "max_candidates": 3}),
        }
        inputs.update(overrides)
        return inputs

    return factory


@pytest.fixture
def al_inputs(polmodel_code, generate_code, structures):
    def factory(**overrides):
        inputs = {
            "structures": structures,
            "label": {"code": generate_code("pw"), "protocol": orm.Str("fast")},
            "train": {"train": {"code": polmodel_code, "parameters": orm.Dict({"epochs": 2})},
                      "ensemble_size": orm.Int(2)},
            "explore": {
                "md": {"code": polmodel_code},
                "parameters": orm.Dict(MD_PARAMETERS),
                "fields": orm.List(FIELDS[:1]),
                "temperatures": orm.List([300.0]),
            },
            "candidate_fraction_threshold": orm.Float(0.1),
            "max_iterations": orm.Int(3),
        }
        inputs.update(overrides)
        return inputs

    return factory


def fake_trajectory(force_std, seed=0, polarizability_spread=None):
    """A stored TrajectoryData as MdParser makes it, with the given per-frame max_force_std (and, when given, the
    per-frame polarizability_spread that MD with born_spread records)."""
    from polmodel.plugins.parsers import parse_trajectory_frames, trajectory_node

    frames = []
    for index, spread in enumerate(force_std):
        atoms = batio3_atoms(0.02 + 0.05 * index, seed=seed * 100 + index)
        atoms.info.update(step=index * 5, time_fs=index * 5.0, efield=[0, 0, 0.01], energy=-1.0, max_force_std=spread,
                          polarization=[0, 0, 0.1], polarization_std=[0, 0, 0.001])
        if polarizability_spread is not None:
            atoms.info.update(max_born_charge_std=0.01, polarizability_spread=polarizability_spread[index])
        frames.append(atoms)
    return trajectory_node(parse_trajectory_frames(frames)).store()


# --------------------------------------------------------------------------------------------- explore
def test_explore_submits_one_md_per_structure_field_temperature(generate_al_workchain, explore_inputs,
                                                                 generate_fake_child):
    process = generate_al_workchain("polmodel.explore", explore_inputs())
    assert process.validate_inputs() is None
    recorder = SubmitRecorder(generate_fake_child)
    process.submit = recorder
    result = process.run_md()
    assert isinstance(result, ToContext)
    assert len(recorder.calls) == 2 * 2 * 2
    parameters = [inputs["parameters"].get_dict() for _, inputs in recorder.calls]
    assert {p["temperature"] for p in parameters} == {100.0, 300.0}
    assert sorted(p["seed"] for p in parameters) == list(range(8))  # every run its own seed
    assert all(p["steps"] == 20 for p in parameters)
    assert sorted(json.dumps(p["field"], sort_keys=True) for p in parameters) == sorted(
        json.dumps(f, sort_keys=True) for f in FIELDS for _ in range(4))


def test_explore_refuses_unknown_species(generate_al_workchain, explore_inputs, generate_fake_model_data):
    process = generate_al_workchain("polmodel.explore", explore_inputs(model=generate_fake_model_data(species=("Ba", "O"))))
    exit_code = process.validate_inputs()
    assert exit_code.status == process.exit_codes.ERROR_UNKNOWN_SPECIES.status
    assert "Ti" in exit_code.message


def test_explore_refuses_single_model(generate_al_workchain, explore_inputs, generate_fake_model_data):
    process = generate_al_workchain("polmodel.explore", explore_inputs(model=generate_fake_model_data(ensemble_size=1)))
    assert process.validate_inputs().status == process.exit_codes.ERROR_NOT_AN_ENSEMBLE.status


def test_explore_refuses_negative_period(generate_al_workchain, explore_inputs):
    bad = [{"kind": "cosine", "amplitude": 0.02, "period_fs": -5.0, "axis": [0, 0, 1]}]
    process = generate_al_workchain("polmodel.explore", explore_inputs(fields=orm.List(bad)))
    exit_code = process.validate_inputs()
    assert exit_code.status == process.exit_codes.ERROR_INVALID_PARAMETERS.status
    assert "period" in exit_code.message


def test_explore_skips_failed_md_and_selects(generate_al_workchain, explore_inputs, generate_fake_child):
    process = generate_al_workchain("polmodel.explore", explore_inputs(temperatures=orm.List([300.0])))
    keys = [f"md_{key}" for key, *_ in process.md_runs()]
    assert len(keys) == 4
    spreads = [[0.01, 0.2, 0.3], [0.01, 0.01, 0.9], [0.25, 0.01, 0.01]]
    for index, key in enumerate(keys[:3]):
        process.ctx[key] = generate_fake_child({"trajectory": fake_trajectory(spreads[index], seed=index)})
    process.ctx[keys[3]] = generate_fake_child(exit_status=310)
    assert process.inspect_md() is None
    assert len(process.ctx.trajectories) == 3
    process.select()
    statistics = process.ctx.statistics.get_dict()
    # frame 0 of each run (step 0, the labelled starting structure) is not explored: 6 frames, not 9
    assert statistics["num_frames"] == 6
    assert (statistics["num_accurate"], statistics["num_candidates"], statistics["num_failed"]) == (3, 2, 1)
    assert statistics["num_selected"] == 2
    candidates = process.ctx.candidates
    assert candidates.count == 2
    origins = [atoms.info["origin"] for atoms in candidates.get_atoms()]
    # the two candidates 0.3 (run 0, frame 2) and 0.2 (run 0, frame 1), in a random order; run 2's frame 0 (0.25)
    # is its start, and run 1's frame 2 (0.9) is above the upper level: never selected
    uuids = [process.ctx.trajectories[key].uuid for key in sorted(process.ctx.trajectories)]
    assert sorted(origins) == [f"{uuids[0]}:1", f"{uuids[0]}:2"]
    # each candidate carries the field it was sampled at (its label follows it) and its response spread
    for atoms in candidates.get_atoms():
        assert np.allclose(atoms.info["efield"], [0, 0, 0.01]) and atoms.info["response_spread"] > 0
        # and the temperature of the MD run it came from, which its labels carry into the model's domain
        assert atoms.info["sampled_temperature_K"] == 300.0
    process.results()


def test_explore_selects_a_frame_where_the_members_agree_on_forces_and_disagree_on_alpha(
        generate_al_workchain, explore_inputs, generate_fake_child):
    selection = orm.Dict({"force_lower": 0.05, "force_upper": 2.0, "polarizability_threshold": 0.002})
    process = generate_al_workchain("polmodel.explore", explore_inputs(temperatures=orm.List([300.0]),
                                                                       selection=selection))
    keys = [f"md_{key}" for key, *_ in process.md_runs()]
    # every frame's forces agree (0.01 < 0.05); frame 2 of the first run disagrees on α (0.005 > 0.002)
    for index, key in enumerate(keys):
        alpha = [0.0, 0.001, 0.005] if index == 0 else [0.0, 0.001, 0.001]
        process.ctx[key] = generate_fake_child({"trajectory": fake_trajectory([0.01] * 3, seed=index,
                                                                              polarizability_spread=alpha)})
    assert process.inspect_md() is None
    process.select()
    statistics = process.ctx.statistics.get_dict()
    assert statistics["num_candidates"] == 1 and statistics["num_selected"] == 1
    (candidate,) = process.ctx.candidates.get_atoms()
    uuid = process.ctx.trajectories[sorted(process.ctx.trajectories)[0]].uuid
    assert candidate.info["origin"] == f"{uuid}:2"
    assert "response_spread_ratio" not in candidate.info     # a fixed threshold: the tiers rank by Z* spread


def test_a_candidate_whose_members_disagree_on_alpha_beyond_its_level_gets_the_full_response(
        generate_al_workchain, explore_inputs, generate_fake_child):
    """Thresholds that follow the errors (`response_threshold_factor`): the exploration measures each candidate's
    response spread against its level, and the label plan gives the full response only where it is above."""
    from polmodel.workflows.active_learning import plan_candidate_labels

    selection = orm.Dict({"force_lower": 0.05, "force_upper": 2.0, "polarizability_threshold": 0.002,
                          "response_threshold_factor": 2.0})
    process = generate_al_workchain("polmodel.explore", explore_inputs(temperatures=orm.List([300.0]),
                                                                       selection=selection))
    keys = [f"md_{key}" for key, *_ in process.md_runs()]
    # the first run: frame 1 a candidate by its forces only (0.1 > 0.05, α 0.001), frame 2 by α only (0.005)
    for index, key in enumerate(keys):
        forces, alpha = ([0.01, 0.1, 0.01], [0.0, 0.001, 0.005]) if index == 0 else ([0.01] * 3, [0.0, 0.001, 0.001])
        process.ctx[key] = generate_fake_child({"trajectory": fake_trajectory(forces, seed=index,
                                                                              polarizability_spread=alpha)})
    assert process.inspect_md() is None
    process.select()
    candidates = process.ctx.candidates
    ratios = sorted(atoms.info["response_spread_ratio"] for atoms in candidates.get_atoms())
    assert ratios == pytest.approx([0.5, 2.5])
    plan = plan_candidate_labels(candidates, orm.Int(20), orm.Int(10), orm.Int(2))["plan"].get_dict()
    tiers = {round(atoms.info["response_spread_ratio"], 6): plan["labels"][f"structure_{index:03d}"]["tier"]
             for index, atoms in enumerate(candidates.get_atoms())}
    # two full labels allowed and in the budget: only the frame beyond its α level gets one
    assert tiers == {2.5: "full", 0.5: "field_frames"}


def test_explore_all_md_failed(generate_al_workchain, explore_inputs, generate_fake_child):
    process = generate_al_workchain("polmodel.explore", explore_inputs())
    for key, *_ in process.md_runs():
        process.ctx[f"md_{key}"] = generate_fake_child(exit_status=300)
    assert process.inspect_md().status == process.exit_codes.ERROR_ALL_MD_FAILED.status


# --------------------------------------------------------------------------------------------- train_ensemble
def test_train_ensemble_refuses_empty_set(generate_al_workchain, polmodel_code):
    from polmodel.plugins.data import FramesData

    inputs = {"frames": FramesData.from_atoms([]).store(), "train": {"code": polmodel_code}}
    process = generate_al_workchain("polmodel.train_ensemble", inputs)
    process.setup()
    assert process.validate_frames().status == process.exit_codes.ERROR_NO_FRAMES.status


def test_train_ensemble_passes_size_and_retries_with_new_seed(generate_al_workchain, polmodel_code,
                                                               generate_frames_data, generate_fake_child):
    inputs = {"frames": generate_frames_data(4), "train": {"code": polmodel_code,
                                                           "parameters": orm.Dict({"epochs": 3, "seed": 7})},
              "ensemble_size": orm.Int(3)}
    process = generate_al_workchain("polmodel.train_ensemble", inputs)
    process.setup()
    assert process.validate_frames() is None
    assert process.ctx.inputs["parameters"].get_dict() == {"epochs": 3, "seed": 7, "ensemble_size": 3}
    process.handle_crashed_training(generate_fake_child(exit_status=300))
    assert process.ctx.inputs["parameters"]["seed"] == 1007


# --------------------------------------------------------------------------------------------- active learning
def test_al_refuses_no_structures(generate_al_workchain, al_inputs):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(structures={}))
    assert process.setup().status == process.exit_codes.ERROR_NO_STRUCTURES.status


def fake_builder():
    return type("Builder", (), {"metadata": type("M", (), {})()})()


def test_al_initial_labels_failed_label_skipped(generate_al_workchain, al_inputs, generate_fake_child,
                                                generate_frames_data):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_data={"count": orm.Int(2), "max_strain": orm.Float(0.03), "max_displacement": orm.Float(0.02)}))
    process.setup()
    assert process.should_label_initial()
    recorder = SubmitRecorder(generate_fake_child)
    process.submit = recorder
    tiers, labelled = [], []
    process.label_builder = lambda structure, tier, field_vectors=(): (
        tiers.append(tier) or labelled.append(structure) or fake_builder())
    result = process.run_initial_labels()
    # each structure and two strained and displaced copies of it, all with the cheap tier
    assert len(recorder.calls) == 6 and set(tiers) == {"energy_forces"}
    assert process.ctx.label_keys == [f"label_initial_s{s}_{i:03d}" for s in range(2) for i in range(3)]
    assert isinstance(result, ToContext)
    assert labelled[0].creator.process_label == "initial_structures"  # provenance of the copies
    copies = [node.get_ase() for node in labelled]
    ideal = process.inputs.structures["s0"].get_ase()
    strained = [atoms for atoms in copies if not np.allclose(atoms.cell.array, ideal.cell.array)]
    assert len(strained) == 4  # the ideal structures are labelled as they are, the copies are strained

    good = generate_frames_data(count=3)
    for key in process.ctx.label_keys:
        process.ctx[key] = generate_fake_child(exit_status=401)
    process.ctx["label_initial_s0_000"] = generate_fake_child({"frames": good})
    process.inspect_labels()
    assert process.ctx.dataset.count == 3
    assert process.check_initial_set() is None
    # the failed label is in the report, not fatal
    reports = [log.message for log in orm.Log.collection.get_logs_for(process.node)]
    assert any("label_initial_s1_000" in message and "skipped" in message for message in reports)


def test_al_given_structures_get_their_own_tier(generate_al_workchain, al_inputs, generate_fake_child):
    """`initial_data.given_tier` full: the given structures get the full response, their copies stay cheap."""
    process = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_data={"count": orm.Int(2), "given_tier": orm.Str("full")}))
    process.setup()
    process.submit = SubmitRecorder(generate_fake_child)
    tiers = []
    process.label_builder = lambda structure, tier, field_vectors=(): tiers.append(tier) or fake_builder()
    process.run_initial_labels()
    # labels are submitted in key order: each given structure (_000), then its two copies
    assert process.ctx.label_keys == [f"label_initial_s{s}_{i:03d}" for s in range(2) for i in range(3)]
    assert tiers == ["full", "energy_forces", "energy_forces"] * 2

    wrong = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_data={"count": orm.Int(2), "given_tier": orm.Str("everything")}))
    assert wrong.setup().status == wrong.exit_codes.ERROR_INVALID_SCHEDULE.status


def test_al_structure_refused_by_the_label_builder_is_skipped(generate_al_workchain, al_inputs, generate_fake_child):
    process = generate_al_workchain("polmodel.active_learning", al_inputs())
    process.setup()
    recorder = SubmitRecorder(generate_fake_child)
    process.submit = recorder

    def label_builder(structure, tier, field_vectors=()):
        if np.allclose(structure.get_ase().positions, process.inputs.structures["s0"].get_ase().positions):
            raise ValueError("atoms 1 (Ti) and 2 (O) are 0.244 Å apart (< 0.5 Å): overlapping atoms")
        return type("Builder", (), {"metadata": type("M", (), {})()})()

    process.label_builder = label_builder
    process.run_initial_labels()
    assert len(recorder.calls) == 13 and "label_initial_s0_000" not in process.ctx.label_keys
    reports = [log.message for log in orm.Log.collection.get_logs_for(process.node)]
    assert any("label_initial_s0_000 refused" in message and "overlapping atoms" in message for message in reports)


def test_al_every_initial_label_failed(generate_al_workchain, al_inputs, generate_fake_child):
    process = generate_al_workchain("polmodel.active_learning", al_inputs())
    process.setup()
    process.ctx.label_keys = ["label_initial_s0_000"]
    process.ctx["label_initial_s0_000"] = generate_fake_child(exit_status=401)
    process.inspect_labels()
    exit_code = process.check_initial_set()
    assert exit_code.status == process.exit_codes.ERROR_EMPTY_INITIAL_SET.status


def test_al_empty_initial_frames(generate_al_workchain, al_inputs):
    from polmodel.plugins.data import FramesData

    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=FramesData.from_atoms([]).store()))
    process.setup()
    assert not process.should_label_initial()
    exit_code = process.check_initial_set()
    assert exit_code.status == process.exit_codes.ERROR_EMPTY_INITIAL_SET.status
    assert "no frames" in exit_code.message


def test_al_unknown_species_in_exploration_structures(generate_al_workchain, al_inputs, generate_frames_data):
    from ase import Atoms

    strange = {"s9": orm.StructureData(ase=Atoms("PbTiO3", positions=batio3_atoms().positions, cell=np.eye(3) * 4,
                                                 pbc=True))}
    process = generate_al_workchain("polmodel.active_learning",
                                 al_inputs(structures=strange, initial_frames=generate_frames_data(2)))
    process.setup()
    exit_code = process.check_initial_set()
    assert exit_code.status == process.exit_codes.ERROR_UNKNOWN_SPECIES.status
    assert "Pb" in exit_code.message


def iterate_once(process, generate_fake_child, generate_fake_model_data, statistics, force_rmse=0.2,
                 response_rmse=None):
    """Run train -> inspect_train -> explore -> inspect_explore of one iteration with fake children;
    `response_rmse` ({quantity: RMSE}) adds validation errors of Z* and α to the fake training's metrics."""
    recorder = SubmitRecorder(generate_fake_child)
    process.submit = recorder
    process.run_train()
    validation = {"energy": {"mae": 0.01, "rmse": 0.02}, "forces": {"mae": 0.5 * force_rmse, "rmse": force_rmse}}
    validation.update({quantity: {"mae": 0.5 * rmse, "rmse": rmse} for quantity, rmse in (response_rmse or {}).items()})
    metrics = orm.Dict({"validation": validation})
    process.ctx.train = generate_fake_child({"model": generate_fake_model_data(), "metrics": metrics})
    assert process.inspect_train() is None
    process.run_explore()
    candidates_count = statistics.pop("_candidates", 2)
    from polmodel.plugins.data import FramesData

    candidates = FramesData.from_atoms([batio3_atoms(0.1, seed=50 + i) for i in range(candidates_count)])
    process.ctx.explore = generate_fake_child({"candidates": candidates, "statistics": orm.Dict(statistics)})
    assert process.inspect_explore() is None
    return recorder


def stats(candidate_fraction, failed_fraction=0.0, selected=2):
    return {"num_frames": 100, "candidate_fraction": candidate_fraction, "failed_fraction": failed_fraction,
            "accurate_fraction": 1 - candidate_fraction - failed_fraction, "num_selected": selected,
            "_candidates": selected}


def test_al_loop_labels_candidates_then_converges(generate_al_workchain, al_inputs, generate_frames_data,
                                                 generate_fake_child, generate_fake_model_data):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=generate_frames_data(4)))
    process.setup()
    assert process.check_initial_set() is None
    assert process.should_iterate()

    recorder = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.4))
    train_inputs = recorder.calls[0][1]
    assert train_inputs["frames"].count == 4
    assert train_inputs["train"]["parameters"]["seed"] == 100
    assert train_inputs["ensemble_size"].value == 2
    assert set(recorder.calls[1][1]["structures"]) == {"s0", "s1"}
    record = process.ctx.summaries["iteration_01"].get_dict()
    assert record["dataset_size"] == 4 and record["candidate_fraction"] == 0.4 and not record["converged"]
    assert record["validation"]["forces"]["mae"] == 0.1
    assert process.should_label_candidates()

    # label the two candidates: one succeeds, one fails and is skipped
    process.label_builder = lambda structure, tier, field_vectors=(): fake_builder()
    process.run_candidate_labels()
    assert process.ctx.label_keys == ["label_iter01_structure_000", "label_iter01_structure_001"]
    process.ctx["label_iter01_structure_000"] = generate_fake_child({"frames": generate_frames_data(3, seed=9)})
    process.ctx["label_iter01_structure_001"] = generate_fake_child(exit_status=402)
    process.inspect_labels()
    assert process.ctx.dataset.count == 7
    assert process.should_iterate()

    iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.02, 0.01))
    assert process.ctx.converged
    assert not process.should_label_candidates()
    assert not process.should_iterate()
    process.results()
    outputs = process.outputs
    assert {"model", "dataset", "learning_curve", "iterations"} <= set(outputs)
    assert set(outputs["iterations"]) == {"iteration_01", "iteration_02"}
    assert outputs["dataset"].count == 7
    curve = outputs["learning_curve"].get_dict()
    assert [row["dataset_size"] for row in curve["iterations"]] == [4, 7]
    assert [row["converged"] for row in curve["iterations"]] == [False, True]


def test_al_stops_at_max_iterations_without_labelling(generate_al_workchain, al_inputs, generate_frames_data,
                                                     generate_fake_child, generate_fake_model_data):
    process = generate_al_workchain("polmodel.active_learning",
                                 al_inputs(initial_frames=generate_frames_data(4), max_iterations=orm.Int(1)))
    process.setup()
    iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.5))
    assert not process.ctx.converged
    assert not process.should_label_candidates()  # the last iteration's candidates would never be trained on
    assert not process.should_iterate()


def test_al_no_candidates_selected_skips_labelling(generate_al_workchain, al_inputs, generate_frames_data,
                                                   generate_fake_child, generate_fake_model_data):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=generate_frames_data(4)))
    process.setup()
    iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.0, 0.5, selected=0))
    assert not process.ctx.converged
    assert not process.should_label_candidates()
    assert process.should_iterate()


def test_al_training_failure_is_an_exit_code(generate_al_workchain, al_inputs, generate_frames_data,
                                             generate_fake_child):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=generate_frames_data(4)))
    process.setup()
    process.submit = SubmitRecorder(generate_fake_child)
    process.run_train()
    process.ctx.train = generate_fake_child(exit_status=401)
    assert process.inspect_train().status == process.exit_codes.ERROR_TRAINING_FAILED.status


def test_al_exploration_failure_is_an_exit_code(generate_al_workchain, al_inputs, generate_frames_data,
                                                generate_fake_child):
    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=generate_frames_data(4)))
    process.setup()
    process.ctx.iteration = 1
    process.ctx.explore = generate_fake_child(exit_status=402)
    assert process.inspect_explore().status == process.exit_codes.ERROR_EXPLORATION_FAILED.status


# --------------------------------------------------------------------------------------------- demo
def test_demo_inputs_are_valid_and_the_loop_is_found_again(generate_al_workchain, polmodel_code, generate_code):
    """The demo's inputs pass the loop's spec, and a re-run finds the submitted loop through its extra."""
    from polmodel.workflows import demo_batio3 as demo

    generate_code("pw")
    inputs = demo.demo_inputs()
    assert len(inputs["structures"]) == len(demo.DEMO["displacements"])
    process = generate_al_workchain("polmodel.active_learning", inputs)
    assert process.setup() is None
    assert demo.find_demo_loop() is None
    process.node.base.extras.set(demo.DEMO_EXTRA, demo.DEMO_VERSION)
    assert demo.find_demo_loop().pk == process.node.pk


# --------------------------------------------------------------------------------------------- tiers, schedule, seeds
def candidate_frames(efields, spreads, temperatures=None):
    from polmodel.plugins.data import FramesData

    frames = []
    for index, (efield, spread) in enumerate(zip(efields, spreads)):
        atoms = batio3_atoms(0.1, seed=70 + index)
        atoms.info.update(origin=f"trajectory:{index}", efield=np.asarray(efield, dtype=float), response_spread=spread)
        if temperatures is not None:
            atoms.info["sampled_temperature_K"] = temperatures[index]
        frames.append(atoms)
    return FramesData.from_atoms(frames)


def test_al_labels_of_explored_candidates_carry_their_md_temperature_into_the_dataset(
        generate_al_workchain, al_inputs, generate_frames_data, generate_fake_child):
    """The merged dataset's frames of a candidate's label record the MD temperature the candidate was sampled at
    (a model trained on them records the highest in its domain); the initial frames record none, and every label
    line stays as the label wrote it."""
    from polmodel.data.domain import training_domain

    process = generate_al_workchain("polmodel.active_learning", al_inputs(initial_frames=generate_frames_data(4)))
    process.setup()
    process.ctx.iteration = 1
    process.ctx.candidates = candidate_frames([[0, 0, 0], [0, 0, 0]], [0.1, 0.2], temperatures=[300.0, 600.0])
    process.submit = SubmitRecorder(generate_fake_child)
    labelled = []
    process.label_builder = lambda structure, tier, field_vectors=(): labelled.append(structure) or fake_builder()
    process.run_candidate_labels()
    keys = process.ctx.label_keys
    plan = labelled[0].creator.outputs.plan.get_dict()["labels"]
    expected = {key: plan[key.removeprefix("label_iter01_")]["sampled_temperature_K"] for key in keys}
    assert sorted(expected.values()) == [300.0, 600.0]
    labels = {key: generate_frames_data(2, seed=30 + index) for index, key in enumerate(keys)}
    for key in keys:
        process.ctx[key] = generate_fake_child({"frames": labels[key]})
    process.inspect_labels()

    frames = process.ctx.dataset.get_atoms()
    assert len(frames) == 8 and all("sampled_temperature_K" not in frame.info for frame in frames[:4])
    for key, merged in zip(keys, (frames[4:6], frames[6:8])):
        for frame, label in zip(merged, labels[key].get_atoms()):
            assert frame.info["sampled_temperature_K"] == expected[key]
            assert frame.info["energy"] == label.info["energy"] and np.array_equal(frame.positions, label.positions)
            assert np.array_equal(frame.arrays["forces"], label.arrays["forces"])
    assert training_domain(frames, cutoff=4.0)["sampled_temperature_K"] == 600.0


def test_al_labels_candidates_at_their_tiers_within_the_budget(generate_al_workchain, al_inputs, generate_frames_data,
                                                                generate_fake_child):
    """Cheap tier at the sampled field for all, the full response for the largest P / Z* spread, budget in pw.x runs."""
    process = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_frames=generate_frames_data(4), label_budget=orm.Int(14), full_label_cost=orm.Int(10),
        max_full_labels=orm.Int(1)))
    process.setup()
    process.ctx.iteration = 1
    process.ctx.candidates = candidate_frames(
        [[0, 0, 0], [0, 0, 0.02], [0, 0, 0], [0.03, 0, 0], [0, 0, 0.01]], [0.1, 0.2, 0.9, 0.3, 0.05])
    recorder = SubmitRecorder(generate_fake_child)
    process.submit = recorder
    planned, labelled = {}, []
    process.label_builder = lambda structure, tier, field_vectors=(): (labelled.append(structure) or planned.setdefault(
        len(planned), (tier, [list(v) for v in field_vectors]))) and fake_builder()
    process.run_candidate_labels()
    tiers = [planned[index] for index in sorted(planned)]
    # candidate 2 (largest spread) is labelled fully (10 runs); then 0 (1 run), 1 (2 runs: zero field + 0.02 V/Å)
    # fit into 14; candidate 3 (2 runs) does not (15 > 14), candidate 4 would not either
    assert tiers == [("energy_forces", []), ("field_frames", [[0.0, 0.0, 0.02]]), ("full", [])]
    assert process.ctx.label_keys == ["label_iter01_structure_000", "label_iter01_structure_001",
                                      "label_iter01_structure_002"]
    plan_node = labelled[0].creator
    assert plan_node.process_label == "plan_candidate_labels"
    plan = plan_node.outputs.plan.get_dict()
    assert plan["pw_runs"] == 13 and plan["budget"] == 14 and plan["num_candidates"] == 5


def test_al_full_response_only_where_the_born_charge_spread_exceeds_the_limit(
        generate_al_workchain, al_inputs, generate_frames_data, generate_fake_child):
    """`full_label_born_spread`: no full response where the ensemble agrees on Z*; the limit needs MD Z* spreads."""
    def planned_tiers(limit):
        process = generate_al_workchain("polmodel.active_learning", al_inputs(
            initial_frames=generate_frames_data(4), label_budget=orm.Int(14), full_label_cost=orm.Int(10),
            max_full_labels=orm.Int(1), full_label_born_spread=orm.Float(limit),
            explore={**al_inputs()["explore"], "parameters": orm.Dict({**MD_PARAMETERS, "born_spread": True})}))
        assert process.setup() is None
        process.ctx.iteration = 1
        process.ctx.candidates = candidate_frames(
            [[0, 0, 0], [0, 0, 0.02], [0, 0, 0], [0.03, 0, 0], [0, 0, 0.01]], [0.1, 0.2, 0.9, 0.3, 0.05])
        process.submit = SubmitRecorder(generate_fake_child)
        tiers = []
        process.label_builder = lambda structure, tier, field_vectors=(): tiers.append(tier) or fake_builder()
        process.run_candidate_labels()
        return tiers

    # below the largest spread (0.9 e): candidate 2 is labelled fully, as without a limit
    assert planned_tiers(0.5).count("full") == 1
    # above it: all five get the cheap tier (1 + 2 + 1 + 2 + 2 = 8 of 14 runs)
    assert planned_tiers(0.95) == ["energy_forces", "field_frames", "energy_forces", "field_frames", "field_frames"]
    without_spreads = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_frames=generate_frames_data(4), full_label_born_spread=orm.Float(0.3)))
    exit_code = without_spreads.setup()
    assert exit_code.status == without_spreads.exit_codes.ERROR_INVALID_SCHEDULE.status
    assert "born_spread" in exit_code.message


def explore_call(recorder):
    return next(inputs for process, inputs in recorder.calls if getattr(process, "__name__", "") == "ExploreWorkChain")


def test_al_fresh_md_seeds_warm_start_and_adaptive_window(generate_al_workchain, al_inputs, generate_frames_data,
                                                          generate_fake_child, generate_fake_model_data):
    explore = {"md": None, "parameters": orm.Dict(dict(MD_PARAMETERS, seed=5)), "fields": orm.List(FIELDS[:1]),
               "temperatures": orm.List([300.0]),
               "selection": orm.Dict({"force_lower": 0.05, "force_upper": 2.0, "force_lower_factor": 3.0,
                                      "min_distance_fraction": 0.8})}
    inputs = al_inputs(initial_frames=generate_frames_data(4))
    explore["md"] = inputs["explore"]["md"]
    inputs["explore"] = explore
    process = generate_al_workchain("polmodel.active_learning", inputs)
    process.setup()
    first = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.4))
    model_1 = process.ctx.model
    second = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.4))
    md_1, md_2 = (explore_call(recorder)["parameters"].get_dict() for recorder in (first, second))
    assert md_1["seed"] == 1005 and md_2["seed"] == 2005  # every iteration its own MD seeds
    selection_1, selection_2 = (explore_call(recorder)["selection"].get_dict() for recorder in (first, second))
    assert selection_1["seed"] != selection_2["seed"]
    # the lower trust level is 3 × the validation force RMSE (0.2 eV/Å in the fake metrics)
    assert selection_1["force_lower"] == pytest.approx(0.6)
    # the closest approach follows the labelled frames (BaTiO3 with 0.05 Å noise: Ti–O near 2.0 Å, O–O near 2.8 Å)
    shortest = selection_1["labelled_pair_distances"]
    assert 1.75 < shortest["O-Ti"] < 2.0 and 2.5 < shortest["O-O"] < 2.83 and shortest["Ba-O"] > shortest["O-Ti"]
    # warm start: the second training starts from the first model; the first from scratch
    assert "initial_model" not in first.calls[0][1]
    assert second.calls[0][1]["initial_model"].uuid == model_1.uuid


def test_al_lower_trust_level_never_rises_within_a_stage_and_starts_afresh_in_the_next(
        generate_al_workchain, al_inputs, generate_frames_data, generate_fake_child, generate_fake_model_data):
    schedule = [{"temperatures": [100.0], "field_amplitude": 0.0, "steps": 10},
                {"temperatures": [300.0], "field_amplitude": 0.0, "steps": 10}]
    inputs = al_inputs(initial_frames=generate_frames_data(4), schedule=orm.List(schedule),
                       stage_threshold=orm.Float(0.8))
    inputs["explore"]["selection"] = orm.Dict({"force_lower": 0.05, "force_upper": 2.0, "force_lower_factor": 3.0})
    process = generate_al_workchain("polmodel.active_learning", inputs)
    process.setup()
    levels = []
    for force_rmse, candidate_fraction in ((0.2, 0.4), (0.3, 0.4), (0.1, 0.03), (0.3, 0.4)):
        recorder = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(candidate_fraction),
                                force_rmse=force_rmse)
        levels.append(explore_call(recorder)["selection"]["force_lower"])
    # stage 0: 0.6, then not 0.9 but 0.6 (the estimate rose), then 0.3; the accurate fraction 0.97 moves the loop to
    # stage 1, whose first level follows its own error again
    assert levels == pytest.approx([0.6, 0.6, 0.3, 0.9])
    assert process.ctx.stage == 1


def test_al_response_thresholds_follow_the_validation_errors_of_z_and_alpha(
        generate_al_workchain, al_inputs, generate_frames_data, generate_fake_child, generate_fake_model_data):
    inputs = al_inputs(initial_frames=generate_frames_data(4))
    inputs["explore"]["selection"] = orm.Dict({"force_lower": 0.05, "force_upper": 2.0, "force_lower_factor": 3.0,
                                               "response_threshold_factor": 2.0})
    process = generate_al_workchain("polmodel.active_learning", inputs)
    process.setup()
    thresholds = []
    for errors in ({"born_effective_charges": 0.1, "polarizability": 0.004},
                   {"born_effective_charges": 0.05, "polarizability": 0.006}):
        recorder = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.4),
                                response_rmse=errors)
        selection = explore_call(recorder)["selection"].get_dict()
        thresholds.append((selection["born_charge_threshold"], selection["polarizability_threshold"]))
    # 2 × the model's Z* and α errors; the α estimate rose in the second iteration, its threshold did not
    assert thresholds == [pytest.approx((0.2, 0.008)), pytest.approx((0.1, 0.008))]


def test_al_schedule_advances_and_fields_follow_the_labels(generate_al_workchain, al_inputs, generate_fake_child,
                                                          generate_fake_model_data):
    from polmodel.plugins.data import FramesData

    frames = [batio3_atoms(0.05, seed=index) for index in range(3)]
    for atoms in frames:
        atoms.info.update(energy=-1.0, efield=np.zeros(3))
        atoms.arrays["forces"] = np.zeros((5, 3))
    frames[2].info["efield"] = np.array([0.0, 0.0, 0.01])
    schedule = [{"temperatures": [100.0], "field_amplitude": 0.0, "steps": 10},
                {"temperatures": [100.0, 300.0], "field_amplitude": 0.1, "steps": 20}]
    process = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_frames=FramesData.from_atoms(frames).store(), schedule=orm.List(schedule),
        stage_threshold=orm.Float(0.8), field_margin=orm.Float(0.02), candidate_fraction_threshold=orm.Float(0.1)))
    assert process.setup() is None
    # stage 0: no field, its temperatures and steps; accurate 0.97 would converge, but not before the last stage
    first = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.03))
    explore = explore_call(first)
    assert explore["fields"].get_list() == [{"kind": "static", "vector": [0.0, 0.0, 0.0]}]
    assert explore["temperatures"].get_list() == [100.0] and explore["parameters"]["steps"] == 10
    assert not process.ctx.converged and process.ctx.stage == 1
    # stage 1: the field is capped at the labelled 0.01 V/Å plus the 0.02 V/Å margin, not the stage's 0.1
    second = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.5))
    explore = explore_call(second)
    (field,) = explore["fields"].get_list()
    assert np.linalg.norm(field["vector"]) == pytest.approx(0.03)
    assert explore["temperatures"].get_list() == [100.0, 300.0] and explore["parameters"]["steps"] == 20
    assert process.ctx.stage == 1 and not process.ctx.converged
    record = process.ctx.summaries["iteration_02"].get_dict()
    assert record["stage"] == 1 and record["exploration"]["covered_field"] == pytest.approx(0.01)
    third = iterate_once(process, generate_fake_child, generate_fake_model_data, stats(0.03))
    assert process.ctx.converged  # the last stage converges


def test_al_refuses_a_schedule_that_gets_easier(generate_al_workchain, al_inputs, generate_frames_data):
    schedule = [{"temperatures": [300.0], "field_amplitude": 0.1, "steps": 10},
                {"temperatures": [300.0], "field_amplitude": 0.0, "steps": 10}]
    process = generate_al_workchain("polmodel.active_learning", al_inputs(
        initial_frames=generate_frames_data(2), schedule=orm.List(schedule)))
    exit_code = process.setup()
    assert exit_code.status == process.exit_codes.ERROR_INVALID_SCHEDULE.status and "easier" in exit_code.message
