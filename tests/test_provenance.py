"""Provenance helpers and `polmodel provenance` on a hand-built graph with the loop's shape:

pw.x CalcJob -> ArrayData -> frames calcfunction -> FramesData -> merge_frames -> FramesData -> TrainCalculation
-> ModelData. (The real graph made by the loop is queried the same way in test_al_end_to_end.py.)
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import calcfunction

from fixtures_al import labelled_frames

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
