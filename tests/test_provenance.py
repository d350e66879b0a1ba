"""Provenance helpers and `polmodel provenance` on a hand-built graph with the loop's shape:

pw.x CalcJob -> ArrayData -> frames calcfunction -> FramesData -> merge_frames -> FramesData -> TrainCalculation
-> ModelData. (The real graph made by the loop is queried the same way in test_al_end_to_end.py.)
"""
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from aiida import orm
from aiida.common.exceptions import NotExistent
from aiida.common.links import LinkType
from aiida.engine import calcfunction

from fixtures_al import labelled_frames
from test_setup_profiles import throwaway_postgres_database  # noqa: F401  (fixture)

pytestmark = pytest.mark.aiida


@calcfunction
def frames_from_labels(labels):
    """Stand-in for the DFT workflow's frame-making calcfunction: frames whose source is the pw.x run."""
    from polmodel.plugins.data import FramesData

    source = labels.creator.uuid
    return FramesData.from_atoms(labelled_frames(2, seed=int(labels.get_array("seed")[0]), source=source))


def fake_calcjob(process_type, inputs, outputs, computer):
    node = orm.CalcJobNode(computer=computer, process_type=process_type)
    node.set_option("resources", {"num_machines": 1})
    for label, data in inputs.items():
        node.base.links.add_incoming(data, link_type=LinkType.INPUT_CALC, link_label=label)
    node.store()
    for label, data in outputs.items():
        data.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label=label)
        data.store()
    return node


@pytest.fixture
def provenance_graph(aiida_localhost, generate_fake_model_data):
    """Two pw.x runs -> two frame sets -> merged -> trained; plus a third pw.x run that fed nothing."""
    from polmodel.plugins.data import merge_frames
    from polmodel.workflows.provenance import PW_PROCESS_TYPE, TRAIN_PROCESS_TYPE

    pw_runs, frame_sets = [], []
    for seed in range(3):
        structure = orm.StructureData(cell=np.eye(3) * 4).store()
        labels = orm.ArrayData()
        labels.set_array("seed", np.array([seed]))
        pw_runs.append(fake_calcjob(PW_PROCESS_TYPE, {"structure": structure}, {"output_labels": labels},
                                    aiida_localhost))
        frame_sets.append(frames_from_labels(labels))
    dataset = merge_frames(a=frame_sets[0], b=frame_sets[1])
    model = generate_fake_model_data(store=False)
    train = fake_calcjob(TRAIN_PROCESS_TYPE, {"frames": dataset}, {"model": model}, aiida_localhost)
    # a second model trained on a later merge that also contains the first dataset
    later = merge_frames(dataset=dataset, extra=frame_sets[2])
    later_model = generate_fake_model_data(store=False)
    fake_calcjob(TRAIN_PROCESS_TYPE, {"frames": later}, {"model": later_model}, aiida_localhost)
    return {"pw_runs": pw_runs, "frame_sets": frame_sets, "dataset": dataset, "model": model, "train": train,
            "later_model": later_model}


def test_pw_runs_for_model(provenance_graph):
    from polmodel.workflows.provenance import pw_runs_for_model, training_calculation

    graph = provenance_graph
    assert [node.pk for node in pw_runs_for_model(graph["model"].pk)] == [run.pk for run in graph["pw_runs"][:2]]
    assert [node.pk for node in pw_runs_for_model(graph["later_model"])] == [run.pk for run in graph["pw_runs"]]
    assert training_calculation(graph["model"]).pk == graph["train"].pk


def test_models_trained_by_frames_and_source(provenance_graph):
    from polmodel.workflows.provenance import models_trained_by, models_trained_by_source

    graph = provenance_graph
    both = [graph["model"].pk, graph["later_model"].pk]
    assert [model.pk for model in models_trained_by(graph["frame_sets"][0])] == both
    assert [model.pk for model in models_trained_by(graph["frame_sets"][2])] == [graph["later_model"].pk]
    assert [model.pk for model in models_trained_by_source(graph["pw_runs"][1].uuid)] == both
    assert models_trained_by_source("ffffffff-0000-0000-0000-000000000000") == []


def test_wrong_node_types_are_refused(provenance_graph):
    from polmodel.workflows.provenance import learning_curve, models_trained_by, pw_runs_for_model

    with pytest.raises(TypeError, match="not a ModelData"):
        pw_runs_for_model(provenance_graph["dataset"])
    with pytest.raises(TypeError, match="not a FramesData"):
        models_trained_by(provenance_graph["model"])
    with pytest.raises(TypeError, match="not an ActiveLearningWorkChain"):
        learning_curve(provenance_graph["model"])


