"""A loop exported with `verdi archive create`, imported into an empty profile, goes on where it stopped.

THE TOY ORACLE STANDS IN FOR DFT HERE (loop logic, tests/toy_oracle.py); training and ensemble MD are the real
`polmodel train` / `polmodel md` CalcJobs of tiny models run in-process. What is tested is the continuation: the
new loop's inputs are the imported loop's nodes, its pending candidates are labelled first, its first training is
a warm start from the imported ensemble, and the new model's provenance reaches the original label calculations.
"""
import pytest
from aiida import orm

from toy_oracle import ToyOracleActiveLearningWorkChain, toy_loop_inputs

pytestmark = [pytest.mark.aiida, pytest.mark.slow]


def one_iteration_inputs(pw_code, polmodel_code):
    """One iteration of the toy loop: initial labels, training, exploration (its candidates stay unlabelled)."""
    return toy_loop_inputs(
        pw_code, polmodel_code, initial_count=3, label_budget=6, max_full_labels=0, epochs=5,
        schedule=[{"temperatures": [300.0], "field_amplitude": 0.0, "steps": 20},
                  {"temperatures": [300.0, 600.0], "field_amplitude": 0.0, "steps": 20}],
        # an untrained ensemble disagrees everywhere: a wide window so that candidates exist
        selection={"force_lower": 1e-6, "force_upper": 1e6, "force_lower_factor": None, "max_candidates": 3,
                   "min_distance": 0.0},
        stage_threshold=0.0)  # every iteration earns the next stage


def test_exported_loop_continues_in_an_empty_profile(aiida_profile_for_import, polmodel_code, generate_code,
                                                     tmp_path):
    from aiida.common.links import LinkType
    from aiida.engine import run_get_node
    from aiida.tools.archive import create_archive, import_archive

    from polmodel.workflows.active_learning import ActiveLearningWorkChain
    from polmodel.workflows.provenance import data_ancestors

    _, first = run_get_node(ToyOracleActiveLearningWorkChain, **one_iteration_inputs(generate_code("pw"), polmodel_code))
    assert first.is_finished_ok, first.exit_status
    candidates = [link.node for link in first.base.links.get_outgoing(link_label_filter="explore_%").all()]
    pending = candidates[0].outputs.candidates
    assert pending.count > 0, "the test needs unlabelled candidates in the exported loop"
    labels_before = {node.uuid for node in first.called if node.process_label == "ToyOracleWorkChain"}
    uuids = {"loop": first.uuid, "dataset": first.outputs.dataset.uuid, "model": first.outputs.model.uuid,
             "dataset_count": first.outputs.dataset.count, "pending": pending.uuid}
    archive = tmp_path / "loop.aiida"
    create_archive([first], filename=archive)

    aiida_profile_for_import.reset_storage()
    assert not orm.QueryBuilder().append(orm.Node).count()
    import_archive(archive)
    imported = orm.load_node(uuids["loop"])

    # the "new machine": its own localhost computer is the imported one, configured here
    computer = orm.load_computer("localhost")
    if not computer.is_configured:
        computer.configure(safe_interval=0.0)
    builder = ActiveLearningWorkChain.get_builder_continuing(imported.pk, max_iterations=1, pw_code="pw@localhost",
                                                             polmodel_code="polmodel@localhost")
    assert builder.initial_frames.uuid == uuids["dataset"]
    assert builder.initial_model.uuid == uuids["model"]
    assert builder.initial_stage.value == 1
    assert builder.pending_candidates.uuid == uuids["pending"]
    _, second = run_get_node(builder)
    assert second.is_finished_ok, (second.exit_status, [log.message for log in orm.Log.collection.get_logs_for(second)])

    # the pending candidates were labelled before the first training, and joined the imported frames
    pending_labels = [node for node in second.called if node.process_label == "ToyOracleWorkChain"]
    call_labels = [node.base.links.get_incoming(link_type=LinkType.CALL_WORK).one().link_label
                   for node in pending_labels]
    assert pending_labels and all(label.startswith("label_pending") for label in call_labels), call_labels
    record = second.outputs.learning_curve.get_dict()["iterations"][0]
    assert record["dataset_size"] == uuids["dataset_count"] + sum(node.outputs.frames.count for node in pending_labels)
    assert record["stage"] == 1
    # warm start: the first training of the new loop started from the imported ensemble
    train = next(node for node in second.called if node.process_label == "TrainEnsembleWorkChain")
    assert train.inputs.initial_model.uuid == uuids["model"]
    # provenance: the new model goes back through the imported frames to the original label calculations
    ancestors = data_ancestors(second.outputs.model)
    original = [called for uuid in labels_before for called in orm.load_node(uuid).called]
    assert original and all(node.pk in ancestors for node in original)
