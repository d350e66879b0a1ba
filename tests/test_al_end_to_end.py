"""The real loop: AlAs (2 atoms, tiny cutoff and k-points), real pw.x labels, real training, real ensemble MD,
submitted to a running daemon (ZeroMQ broker), then the provenance questions answered on the graph it left."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiida import orm

from fixtures_al import TINY_TRAINING

pytestmark = [pytest.mark.aiida, pytest.mark.dft, pytest.mark.daemon, pytest.mark.slow]


@pytest.fixture(scope="module")
def pseudopotential_files(tmp_path_factory):
    """Only Al and As: the loop here needs no others, and ld1.x for the rest would only cost time."""
    from polmodel.plugins.pseudos import generate_pseudopotentials

    return generate_pseudopotentials(tmp_path_factory.mktemp("pseudos_alas"), elements=["Al", "As"])


@pytest.fixture
def al_loop_inputs(alas_structure, pw_code, polmodel_code, pseudo_family):
    def factory(max_iterations=1):
        return {
            "structures": {"alas": alas_structure},
            "label": {
                "code": pw_code,
                "protocol": orm.Str("fast"),
                "overrides": orm.Dict({"scf": {"kpoints_distance": 0.5}}),
                "pseudo_family": orm.Str(pseudo_family.label),
            },
            "train": {
                "train": {"code": polmodel_code, "parameters": orm.Dict({"epochs": 4, "hyperparameters": TINY_TRAINING})},
                "ensemble_size": orm.Int(2),
            },
            "explore": {
                "md": {"code": polmodel_code},
                "parameters": orm.Dict({"steps": 8, "timestep": 1.0, "thermostat": "langevin", "interval": 2,
                                        "born_spread": True}),
                "fields": orm.List([{"kind": "static", "vector": [0.0, 0.0, 0.02]}]),
                "temperatures": orm.List([300.0]),
                "selection": orm.Dict({"force_lower": 1e-4, "force_upper": 50.0, "max_candidates": 1}),
            },
            "candidate_fraction_threshold": orm.Float(0.05),
            "max_iterations": orm.Int(max_iterations),
        }

    return factory


def test_one_real_iteration_on_the_daemon(al_loop_inputs, submit_and_await, aiida_profile, tmp_path):
    from polmodel.workflows.active_learning import ActiveLearningWorkChain
    from polmodel.workflows.provenance import learning_curve, models_trained_by, pw_runs_for_model

    node = submit_and_await(ActiveLearningWorkChain, timeout=900, **al_loop_inputs())
    assert node.is_finished_ok, (node.exit_status, node.exit_message,
                                 [log.message for log in orm.Log.collection.get_logs_for(node)])
    model = node.outputs.model
    dataset = node.outputs.dataset
    assert model.kind == "ensemble" and model.ensemble_size == 2
    assert sorted(model.species) == ["Al", "As"]
    assert model.verify() == model.sha256
    assert dataset.count == 7  # one zero-field and six finite-field frames

    # the iteration record
    (record,) = learning_curve(node)
    assert record["iteration"] == 1 and record["dataset_size"] == 7
    assert record["num_explored_frames"] == 5  # steps 0, 2, 4, 6, 8
    assert 0.0 <= record["candidate_fraction"] <= 1.0
    assert "energy" in record["validation"] and "forces" in record["validation"]

    # which pw.x runs fed the model: every one of them is a finished pw.x calculation of the labelling
    pw_runs = pw_runs_for_model(model)
    assert len(pw_runs) >= 7  # zero field + six fields (+ Berry-phase runs)
    assert all(run.is_finished_ok for run in pw_runs)
    assert {source for source in dataset.sources} <= {run.uuid for run in pw_runs} | {
        out.uuid for run in pw_runs for out in run.base.links.get_outgoing().all_nodes()}
    # which models the labels trained
    assert [m.pk for m in models_trained_by(dataset)] == [model.pk]

    # `verdi node graph generate` on the model draws the chain back to the pw.x runs
    output = tmp_path / "model.dot"
    verdi = Path(sys.executable).parent / "verdi"
    subprocess.run([str(verdi), "-p", aiida_profile.name, "node", "graph", "generate", "-l", "data", "-f", "dot",
                    "-d", "0", "-O", str(output), str(model.pk)], check=True, capture_output=True, timeout=300)
    drawn = {int(pk) for pk in re.findall(r"\bN(\d+)\s*\[", output.read_text())}
    assert model.pk in drawn and {run.pk for run in pw_runs} <= drawn
