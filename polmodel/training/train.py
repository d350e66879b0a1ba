"""Training of one PolModel on labelled frames: `train_model(train_frames, valid_frames, config) -> (model,
history)`; polmodel/training/ensembles.py trains ensembles of such runs.

Before training, the model's neighbour normalization, per-species reference energies, energy scale and field scale
are set from the frames (polmodel/training/data.py), so that the network only learns a residual of order one. A warm
start (`initial_model`) keeps the given model's weights, references and scale instead: the loop's next iteration
starts from the last one, which has learned most of what the new frames ask.
Same seed, same frames, same config and the same number of threads → bit-identical weights.

A run is a sequence of parts, each in its module so that it can be read and tested alone: the settings
(config.py), the frames and their batches (data.py), the state an epoch changes and its checkpoints
(checkpoints.py), the epochs (loop.py) and the weight average they validate (average.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from polmodel.data.frames import frame_efield, normalize_frames
from polmodel.data.graphs import atoms_to_graph, average_num_neighbors
from polmodel.runtime.allocator import keep_heap_if_requested
from polmodel.runtime.devices import resolve_device
from polmodel.training.checkpoints import CheckpointFile, TrainingState, run_fingerprint
from polmodel.training.config import DTYPES, TrainingConfig
from polmodel.training.data import (FrameSet, fit_energy_scale, fit_reference_energies, frames_species,
                                    training_frame_set)
from polmodel.training.loop import start_training, train_epochs, untrained_errors
from polmodel.training.losses import LossWeights, TargetBatch, label_variances

if TYPE_CHECKING:
    import os

    from ase import Atoms

    from polmodel.nn.model import PolModel


def _warm_start_model(initial_model: PolModel, frames: Sequence[Atoms], config: TrainingConfig) -> PolModel:
    """A copy of `initial_model` in the run's dtype, after checking that it can be trained on `frames`."""
    from polmodel.nn.model import PolModel  # e3nn (torch._dynamo, ~2 s to import): only when needed

    if not isinstance(initial_model, PolModel):
        raise TypeError(f"initial_model must be a PolModel, got {type(initial_model).__name__}")
    unknown = sorted(set(frames_species(frames)) - set(initial_model.species))
    if unknown:
        raise ValueError(f"the initial model knows species {initial_model.species}; the frames also contain "
                         f"{unknown}: a warm start cannot add species (train from scratch instead)")
    if config.species is not None and list(config.species) != list(initial_model.species):
        raise ValueError(f"species {list(config.species)} were requested, but the initial model has "
                         f"{initial_model.species}")
    if float(config.cutoff) != float(initial_model.cutoff):
        raise ValueError(f"cutoff {config.cutoff} Å was requested, but the initial model has {initial_model.cutoff} Å")
    conflicting = sorted(name for name, value in config.architecture.items()
                         if name != "avg_num_neighbors" and initial_model.architecture.get(name) != value)
    if conflicting:
        raise ValueError(f"architecture options {conflicting} differ from the initial model's "
                         f"({ {name: initial_model.architecture.get(name) for name in conflicting} })")
    model = PolModel(initial_model.species, initial_model.cutoff, **initial_model.architecture)
    model = model.to(DTYPES[config.dtype])
    model.load_state_dict(initial_model.state_dict())
    return model


def initialize_model(train_frames: Iterable[Atoms], config: TrainingConfig, species: Sequence[str] | None = None,
                     initial_model: PolModel | None = None) -> PolModel:
    """The model training starts from: a copy of `initial_model` (warm start), or seeded weights with the
    neighbour normalization, reference energies and energy scale fitted to the frames."""
    # e3nn (torch._dynamo, ~2 s to import): only when needed
    from polmodel.nn.model import PolModel, field_scale_from_fields

    train_frames = normalize_frames(train_frames)
    if initial_model is not None:
        return _warm_start_model(initial_model, train_frames, config)
    species = list(config.species or species or frames_species(train_frames))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = PolModel(species, config.cutoff, **config.architecture)
    model = model.to(DTYPES[config.dtype])
    if "avg_num_neighbors" not in config.architecture:
        graphs = [atoms_to_graph(frame, species, config.cutoff, dtype=DTYPES[config.dtype]) for frame in train_frames]
        model.set_avg_num_neighbors(average_num_neighbors(graphs))
    references = fit_reference_energies(train_frames, species)
    model.set_reference_energies(references)
    model.set_energy_scale(fit_energy_scale(train_frames, references))
    model.set_field_scale(field_scale_from_fields([frame_efield(frame) for frame in train_frames]))
    return model


