"""Labelled data made by another code, in the provenance graph: the original file, where it came from, its frames.

`source_file_node(path, origin)` stores the file as it was published (a SinglefileData of its uncompressed bytes);
`import_external_frames(source, origin, mapping)` is the calcfunction that reads it with
`polmodel.data.external.read_external_frames` into a FramesData. Its `origin` input records the repository, commit,
path, sha256 and licence; a file whose content does not have the recorded sha256 is refused. Every imported frame
carries `info['source']` = the source node's UUID, so `polmodel provenance models --source UUID` and
`polmodel provenance sources MODEL` connect models and the published file both ways.
"""
import hashlib
import io
import os
import tempfile

from aiida import orm
from aiida.engine import calcfunction

from polmodel.plugins.data import FramesData

ORIGIN_KEYS = ("repository", "commit", "path", "sha256", "licence")


def validate_origin(origin):
    """A clear message for an incomplete origin record, or None."""
    missing = [key for key in ORIGIN_KEYS if not str(origin.get(key) or "").strip()]
    if missing:
        return f"the origin of external data must name {list(ORIGIN_KEYS)}; missing or empty: {missing}"
    return None


def source_file_node(path, origin):
    """An unstored SinglefileData of the published file at `path`; ValueError if its sha256 is not the origin's."""
    from polmodel.data.external import read_file_bytes

    content = read_file_bytes(path)
    actual = hashlib.sha256(content).hexdigest()
    if actual != origin["sha256"]:
        raise ValueError(f"{path}: sha256 {actual} is not the recorded {origin['sha256']} of "
                         f"{origin['repository']}@{origin['commit']}:{origin['path']}")
    name = os.path.basename(origin["path"])
    return orm.SinglefileData(io.BytesIO(content), filename=name)


@calcfunction
def import_external_frames(source, origin, mapping):
    """Labelled frames from a published file (`source`, SinglefileData) with the label mapping `mapping` (Dict of
    polmodel.data.external.LabelMapping fields); `origin` (Dict) says where the file came from."""
    from polmodel.data.external import LabelMapping, read_external_frames

    record = origin.get_dict()
    message = validate_origin(record)
    if message:
        raise ValueError(message)
    content = source.get_content(mode="rb")
    if hashlib.sha256(content).hexdigest() != record["sha256"]:
        raise ValueError(f"SinglefileData<{source.pk}> is not the file {record['path']} recorded in the origin")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, source.filename)
        with open(path, "wb") as handle:
            handle.write(content)
        frames = read_external_frames(path, LabelMapping.from_dict(mapping.get_dict()),
                                      source=f"{record['repository']}@{record['commit']}:{record['path']}")
    for frame in frames:
        frame.info["source"] = source.uuid
    return FramesData.from_atoms(frames)
