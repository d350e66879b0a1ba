"""Published labelled data through AiiDA: the source card, the import calcfunction, the real TrainCalculation,
resumption from a stopped training, and the model's provenance back to the published file."""
import pathlib

import pytest
from aiida import orm

pytestmark = pytest.mark.aiida

CARD = pathlib.Path(__file__).parent / "data" / "allegro_pol" / "SiO2.cut.yaml"


def test_the_card_names_its_problems(tmp_path):
    from polmodel.workflows.external_training import read_source_card

    text = CARD.read_text()
    for old, new, named in (("convention: allegro-pol", "convention: allegropol", "allegropol"),
                            ("  licence: MIT\n", "", "licence"),
                            ("  seed: 0", "  seeds: 0", "seeds"),
                            ("licence_file: LICENSE", "licence_file: LICENCE", "LICENCE")):
        card = tmp_path / "card.yaml"
        for name in ("SiO2.cut.xyz", "LICENSE"):
            (tmp_path / name).write_bytes((CARD.parent / name).read_bytes())
        card.write_text(text.replace(old, new))
        with pytest.raises(ValueError, match=named):
            read_source_card(card)


def test_a_file_that_is_not_the_recorded_one_is_refused(tmp_path):
    from polmodel.workflows.external_training import import_card_frames, read_source_card

    card = read_source_card(CARD)
    changed = tmp_path / "SiO2.cut.xyz"
    changed.write_text(card["file"].read_text().replace("Si ", "Si  ", 1))
    card["file"] = changed
    with pytest.raises(ValueError, match="sha256"):
        import_card_frames(card)


@pytest.mark.slow
def test_a_model_trained_on_imported_frames_names_its_source_and_a_stopped_training_resumes(polmodel_code):
    from aiida.engine import run_get_node

    from polmodel.workflows.external_training import get_builder_from_card, read_source_card
    from polmodel.workflows.provenance import data_ancestors, external_sources, format_external_sources

    card = read_source_card(CARD)
    # max_time_s 0: the training stops after its first epoch of two and leaves its state as an output
    _, first = run_get_node(get_builder_from_card(card, polmodel_code))
    assert first.is_finished_ok, first.exit_message
    frames = first.inputs.frames
    source = frames.creator.inputs.source
    assert frames.count == 10 and frames.sources == [source.uuid]
    assert source.pk in data_ancestors(first.outputs.model)
    (record,) = external_sources(first.outputs.model)
    assert record["repository"] == "https://github.com/mir-group/allegro-pol"
    assert record["commit"] == "7748968cff14d4d18feca80816097db90e371bb1"
    assert record["sha256"] == card["origin"]["sha256"] and record["licence"] == "MIT"
    assert record["imports"] == [(source, frames)] and "MIT License" in frames.creator.inputs.origin["licence_text"]
    assert "scripts/3.Parity/SiO2/SiO2.xyz" in format_external_sources([record])
    assert first.outputs.metrics["members"][0]["stopped"] == "max_time_s"
    checkpoint = first.outputs.checkpoint
    from polmodel.cli import InputError
    from polmodel.cli.launch import stopped_training_checkpoint

    assert stopped_training_checkpoint(str(first.pk)).uuid == checkpoint.uuid      # what `--resume PK` takes

    # the same card without the time limit (how a run executes, not what it computes) goes on from epoch 1
    card["training"]["hyperparameters"].pop("max_time_s")
    _, second = run_get_node(get_builder_from_card(card, polmodel_code, checkpoint=checkpoint))
    assert second.is_finished_ok, second.exit_message
    member = second.outputs.metrics["members"][0]
    assert member["resumed_from_epoch"] == 1 and member["stopped"] == "epochs"
    assert "checkpoint" not in second.outputs
    with pytest.raises(InputError, match="no training under it left a checkpoint"):
        stopped_training_checkpoint(second.uuid)
    assert checkpoint.pk in data_ancestors(second.outputs.model)
    (record,) = external_sources(second.outputs.model)   # two imports of one published file
    assert record["sha256"] == card["origin"]["sha256"] and len(record["imports"]) == 2