def _checked_frames(train_frames: Iterable[Atoms], valid_frames: Iterable[Atoms] | None
                    ) -> tuple[list[Atoms], list[Atoms]]:
    """The frames normalized (polmodel.data.frames.normalize_frames); ValueError when none can be trained on."""
    train_frames = normalize_frames(train_frames)
    valid_frames = normalize_frames(valid_frames or [])
    if not train_frames:
        raise ValueError("no training frames")
    if not any(TargetBatch([frame]).values for frame in train_frames):
        raise ValueError("none of the training frames carries a label (energy, forces, stress, dipole, Z*, α)")
    return train_frames, valid_frames


def _applied_loss_weights(model: PolModel, train_frames: Sequence[Atoms], config: TrainingConfig) -> LossWeights:
    """The weights the loss applies: `config.loss_weights`, or with `loss_normalization` "label_variance" each divided
    by the variance of its training labels (energies after the model's reference energies), so that every quantity
    counts by how much of its spread the model misses, not by the size of its unit: with the weights as given, the
    α term (e·Å²/V per atom) sat about 100x below the force term at the errors the α-quartz loop reached."""
    if config.loss_normalization == "none":
        return config.loss_weights
    references = {symbol: float(energy) for symbol, energy in zip(model.species, model.reference_energies)}
    return config.loss_weights.divided_by(label_variances(train_frames, references))


def _training_device(config: TrainingConfig) -> torch.device:
    device: torch.device = resolve_device(config.device)
    if device.type == "cpu":
        keep_heap_if_requested()   # opt-in: a process-wide setting (polmodel/runtime/allocator.py)
    return device


def train_model(train_frames: Iterable[Atoms], valid_frames: Iterable[Atoms] | None, config: TrainingConfig,
                species: Sequence[str] | None = None, initial_model: PolModel | None = None,
                checkpoint: str | os.PathLike[str] | None = None) -> tuple[PolModel, dict[str, Any]]:
    """Train one PolModel; returns (model with the best validation weights, history dict).

    Without validation frames the training loss decides early stopping. With an EMA (`config.ema_decay`) the
    averaged weights are validated and returned. `initial_model` (a PolModel) is a warm start. `checkpoint` (a
    path): the training state is saved there every `config.checkpoint_every` epochs and at the end, and resumed
    from it when the file exists (CheckpointError if it belongs to another run); a finished run's checkpoint
    returns its result at once. `history["epochs"]` lists per epoch the training and validation loss, the validation
    RMSE per quantity (`valid_rmse`, in the loss's units; `initial_valid_rmse` before the first epoch) and the
    learning rate; `best_epoch`, `stopped` ("epochs", "patience", "max_time_s"), `wall_time_s` (of all sessions),
    `resumed_from_epoch` (None for a fresh start) and `field_magnitude_weights` summarize the run.
    """
    train_frames, valid_frames = _checked_frames(train_frames, valid_frames)
    device = _training_device(config)
    model = initialize_model(train_frames, config, species or frames_species(train_frames + valid_frames),
                             initial_model=initial_model).to(device)
    train_set = cast(FrameSet, training_frame_set(train_frames, model.species, config))  # frames checked above
    valid_set = training_frame_set(valid_frames, model.species, config)
    state = start_training(model, config, device, _applied_loss_weights(model, train_frames, config))
    if config.loss_normalization != "none":
        state.history["loss_weights"] = state.loss_weights.as_dict()
    run = (CheckpointFile(checkpoint, run_fingerprint(config, train_frames, valid_frames, initial_model))
           if checkpoint else None)
    if run is not None and run.exists():
        run.restore(state)
    elif valid_set:   # a fresh start: the untrained model's errors (a resumed run has them in its history)
        state.history["initial_valid_rmse"] = untrained_errors(state, valid_set, config)
    train_epochs(state, train_set, valid_set, config, run)
    return _trained_model(model, state, config, train_frames, valid_frames,
                          balanced=train_set.frame_weights is not None)


def _trained_model(model: PolModel, state: TrainingState, config: TrainingConfig, train_frames: Sequence[Atoms],
                   valid_frames: Sequence[Atoms], balanced: bool) -> tuple[PolModel, dict[str, Any]]:
    """The model with the best validated weights and its settings; the history with the run's summary."""
    model.load_state_dict(state.best["state"])
    model.eval()
    model.training_options = config.training_options()
    state.history.update(best_epoch=state.best["epoch"], best_valid_loss=state.best["loss"],
                         wall_time_s=state.wall_time_s(), num_train=len(train_frames),
                         num_validation=len(valid_frames), resumed_from_epoch=state.resumed_from,
                         field_magnitude_weights=balanced)
    return model, state.history