def test_provenance_cli(provenance_graph, aiida_profile, capsys):
    from polmodel.cli import main

    graph = provenance_graph
    assert main(["provenance", "--profile", aiida_profile.name, "pw-runs", str(graph["model"].pk)]) == 0
    output = capsys.readouterr().out
    assert "2 pw.x calculation(s)" in output
    assert all(run.uuid in output for run in graph["pw_runs"][:2]) and graph["pw_runs"][2].uuid not in output
    assert main(["provenance", "--profile", aiida_profile.name, "models", "--source", graph["pw_runs"][2].uuid]) == 0
    output = capsys.readouterr().out
    assert "1 model(s)" in output and graph["later_model"].uuid in output
    assert main(["provenance", "--profile", aiida_profile.name, "pw-runs", str(graph["dataset"].pk)]) == 2
    assert "not a ModelData" in capsys.readouterr().err


def test_labelled_frames_come_out_of_the_graph_for_train_and_evaluate(provenance_graph, aiida_profile, capsys,
                                                                      tmp_path):
    """`polmodel provenance frames` writes a model's training frames, a frame set or a group's frame sets as
    extended XYZ that read_frames takes back with every label and the uuid of the pw.x run behind each frame."""
    from polmodel.cli import main
    from polmodel.data.frames import read_frames

    graph = provenance_graph
    out = tmp_path / "training.xyz"
    assert main(["provenance", "--profile", aiida_profile.name, "frames", str(graph["model"].pk), "--output",
                 str(out)]) == 0
    assert "wrote 4 labelled frame(s) of the training frames of ModelData" in capsys.readouterr().out
    frames = read_frames(out)
    assert sorted({frame.info["source"] for frame in frames}) == sorted(run.uuid for run in graph["pw_runs"][:2])
    original = graph["dataset"].get_atoms()
    for written, stored in zip(frames, original):
        np.testing.assert_array_equal(written.positions, stored.positions)
        np.testing.assert_allclose(written.arrays["forces"], stored.arrays["forces"], rtol=1e-12)
        assert written.info["energy"] == pytest.approx(stored.info["energy"], rel=1e-12)
    group = orm.Group(label="test-frames-group").store()
    group.add_nodes([graph["frame_sets"][2]])
    assert main(["provenance", "--profile", aiida_profile.name, "frames", "test-frames-group", "--output",
                 str(tmp_path / "group.xyz")]) == 0
    assert [frame.info["source"] for frame in read_frames(tmp_path / "group.xyz")] == [graph["pw_runs"][2].uuid] * 2
    assert main(["provenance", "--profile", aiida_profile.name, "frames", str(graph["pw_runs"][0].pk), "--output",
                 str(tmp_path / "x.xyz")]) == 2
    assert "give a FramesData, a loop, a ModelData or a group" in capsys.readouterr().err
    assert not (tmp_path / "x.xyz").exists()


def test_format_learning_curve():
    from polmodel.workflows.provenance import format_learning_curve

    table = format_learning_curve([
        {"iteration": 1, "dataset_size": 14, "validation": {"energy": {"mae": 0.0123}, "forces": {"mae": 0.2}},
         "candidate_fraction": 0.4, "failed_fraction": 0.1, "converged": False},
        {"iteration": 2, "dataset_size": 28, "validation": {"energy": {"mae": 0.005}}, "candidate_fraction": 0.01,
         "failed_fraction": 0.0, "converged": True},
    ])
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["1", "14", "0.0123", "0.2", "-", "-", "0.400", "0.100", "no"]
    assert lines[2].split()[-1] == "yes"


