"""Model and ensemble files: save any model or ensemble, load whichever a file holds.

The file format (layout, content hash, `upgrade_payload` for files written by an earlier polmodel) is
polmodel/nn/model_file.py; building PolModels from a file is polmodel/nn/model.py (`members_from_payload`). This
module sits above both and above PolEnsemble, so nothing below imports it:
`PolModel.save` / `PolModel.load` / `PolEnsemble.save` / `PolEnsemble.load` go to model_file directly, and `load_model`
/ `load_ensemble` here are those type-checked loaders. Every unusable file raises `ModelFileError` naming it.
"""
from __future__ import annotations

import os
from typing import cast

from polmodel.nn.ensemble import PolEnsemble
from polmodel.nn.model import PolModel, members_from_payload
# the file format's public names, here as well, where the callers of save/load look for them
from polmodel.nn.model_file import (FORMAT, FORMAT_VERSION, READABLE_VERSIONS, ModelFileError,  # noqa: F401
                                    content_hash, file_sha256, read_payload, write_model_file)


def _members(model_or_ensemble: PolModel | PolEnsemble) -> tuple[str, list[PolModel]]:
    if isinstance(model_or_ensemble, PolEnsemble):
        return "ensemble", cast("list[PolModel]", list(model_or_ensemble.members))
    if isinstance(model_or_ensemble, PolModel):
        return "model", [model_or_ensemble]
    raise TypeError(f"can only save a PolModel or PolEnsemble, got {type(model_or_ensemble).__name__}")


def save(model_or_ensemble: PolModel | PolEnsemble, path: str | os.PathLike[str]) -> None:
    """Write a model or an ensemble to `path`; a member's `training_options` (set by polmodel.training) are
    stored as its training settings."""
    write_model_file(*_members(model_or_ensemble), path)


def load(path: str | os.PathLike[str]) -> PolModel | PolEnsemble:
    """Read a file written by `save`; returns a PolModel or a PolEnsemble (ModelFileError if unusable)."""
    path = os.fspath(path)
    payload = read_payload(path)
    members = members_from_payload(path, payload)
    if payload["kind"] == "model":
        return members[0]
    return PolEnsemble(members)


def load_model(path: str | os.PathLike[str]) -> PolModel:
    """A single PolModel from `path`; ModelFileError if the file is unusable or holds an ensemble."""
    return PolModel.load(path)


def load_ensemble(path: str | os.PathLike[str]) -> PolEnsemble:
    """A PolEnsemble from `path`; a single-model file gives an ensemble of one (ModelFileError if unusable)."""
    return PolEnsemble.load(path)
