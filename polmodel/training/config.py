"""The settings of a training run, apart from the code that uses them: `polmodel train`'s options, a loop
protocol's training settings, a member's model file (its "training" entry) and a checkpoint's fingerprint all come
from this one dataclass, so that one JSON object names a run everywhere and an unknown option is refused
(`TrainingConfig.from_dict`) rather than silently ignored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from polmodel.training.losses import LOSS_NORMALIZATIONS, LossWeights

SCHEDULERS = ("plateau", "cosine", "constant")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# TrainingConfig options that change how a run is executed, not its result (left out of checkpoint fingerprints)
RUN_OPTIONS = ("device", "quiet", "max_time_s", "checkpoint_every")
# TrainingConfig options recorded with the trained model that change none of its weights (also left out)
RECORD_OPTIONS = ("labelled_field",)


@dataclass
class TrainingConfig:
    """Everything that determines a training run (JSON-able through `as_dict` / `from_dict`)."""

    cutoff: float = 5.0                        # Å
    architecture: dict[str, Any] = field(default_factory=dict)      # PolModel keyword arguments
    species: list[str] | None = None           # None: the species of the frames, sorted
    loss_weights: LossWeights = field(default_factory=LossWeights)
    # "label_variance": each weight divided by the variance of its quantity's training labels (LossWeights.divided_by)
    loss_normalization: str = "none"
    learning_rate: float = 5e-3
    min_learning_rate: float = 1e-5
    epochs: int = 200
    batch_size: int = 8
    patience: int = 30                         # epochs without a better validation loss before stopping
    scheduler: str = "plateau"                 # "plateau" (ReduceLROnPlateau), "cosine" or "constant"
    scheduler_factor: float = 0.5              # plateau: factor per reduction
    scheduler_patience: int = 8                # plateau: epochs without improvement before a reduction
    gradient_clip: float = 10.0                # max gradient norm; 0 disables clipping
    validation_fraction: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"                        # cpu, cuda, cuda:N or auto (polmodel.runtime.devices)
    max_time_s: float | None = None                   # wall-clock limit of one model's training (in this process)
    ema_decay: float | None = 0.99                    # weight average for validation and the result; None: raw weights
    balance_field_magnitudes: bool = True      # frame weights 1/(frames in the frame's |ε| bin)
    checkpoint_every: int = 1                  # epochs between checkpoints (when a checkpoint path is given)
    # V/Å: the field of the labels' finite differences where the frames record no field of their own (published
    # zero-field frames whose Z* and α were differentiated at that field); the training domain's field_max is at
    # least this, so MD at such fields is not called outside the labels
    labelled_field: float | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs must be >= 0, batch_size and patience >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        if self.labelled_field is not None and not (math.isfinite(self.labelled_field) and self.labelled_field > 0):
            raise ValueError(f"labelled_field must be a positive field in V/Å or None, got {self.labelled_field}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_options(self) -> dict[str, Any]:
        """The optimisation settings (everything but the architecture, species and cutoff): what a model file
        stores under "training"."""
        options = self.as_dict()
        for name in ("architecture", "species", "cutoff"):
            options.pop(name)
        return options

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """From a JSON-able dict. The PolModel keywords may also come under "hyperparameters", a key users write (in
        `polmodel train --hyperparameters` JSON and loop protocols): kept as an alias of "architecture", which wins
        where both name a keyword; this is the one place that reads it."""
        values = dict(values)
        if "hyperparameters" in values:
            values["architecture"] = {**values.pop("hyperparameters"), **values.get("architecture", {})}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)