def test_verdi_graph_shows_the_chain(provenance_graph, aiida_profile, tmp_path):
    """`verdi node graph generate` on the model runs and its output contains every node of the chain."""
    graph = provenance_graph
    output = tmp_path / "model.dot"
    verdi = Path(sys.executable).parent / "verdi"
    subprocess.run([str(verdi), "-p", aiida_profile.name, "node", "graph", "generate", "-l", "data", "-d", "0",
                    "-f", "dot", "-O", str(output), str(graph["model"].pk)], check=True, capture_output=True,
                   text=True, timeout=300)
    text = output.read_text()
    nodes = {int(pk) for pk in re.findall(r"\bN(\d+)\s*\[", text)}
    edges = {(int(a), int(b)) for a, b in re.findall(r"\bN(\d+)\s*->\s*N(\d+)", text)}
    chain = [graph["model"], graph["train"], graph["dataset"], *graph["frame_sets"][:2], *graph["pw_runs"][:2]]
    assert {node.pk for node in chain} <= nodes
    assert graph["pw_runs"][2].pk not in nodes
    # every pw.x run reaches the model along the drawn edges
    for run in graph["pw_runs"][:2]:
        reached, frontier = {run.pk}, [run.pk]
        while frontier:
            current = frontier.pop()
            for a, b in edges:
                if a == current and b not in reached:
                    reached.add(b)
                    frontier.append(b)
        assert graph["model"].pk in reached


# --------------------------------------------------------------------------------------------------------------
# The questions at the size of a 10-iteration loop (tests/fake_loop_graph.py), against a plain walk
# --------------------------------------------------------------------------------------------------------------

#: issue 16: every provenance helper and CLI answers on a 10-iteration loop in under 10 s
TIME_BOUND_S = 10.0


class ReferenceGraph:
    """The whole graph read into memory (every node's type, every link), for plain breadth-first walks one node at
    a time, written independently of the batched queries under test."""

    def __init__(self):
        builder = orm.QueryBuilder().append(
            orm.Node, project=["id", "node_type", "process_type", "attributes.process_label", "ctime"])
        self.nodes = {pk: {"node_type": node_type, "process_type": process_type, "process_label": label, "ctime": ctime}
                      for pk, node_type, process_type, label, ctime in builder.iterall()}
        builder = orm.QueryBuilder().append(orm.Node, tag="source", project="id")
        builder.append(orm.Node, with_incoming="source", project="id", edge_project="type")
        self.inputs, self.outputs = {}, {}
        for source, target, link_type in builder.iterall():
            self.inputs.setdefault(target, []).append((source, link_type))
            self.outputs.setdefault(source, []).append((target, link_type))

    def ancestors(self, pk):
        """Nodes reached backwards from `pk` along input_calc and create links."""
        seen, queue = set(), [pk]
        while queue:
            current = queue.pop(0)
            for source, link_type in self.inputs.get(current, []):
                if link_type in ("input_calc", "create") and source not in seen:
                    seen.add(source)
                    queue.append(source)
        return seen

    def pw_runs_of(self, pk):
        runs = [node for node in self.ancestors(pk)
                if self.nodes[node]["process_type"] == "aiida.calculations:quantumespresso.pw"]
        return sorted(runs, key=lambda node: (self.nodes[node]["ctime"], node))

    def models_trained_by(self, frame_set_pks):
        """Forward through merge_frames calls to every FramesData made from the sets, then the models their
        TrainCalculations created."""
        seen, queue, models = set(frame_set_pks), list(frame_set_pks), set()
        while queue:
            current = queue.pop(0)
            for process, link_type in self.outputs.get(current, []):
                if link_type != "input_calc":
                    continue
                for created, created_type in self.outputs.get(process, []):
                    if created_type != "create":
                        continue
                    kind = self.nodes[created]["node_type"]
                    if self.nodes[process]["process_label"] == "merge_frames" and kind.endswith("FramesData."):
                        if created not in seen:
                            seen.add(created)
                            queue.append(created)
                    elif (self.nodes[process]["process_type"] == "aiida.calculations:polmodel.train"
                          and kind.endswith("ModelData.")):
                        models.add(created)
        return models


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def make_fake_loop(iterations=10, first_labels="label_initial"):
    from fake_loop_graph import FakeLoopGraph

    try:
        computer = orm.load_computer("fake-cluster")
    except NotExistent:
        computer = orm.Computer(label="fake-cluster", hostname="localhost", transport_type="core.local",
                                scheduler_type="core.direct", workdir="/tmp/fake-cluster").store()
    start = time.perf_counter()
    graph = FakeLoopGraph(computer, iterations=iterations, first_labels=first_labels)
    print(f"built a fake {iterations}-iteration loop: {len(graph.pw_runs)} pw.x runs in "
          f"{time.perf_counter() - start:.1f} s")
    return graph


@pytest.fixture(scope="module")
def ten_iteration_loop(aiida_profile):
    return make_fake_loop()


