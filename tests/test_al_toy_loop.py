"""The whole active-learning loop through AiiDA — label, train, explore, select, label — in minutes.

THE TOY ORACLE STANDS IN FOR DFT HERE, AND ONLY HERE (loop logic): labels come from the analytic, field-dependent
toy potential (tests/toy_oracle.py) behind the labelling workchain's interface. Training and ensemble MD are the
real `polmodel train` / `polmodel md` CalcJobs of tiny models, run by an in-process AiiDA runner (no daemon).
"""
import numpy as np
import pytest
from aiida import orm

from toy_oracle import ToyOracleActiveLearningWorkChain, toy_loop_inputs

pytestmark = [pytest.mark.aiida, pytest.mark.slow]

#: Iterations within which the toy loop must converge (accurate fraction above 1 - threshold in the last stage).
MAX_ITERATIONS = 4
THRESHOLD = 0.6


def test_toy_oracle_loop_learns(polmodel_code, generate_code):
    from aiida.engine import run_get_node

    inputs = toy_loop_inputs(
        generate_code("pw"), polmodel_code, initial_count=5, label_budget=16, max_full_labels=1,
        # a high learning rate: the tiny model learns the toy's forces in 60 epochs (at 5e-3 and batches of 4 it
        # still predicts ~0 forces after 40, and its members agree everywhere)
        epochs=60, learning_rate=0.03, field=(0.0, 0.0, 1.0),
        schedule=[{"temperatures": [200.0], "field_amplitude": 0.03, "steps": 100}],
        selection={"force_lower": 0.01, "force_upper": 1.5, "force_lower_factor": 1.0, "max_candidates": 4,
                   "min_distance": 1.0},
        stage_threshold=0.9, field_margin=0.03, candidate_fraction_threshold=THRESHOLD, max_iterations=MAX_ITERATIONS)
    _, node = run_get_node(ToyOracleActiveLearningWorkChain, **inputs)
    logs = [log.message for log in orm.Log.collection.get_logs_for(node)]
    assert node.is_finished_ok, (node.exit_status, node.exit_message, logs)
    curve = node.outputs.learning_curve.get_dict()["iterations"]
    accurate = [row["accurate_fraction"] for row in curve]
    print("accurate fraction per iteration:", accurate, "dataset sizes:", [row["dataset_size"] for row in curve])
    assert curve[-1]["converged"], (accurate, logs)
    assert len(curve) <= MAX_ITERATIONS
    assert accurate[-1] > accurate[0]
    # labels followed the explored field: field frames at non-zero fields were added after the first iteration
    efields = [np.linalg.norm(frame.info.get("efield", np.zeros(3))) for frame in node.outputs.dataset.get_atoms()]
    assert max(efields) > 0.0
    # the tiers in the provenance: the initial labels are energy_forces, later ones follow the plan
    tiers = [child.inputs.tier.value for child in node.called if child.process_label == "ToyOracleWorkChain"]
    assert tiers.count("energy_forces") >= 6 and set(tiers) <= {"energy_forces", "field_frames", "full"}
