"""FramesData, ModelData and the merge_frames calcfunction."""
import hashlib

import numpy as np
import pytest

from fixtures_al import BATIO3_SPECIES, labelled_frames

pytestmark = pytest.mark.aiida


def test_frames_roundtrip_keeps_labels_and_attributes(generate_frames_data):
    node = generate_frames_data(count=3, seed=1)
    assert node.count == 3
    assert node.species == sorted(BATIO3_SPECIES)
    assert node.efields == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.01], [0.0, 0.0, 0.02]]
    frames = node.get_atoms()
    original = labelled_frames(3, seed=1)
    assert len(frames) == 3
    assert np.allclose(frames[2].positions, original[2].positions)
    assert np.allclose(frames[2].info["efield"], [0, 0, 0.02])
    # labels are where docs/conventions.md puts them, not in the SinglePointCalculator ASE's reader makes
    assert frames[1].info["energy"] == pytest.approx(original[1].info["energy"])
    assert np.allclose(frames[1].info["dipole"], original[1].info["dipole"])
    assert np.allclose(frames[1].arrays["forces"], original[1].arrays["forces"])


def test_merge_frames_is_a_calcfunction_keeping_every_frame(generate_frames_data):
    from aiida.common.links import LinkType

    from polmodel.plugins.data import FramesData, merge_frames

    first = generate_frames_data(count=2, seed=1, source="aaaaaaaa-0000-0000-0000-000000000001")
    second = generate_frames_data(count=3, seed=2, source="aaaaaaaa-0000-0000-0000-000000000002")
    merged = merge_frames(a=first, b=second)
    assert isinstance(merged, FramesData) and merged.is_stored
    assert merged.count == 5 and len(merged.get_atoms()) == 5
    assert merged.efields == first.efields + second.efields
    assert merged.sources == sorted(first.sources + second.sources)
    creator = merged.base.links.get_incoming(link_type=LinkType.CREATE).one().node
    assert creator.process_label == "merge_frames"
    assert {link.node.pk for link in creator.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all()} == {
        first.pk, second.pk
    }
    # the texts are joined as written: no label is re-rounded by a parse/write round trip
    text = merged.base.repository.get_object_content("frames.xyz", mode="r")
    assert text == first.base.repository.get_object_content("frames.xyz", mode="r") + \
        second.base.repository.get_object_content("frames.xyz", mode="r")


def test_merge_with_empty_set(generate_frames_data):
    from polmodel.plugins.data import FramesData, merge_frames

    empty = FramesData.from_atoms([]).store()
    assert empty.count == 0 and empty.get_atoms() == []
    merged = merge_frames(a=empty, b=generate_frames_data(count=2))
    assert merged.count == 2 and len(merged.get_atoms()) == 2


def test_model_data_hash_mismatch_gives_a_clear_error(generate_fake_model_data):
    from polmodel.plugins.data import MODEL_FILENAME, ModelHashError

    node = generate_fake_model_data(store=False)
    assert node.verify() == node.sha256
    node.base.repository.put_object_from_bytes(b"someone replaced the file", MODEL_FILENAME)
    with pytest.raises(ModelHashError, match="refusing to use it"):
        node.verify()
    with pytest.raises(ModelHashError):
        node.write("/dev/null")


def test_model_data_from_real_file(tiny_model_file, tmp_path):
    from polmodel.plugins.data import ModelData

    node = ModelData.from_file(tiny_model_file, metrics={"energy": {"mae": 0.1}}).store()
    assert node.kind == "ensemble"
    assert node.ensemble_size == 2
    assert node.species == BATIO3_SPECIES
    assert node.cutoff == pytest.approx(4.0)
    assert isinstance(node.hyperparameters, dict)
    assert node.metrics == {"energy": {"mae": 0.1}}
    assert node.sha256 == hashlib.sha256(tiny_model_file.read_bytes()).hexdigest()
    node.write(tmp_path / "copy.pt")
    assert (tmp_path / "copy.pt").read_bytes() == tiny_model_file.read_bytes()
    loaded = node.load()
    assert len(loaded.members) == 2


def test_model_data_refuses_a_foreign_file(aiida_profile, tmp_path):
    from polmodel.nn.serialization import ModelFileError
    from polmodel.plugins.data import ModelData

    path = tmp_path / "not_a_model.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(ModelFileError):
        ModelData.from_file(path)