def check_questions_on_loop(graph):
    """Every question against the plain walk, each within TIME_BOUND_S (the measured time is printed)."""
    from polmodel.workflows.provenance import (learning_curve, models_trained_by, models_trained_by_source,
                                               pw_runs_for_model)

    assert len(graph.pw_runs) >= 200
    timings = {}
    reference = ReferenceGraph()
    for name, model in (("final model", graph.models[-1]), ("model 3", graph.models[2])):
        runs, timings[f"pw_runs_for_model({name})"] = timed(pw_runs_for_model, model)
        assert [run.pk for run in runs] == reference.pw_runs_of(model.pk)
    # the final model saw every label; model 3 only those of the rounds before it was trained
    assert len(pw_runs_for_model(graph.models[-1])) == len(graph.pw_runs)
    assert len(pw_runs_for_model(graph.models[2])) == 3 * len(graph.pw_runs) // len(graph.label_frames)

    for round_index in (0, 5):
        frames = graph.label_frames[round_index][1]
        models, timings[f"models_trained_by(round {round_index})"] = timed(models_trained_by, frames)
        assert {model.pk for model in models} == reference.models_trained_by([frames.pk])
        assert [model.pk for model in models] == [model.pk for model in graph.models[round_index:]]
    source = graph.pw_runs[len(graph.pw_runs) // 2].uuid
    models, timings["models_trained_by_source"] = timed(models_trained_by_source, source)
    holders = [frames for round_ in graph.label_frames for frames in round_ if source in frames.sources]
    assert len(holders) == 1
    assert {model.pk for model in models} == reference.models_trained_by([frames.pk for frames in holders])

    records, timings["learning_curve"] = timed(learning_curve, graph.loop)
    assert [record["iteration"] for record in records] == list(range(1, len(graph.models) + 1))
    print("  ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    assert max(timings.values()) < TIME_BOUND_S, timings


def check_cli_on_loop(graph, profile_name, capsys):
    from polmodel.cli import main

    timings = {}
    for name, argv in (("pw-runs", ["pw-runs", str(graph.models[-1].pk)]),
                       ("models --frames", ["models", "--frames", str(graph.label_frames[0][0].pk)]),
                       ("learning-curve", ["learning-curve", str(graph.loop.pk)])):
        status, timings[name] = timed(main, ["provenance", "--profile", profile_name, *argv])
        assert status == 0
        output = capsys.readouterr().out
        if name == "pw-runs":
            assert f"{len(graph.pw_runs)} pw.x calculation(s)" in output
            assert all(run.uuid in output for run in graph.pw_runs)
        elif name == "models --frames":
            assert f"{len(graph.models)} model(s)" in output
        else:
            assert len(output.splitlines()) == len(graph.models) + 1
    with capsys.disabled():
        print("CLI: " + "  ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()))
    assert max(timings.values()) < TIME_BOUND_S, timings


def test_questions_on_ten_iteration_loop(ten_iteration_loop, capsys):
    with capsys.disabled():
        check_questions_on_loop(ten_iteration_loop)


def test_cli_on_ten_iteration_loop(ten_iteration_loop, aiida_profile, capsys):
    check_cli_on_loop(ten_iteration_loop, aiida_profile.name, capsys)


def test_graph_of_ten_iteration_loop(ten_iteration_loop, aiida_profile, tmp_path, capsys):
    """`polmodel provenance graph`: one box per labelling, training and exploration, pw.x runs counted, fast."""
    from polmodel.cli import main

    graph = ten_iteration_loop
    dot_file, svg_file = tmp_path / "loop.dot", tmp_path / "loop.svg"
    status, seconds = timed(main, ["provenance", "--profile", aiida_profile.name, "graph", str(graph.models[-1].pk),
                                   "--output", str(dot_file)])
    assert status == 0 and f"ActiveLearningWorkChain<{graph.loop.pk}>" in capsys.readouterr().out
    text = dot_file.read_text()
    names = re.findall(r"^\s*(\w+) \[", text, flags=re.MULTILINE)
    edges = set(re.findall(r"^\s*(\w+) -> (\w+)", text, flags=re.MULTILINE))
    steps = [name for name in names if name.startswith(("labelling_", "training_", "exploration_"))]
    assert sorted(steps) == sorted([f"labelling_{i}" for i in range(10)] + [f"training_{i}" for i in range(1, 11)]
                                   + [f"exploration_{i}" for i in range(1, 11)])
    assert len(names) <= 70  # 30 steps, 10 datasets, 10 models, 10 candidate sets, the structures
    assert f"{len(graph.pw_runs)} pw.x runs" in text  # counted, not drawn
    assert text.count("20 pw.x runs") == 10  # each labelling: 2 structures x 10 runs
    for iteration in range(1, 11):
        dataset, model = graph.datasets[iteration - 1], graph.models[iteration - 1]
        candidates = graph.candidates[iteration - 1]
        assert {(f"N{dataset.pk}", f"training_{iteration}"), (f"training_{iteration}", f"N{model.pk}"),
                (f"N{model.pk}", f"exploration_{iteration}"), (f"exploration_{iteration}", f"N{candidates.pk}"),
                (f"labelling_{iteration - 1}", f"N{dataset.pk}")} <= edges
        if iteration < 10:
            assert (f"N{candidates.pk}", f"labelling_{iteration}") in edges
            assert (f"N{dataset.pk}", f"N{graph.datasets[iteration].pk}") in edges
    assert 'penwidth=3' in text.split(f"N{graph.models[-1].pk} [")[1].split("]")[0]  # the model asked about
    status, svg_seconds = timed(main, ["provenance", "--profile", aiida_profile.name, "graph", str(graph.loop.pk),
                                       "--output", str(svg_file)])
    assert status == 0 and svg_file.read_text().lstrip().startswith(("<?xml", "<svg"))
    with capsys.disabled():
        print(f"graph: {len(names)} nodes; .dot {seconds:.2f} s, .svg (with graphviz dot) {svg_seconds:.2f} s")
    assert max(seconds, svg_seconds) < TIME_BOUND_S


def test_graph_of_a_continued_loop_draws_its_first_labelling_with_its_pw_runs(aiida_profile, tmp_path, capsys):
    """A continued loop first labels what the previous loop left pending (`label_pending_...`): that step is drawn
    with its pw.x runs and feeds the first dataset, as a fresh loop's initial labelling does."""
    from polmodel.cli import main

    graph = make_fake_loop(iterations=2, first_labels="label_pending")
    dot_file = tmp_path / "continued.dot"
    assert main(["provenance", "--profile", aiida_profile.name, "graph", str(graph.loop.pk), "--output",
                 str(dot_file)]) == 0
    capsys.readouterr()
    text = dot_file.read_text()
    names = re.findall(r"^\s*(\w+) \[", text, flags=re.MULTILINE)
    edges = set(re.findall(r"^\s*(\w+) -> (\w+)", text, flags=re.MULTILINE))
    assert sorted(name for name in names if name.startswith(("labelling_", "training_", "exploration_"))) == [
        "exploration_1", "exploration_2", "labelling_0", "labelling_1", "training_1", "training_2"]
    assert text.count("20 pw.x runs") == 2       # both labellings: 2 structures x 10 runs
    assert ("labelling_0", f"N{graph.datasets[0].pk}") in edges


def test_graph_refuses_other_nodes(provenance_graph, aiida_profile, capsys):
    from polmodel.cli import main

    assert main(["provenance", "--profile", aiida_profile.name, "graph", str(provenance_graph["model"].pk)]) == 2
    assert "not trained by an active-learning loop" in capsys.readouterr().err
    assert main(["provenance", "graph", "1", "--output", "loop.jpeg"]) == 2
    assert "--output loop.jpeg" in capsys.readouterr().err


# last in the module: switching to the PostgreSQL profile and back closes the storage the module fixture's nodes
# were loaded from
@pytest.mark.postgres
@pytest.mark.slow
def test_questions_on_ten_iteration_loop_postgresql(throwaway_postgres_database, aiida_config, aiida_profile_factory,
                                                    tmp_path, capsys):
    """The same questions and CLI on core.psql_dos (the production storage), in a profile of its own."""
    database = throwaway_postgres_database
    storage = {"database_engine": "postgresql_psycopg", "database_hostname": "localhost", "database_port": 5432,
               "database_name": database["name"], "database_username": database["username"],
               "database_password": database["password"], "repository_uri": (tmp_path / "repository").as_uri()}
    with aiida_profile_factory(aiida_config, storage_backend="core.psql_dos", storage_config=storage) as profile:
        graph = make_fake_loop()
        with capsys.disabled():
            check_questions_on_loop(graph)
        check_cli_on_loop(graph, profile.name, capsys)
