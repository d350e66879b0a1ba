"""The model and ensemble file format: torch.save of a plain dictionary, read back with torch.load(weights_only=True).

Layout (format_version 2):
    format "polmodel", format_version 2, kind "model" | "ensemble", polmodel_version,
    species [str], cutoff float, one entry per member (a model is one member) in each of
    architecture [dict]: the PolModel constructor keywords (`PolModel(species, cutoff, **architecture)`),
    training [dict | None]: the optimisation settings the member was trained with (polmodel.training), if any,
    state_dicts [dict of tensors],
    content_hash: sha256 over the JSON of (kind, species, cutoff, architecture, training) and every state-dict
    tensor (name, dtype, shape, bytes) in sorted name order.
Nothing in the file is code, so loading never executes anything; the hash catches altered weights.

Only format_version 2 is read: every model file there is (data/quartz, data/allegro_pol and the model nodes of their
provenance archives) has it, with every architecture keyword written out. `upgrade_payload` is the one place that
brings a file written by an earlier polmodel up to what the code expects; it does one thing, for files written
before the training domain was stored (the shipped ones): their members take the domain recorded beside the file.

This module knows the file, not the classes: it writes the members it is given and reads back a checked payload.
Building PolModels from a payload is polmodel/nn/model.py's `members_from_payload`; `PolModel.save/.load`,
`PolEnsemble.save/.load` and the public `polmodel.nn.serialization` (save, load, load_model, load_ensemble) sit on
top of both. Every unusable file raises `ModelFileError` naming it.
"""
import hashlib
import json
import os

import torch

from polmodel._version import __version__
from polmodel.data.domain import read_domain_record

FORMAT = "polmodel"
FORMAT_VERSION = 2
READABLE_VERSIONS = (2,)


class ModelFileError(ValueError):
    """A file that is not a readable, intact polmodel model file."""


def file_sha256(path):
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(kind, species, cutoff, architecture, state_dicts, training=None):
    """sha256 of the architecture description, the training settings and the weights (independent of torch's
    container format)."""
    digest = hashlib.sha256()
    header = {"kind": kind, "species": list(species), "cutoff": float(cutoff), "architecture": architecture,
              "training": training}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for state_dict in state_dicts:
        for name in sorted(state_dict):
            tensor = state_dict[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_model_file(kind, members, path):
    """Write `members` (PolModels: species, cutoff, architecture, state_dict) as a file of `kind` ("model" or
    "ensemble") to `path`; a member's `training_options` (set by polmodel.training) are stored as its training
    settings."""
    species, cutoff = members[0].species, members[0].cutoff
    architecture = [dict(member.architecture) for member in members]
    training = [_json_copy(getattr(member, "training_options", None)) for member in members]
    state_dicts = [{name: tensor.detach().cpu().clone() for name, tensor in member.state_dict().items()}
                   for member in members]
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "polmodel_version": __version__,
        "species": list(species),
        "cutoff": float(cutoff),
        "architecture": architecture,
        "training": training,
        "state_dicts": state_dicts,
        "content_hash": content_hash(kind, species, cutoff, architecture, state_dicts, training),
    }
    # written beside the target and moved into place: a failed or interrupted write leaves no truncated file
    path = os.fspath(path)
    temporary = f"{path}.{os.getpid()}.partial"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _json_copy(value):
    return None if value is None else json.loads(json.dumps(value))


def read_payload(path):
    """The checked contents of the file at `path` (str), with "architecture" and "training" as lists of one entry
    per member, upgraded by `upgrade_payload`; ModelFileError if the file is unusable."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for unreadable files
        raise ModelFileError(f"{path}: not a readable polmodel file (torch.load failed: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: a torch file, but not a polmodel model file (no format '{FORMAT}')")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: unsupported polmodel format_version {version!r} "
                             f"(this polmodel reads versions {list(READABLE_VERSIONS)})")
    required = ("kind", "species", "cutoff", "architecture", "training", "state_dicts", "content_hash")
    missing = [name for name in required if name not in payload]
    if missing:
        raise ModelFileError(f"{path}: polmodel file lacks {', '.join(missing)}")
    if payload["kind"] not in ("model", "ensemble"):
        raise ModelFileError(f"{path}: unknown kind {payload['kind']!r} (expected 'model' or 'ensemble')")
    architecture, training, state_dicts = payload["architecture"], payload["training"], payload["state_dicts"]
    if (not isinstance(architecture, list) or not isinstance(state_dicts, list) or not isinstance(training, list)
            or not len(architecture) == len(state_dicts) == len(training) or not state_dicts
            or (payload["kind"] == "model" and len(state_dicts) != 1)):
        raise ModelFileError(f"{path}: inconsistent member lists in polmodel file")
    try:
        expected = content_hash(payload["kind"], payload["species"], payload["cutoff"], architecture, state_dicts,
                                training)
    except Exception as error:
        raise ModelFileError(f"{path}: malformed polmodel file ({error})") from error
    if expected != payload["content_hash"]:
        raise ModelFileError(f"{path}: content hash mismatch (stored {payload['content_hash'][:12]}…, "
                             f"computed {expected[:12]}…): the weights or settings were altered or corrupted")
    return upgrade_payload(payload, path)


def upgrade_payload(payload, path):
    """A checked payload (`read_payload`) brought up to what the code expects of a file written today; the one
    place that knows what earlier polmodels wrote differently. The file itself stays as it was written.

    - Written before the training domain was stored (data/quartz/loop3_ensemble.pt, data/allegro_pol/*.pt and the model
      nodes of their provenance archives, which must stay byte-identical): members saved without a domain take
      the one recorded beside the file, if any (polmodel/data/domain.py `write_domain_record`).
    """
    training = payload["training"]
    if all("domain" in (entry or {}) for entry in training):
        return payload
    try:
        domain = read_domain_record(path)
    except (ValueError, OSError) as error:
        raise ModelFileError(str(error)) from error
    if domain is not None:
        payload["training"] = [{**(entry or {}), "domain": domain} for entry in training]
    return payload
