"""The weights that are validated and returned: an exponential moving average of the raw weights (`ema_decay`;
None trains and returns the raw weights). Averaging over the last steps smooths the noise of single batches, so
early stopping compares less noisy validation losses and the result does not depend on where the last batch left
the weights. It is part of a checkpoint's state (polmodel/training/checkpoints.py), so a resumed run averages on as
an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class WeightAverage:
    """Exponential moving average of a model's parameters, updated after every optimizer step.

    average ← d·average + (1 − d)·weights with d = min(decay, (1 + t)/(10 + t)) at update t, so that the average
    follows the weights closely in the first steps instead of remembering the initial ones for ~1/(1 − decay)
    steps. decay 0 is the raw weights. Buffers (energy scale, reference energies) are not averaged: training does
    not change them.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.averages = [parameter.detach().clone() for parameter in model.parameters()]

    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        with torch.no_grad():
            for average, parameter in zip(self.averages, model.parameters()):
                average.lerp_(parameter.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Inside the block, `model` holds the averaged weights; its own weights are restored afterwards."""
        raw = [parameter.detach().clone() for parameter in model.parameters()]
        with torch.no_grad():
            for parameter, average in zip(model.parameters(), self.averages):
                parameter.copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for parameter, value in zip(model.parameters(), raw):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        with torch.no_grad():
            for average, value in zip(self.averages, state["averages"]):
                average.copy_(value)
