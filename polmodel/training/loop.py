"""The loop of one training run, in MACE's shape: the epochs (`train_epochs`), one epoch (`run_epoch`: a pass over
the training frames, `train_one_epoch`, then `validate`), one optimizer step (`take_step`).

Adam with a plateau scheduler (or cosine or constant) and gradient clipping; early stopping on the validation loss
(the training loss where there are no validation frames) after `patience` epochs without a better one, or at the
wall-clock limit `max_time_s`. Validation and the best state use the weights `TrainingState.evaluated` gives (the
weight average, polmodel/training/average.py), while the steps move the raw weights. All that the functions here
change lives in one `TrainingState` (polmodel/training/checkpoints.py), so that a run can stop after any epoch and
continue from its checkpoint as if it had never stopped.
"""
from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from polmodel.runtime.devices import to_device
from polmodel.training.average import WeightAverage
from polmodel.training.checkpoints import TrainingState
from polmodel.training.evaluation import model_device
from polmodel.training.losses import LossWeights, paired_values, predict, weighted_loss

if TYPE_CHECKING:
    from polmodel.data.graphs import Graph
    from polmodel.training.checkpoints import CheckpointFile
    from polmodel.training.config import TrainingConfig
    from polmodel.training.data import FrameSet
    from polmodel.training.losses import TargetBatch


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig
                   ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of `config.scheduler`; None for a constant rate."""
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.scheduler_factor,
                                                          patience=config.scheduler_patience,
                                                          min_lr=config.min_learning_rate)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1),
                                                          eta_min=config.min_learning_rate)
    return None


def start_training(model: torch.nn.Module, config: TrainingConfig, device: torch.device,
                   loss_weights: LossWeights | None = None) -> TrainingState:
    """A fresh run's state: Adam, the scheduler, the batch order seeded with `config.seed`, the weight average, the
    initial weights as the best so far, and the loss weights as applied (`config.loss_weights` unless given)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = make_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay is not None else None
    state = TrainingState(model, optimizer, scheduler, generator, average, device,
                          loss_weights=config.loss_weights if loss_weights is None else loss_weights)
    with state.evaluated():
        state.best = {"loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    return state


def epoch_loss(model: torch.nn.Module, frame_set: FrameSet, weights: LossWeights, batch_size: int
               ) -> tuple[float, dict[str, float]]:
    """Validation pass (no parameter update, on the model's device): (loss, {quantity: RMSE}). The loss is the
    frame-weighted mean of the batch losses; a quantity's RMSE (in the loss's units) is the root of its batch mean
    squared errors averaged over the frames of the batches that carry it."""
    device = model_device(model)
    total, count = 0.0, 0
    squared: dict[str, float] = {}
    counted: dict[str, int] = {}
    for data, targets in frame_set.batches(batch_size):
        prediction = predict(model, to_device(data, device), targets)
        loss, terms = weighted_loss(paired_values(prediction, targets), weights, targets)
        frames = len(targets.num_atoms)
        total += float(loss) * frames
        count += frames
        for quantity, term in terms.items():
            squared[quantity] = squared.get(quantity, 0.0) + float(term) * frames
            counted[quantity] = counted.get(quantity, 0) + frames
    return total / count, {quantity: math.sqrt(squared[quantity] / counted[quantity]) for quantity in squared}


def untrained_errors(state: TrainingState, valid_set: FrameSet, config: TrainingConfig) -> dict[str, float]:
    """The validation RMSE per quantity before the first epoch (a fresh run's `initial_valid_rmse`)."""
    return epoch_loss(state.model, valid_set, state.loss_weights, config.batch_size)[1]


def take_step(state: TrainingState, data: Graph, targets: TargetBatch, config: TrainingConfig) -> float:
    """One optimizer step on one batch (and the weight average's update after it); the batch's loss."""
    state.optimizer.zero_grad(set_to_none=True)
    prediction = predict(state.model, to_device(data, state.device), targets, training=True)
    loss, _ = weighted_loss(paired_values(prediction, targets), state.loss_weights, targets)
    loss.backward()
    if config.gradient_clip:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.gradient_clip)
    state.optimizer.step()
    if state.average is not None:
        state.average.update(state.model)
    return float(loss.detach())


