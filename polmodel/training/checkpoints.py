"""Checkpoints of one training run, for a long campaign whose jobs are killed or reach their time limit.

A checkpoint holds the full training state (`TrainingState`: weights, optimizer, scheduler, batch-order generator,
weight average, best state, epoch, history), written every `checkpoint_every` epochs and after the last one. A run
started again with the same path, frames and settings resumes from it and ends with the same weights as a run that
was never interrupted: every piece of state that an epoch changes is in the file. The file carries a fingerprint of
what determines the result, so that a checkpoint of other frames or settings is refused instead of silently
continued. Each member of an ensemble has its own file (`member_checkpoint_path`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from polmodel.training.config import RECORD_OPTIONS, RUN_OPTIONS
from polmodel.training.losses import LossWeights

if TYPE_CHECKING:
    from ase import Atoms

    from polmodel.nn.model import PolModel
    from polmodel.training.average import WeightAverage
    from polmodel.training.config import TrainingConfig

CHECKPOINT_FORMAT = "polmodel-training-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (unreadable, or written for other frames or settings)."""


#: TrainingConfig options added after checkpoints of this format were written: left out of the fingerprint at these
#: values (their defaults, which those checkpoints' runs had), so that those checkpoints still resume
LATER_OPTIONS = {"loss_normalization": "none"}


def run_fingerprint(config: TrainingConfig, train_frames: Sequence[Atoms], valid_frames: Sequence[Atoms],
                    initial_model: PolModel | None) -> str:
    """sha256 of what determines a run's result: the settings (not how it runs), the frames, the initial weights."""
    digest = hashlib.sha256()
    settings = {name: value for name, value in config.as_dict().items() if name not in RUN_OPTIONS + RECORD_OPTIONS
                and not (name in LATER_OPTIONS and value == LATER_OPTIONS[name])}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for frames in (train_frames, valid_frames):
        digest.update(f"|{len(frames)}|".encode())
        for frame in frames:
            digest.update(np.ascontiguousarray(frame.numbers).tobytes())
            for array in (frame.positions, frame.cell.array):
                digest.update(np.ascontiguousarray(array, dtype=float).tobytes())
            labels = {name: np.asarray(value).tolist() for name, value in sorted(frame.info.items())
                      if isinstance(value, (int, float, np.ndarray, list))}
            digest.update(json.dumps(labels, sort_keys=True).encode())
            for name in sorted(frame.arrays):
                digest.update(name.encode() + np.ascontiguousarray(frame.arrays[name], dtype=float).tobytes())
    if initial_model is not None:
        for name, tensor in initial_model.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """torch.save to a temporary file, then an atomic rename: a kill while writing leaves the last checkpoint."""
    temporary = f"{path}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


def _read_checkpoint(path: str | os.PathLike[str], fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for unreadable files
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a polmodel training checkpoint")
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path}: written for other frames, settings or initial weights; remove it to start "
                              f"afresh or resume with the run that wrote it")
    return state


def _state_to(state_dict: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in state_dict.items()}


def member_checkpoint_path(checkpoint: str | os.PathLike[str] | None, member: int, size: int
                           ) -> str | os.PathLike[str] | None:
    """The checkpoint file of ensemble member `member` (the path itself for a single model)."""
    if checkpoint is None or size == 1:
        return checkpoint
    root, extension = os.path.splitext(os.fspath(checkpoint))
    return f"{root}.member{member}{extension}"


@dataclass
class TrainingState:
    """Everything an epoch changes, and so everything a resumed run must get back (MACE's CheckpointState).

    `best` is {"loss", "epoch", "state"}: the validated weights with the lowest validation loss so far. `finished`
    says that the checkpoint it was read from belongs to a run that has ended (it then returns its result at once).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator                 # the batch order
    average: WeightAverage | None
    device: torch.device
    best: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=lambda: {"epochs": [], "stopped": "epochs",
                                                             "initial_valid_rmse": {}})
    epoch: int = 0                             # the last epoch trained
    finished: bool = False
    resumed_from: int | None = None            # the epoch of the checkpoint this session started from
    earlier_time_s: float = 0.0                # wall-clock time of the sessions before this one
    started: float = field(default_factory=time.monotonic)
    loss_weights: LossWeights = field(default_factory=LossWeights)   # as the loss applies them (after normalization)

    def evaluated(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The weights that are validated and returned: the average, or the raw weights."""
        return self.average.applied_to(self.model) if self.average is not None else contextlib.nullcontext(self.model)

    def wall_time_s(self) -> float:
        """Of all sessions of the run."""
        return self.earlier_time_s + time.monotonic() - self.started

    def state_dict(self, done: bool) -> dict[str, Any]:
        """A checkpoint's content after its format and fingerprint, tensors on the CPU; `done`: the run has ended."""
        return {"epoch": self.epoch, "finished": done, "model": _state_to(self.model.state_dict(), "cpu"),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "generator": self.generator.get_state(),
                "average": self.average.state_dict() if self.average is not None else None,
                "best": {**self.best, "state": _state_to(self.best["state"], "cpu")}, "history": self.history,
                "wall_time_s": self.wall_time_s()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's content, its tensors moved onto the run's device."""
        self.model.load_state_dict(_state_to(state["model"], self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.average is not None:
            self.average.load_state_dict({**state["average"],
                                          "averages": [a.to(self.device) for a in state["average"]["averages"]]})
        self.best = {**state["best"], "state": _state_to(state["best"]["state"], self.device)}
        self.history, self.earlier_time_s = state["history"], float(state["wall_time_s"])
        self.finished = bool(state["finished"])
        self.epoch = self.resumed_from = int(state["epoch"])


@dataclass(frozen=True)
class CheckpointFile:
    """The file a run saves its state to, and the fingerprint (`run_fingerprint`) of the run it belongs to."""

    path: str | os.PathLike[str]
    fingerprint: str

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self, state: TrainingState, done: bool) -> None:
        _write_checkpoint(self.path, {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
                                      **state.state_dict(done)})

    def restore(self, state: TrainingState) -> None:
        """`state` continues where the file's run stopped (CheckpointError if the file belongs to another run)."""
        state.load_state_dict(_read_checkpoint(self.path, self.fingerprint))