def train_one_epoch(state: TrainingState, train_set: FrameSet, config: TrainingConfig) -> float:
    """One pass over the training frames in the generator's order; the frame-weighted mean of the batch losses."""
    state.model.train()
    total, count = 0.0, 0
    for data, targets in train_set.batches(config.batch_size, state.generator):
        total += take_step(state, data, targets, config) * len(targets.num_atoms)
        count += len(targets.num_atoms)
    state.model.eval()
    return total / count


def validate(state: TrainingState, valid_set: FrameSet | None, config: TrainingConfig, train_loss: float
             ) -> tuple[float, dict[str, float]]:
    """(loss, {quantity: RMSE}) of the validated weights, which become the best state when their loss is the lowest
    so far; without validation frames the epoch's training loss stands for the validation loss."""
    with state.evaluated() as model:
        valid_loss, valid_rmse = (epoch_loss(model, valid_set, state.loss_weights, config.batch_size) if valid_set
                                  else (train_loss, {}))
        if valid_loss < state.best["loss"]:
            state.best = {"loss": valid_loss, "epoch": state.epoch, "state": copy.deepcopy(model.state_dict())}
    return valid_loss, valid_rmse


def run_epoch(state: TrainingState, train_set: FrameSet, valid_set: FrameSet | None, config: TrainingConfig
              ) -> dict[str, Any]:
    """Epoch `state.epoch`: train, validate, step the scheduler; its entry of the history."""
    train_loss = train_one_epoch(state, train_set, config)
    valid_loss, valid_rmse = validate(state, valid_set, config, train_loss)
    if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state.scheduler.step(valid_loss)
    elif state.scheduler is not None:
        state.scheduler.step()
    entry = {"epoch": state.epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_rmse": valid_rmse,
             "learning_rate": state.optimizer.param_groups[0]["lr"]}
    state.history["epochs"].append(entry)
    return entry


def _stop_reason(state: TrainingState, config: TrainingConfig) -> str | None:
    """"patience" or "max_time_s" when the run stops after this epoch; None when it goes on."""
    if state.epoch - state.best["epoch"] >= config.patience:
        return "patience"
    if config.max_time_s is not None and time.monotonic() - state.started > config.max_time_s:
        return "max_time_s"
    return None


def train_epochs(state: TrainingState, train_set: FrameSet, valid_set: FrameSet | None, config: TrainingConfig,
                 checkpoint: CheckpointFile | None) -> None:
    """The epochs after `state.epoch`, until `config.epochs`, patience or the time limit (`history["stopped"]`).
    With a checkpoint the state is saved every `checkpoint_every` epochs and at the end: a run stopped by its time
    limit stays resumable; one that ran out of epochs or patience is done. A finished state trains no epoch."""
    from tqdm.auto import tqdm

    progress = tqdm(range(state.epoch + 1, config.epochs + 1) if not state.finished else [], initial=state.epoch,
                    total=config.epochs, desc=f"training (seed {config.seed})", disable=config.quiet, leave=False)
    for epoch in progress:
        state.epoch = epoch
        entry = run_epoch(state, train_set, valid_set, config)
        progress.set_postfix(train=f"{entry['train_loss']:.3g}", valid=f"{entry['valid_loss']:.3g}",
                             best=state.best["epoch"])
        stopped = _stop_reason(state, config)
        if stopped is not None:
            state.history["stopped"] = stopped
            break
        if checkpoint is not None and epoch % config.checkpoint_every == 0 and epoch < config.epochs:
            checkpoint.save(state, done=False)
    else:
        if not state.finished:
            state.history["stopped"] = "epochs"
    progress.close()
    if checkpoint is not None and not state.finished:
        checkpoint.save(state, done=state.history["stopped"] != "max_time_s")
