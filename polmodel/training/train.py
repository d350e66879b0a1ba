"""Training of PolModel on labelled frames: reference energies, split, early stopping, metrics, ensembles.

`train_model(train_frames, valid_frames, config) -> (model, history)` trains one model; `train_ensemble(frames,
config, size, bootstrap) -> (PolEnsemble, metrics)` trains `size` members with seeds seed, seed+1, ... on one
train/validation split (optionally each on a bootstrap resample of the training frames); `evaluate(model,
frames)` gives MAE/RMSE per quantity in `polmodel.training.losses.QUANTITY_UNITS` (`evaluate_frames` adds parity
plots).

Before training, per-species reference energies are fitted by least squares on composition → energy and the
energy scale is set to the RMS force component, so the network only learns a residual of order one; a warm start
(`initial_model`) keeps the given model's weights, references and scale instead.
Same seed, same frames, same config and the same number of threads → bit-identical weights.

What a long campaign needs:
- warm start: `train_model(..., initial_model=model)` starts from that model's weights (the loop's next iteration
  starts from the last one); `train_ensemble` maps the members of an initial ensemble onto its own;
- checkpoints: with `checkpoint=PATH` the full training state (weights, optimizer, scheduler, batch-order RNG,
  weight average, best state, epoch, history) is written every `checkpoint_every` epochs and after the last one; a
  run started again with the same path, frames and settings resumes from it and ends with the same weights as a
  run that was never interrupted;
- a weight average: validation, early stopping and the returned model use an exponential moving average of the
  weights (`ema_decay`; see WeightAverage); None trains and returns the raw weights;
- field-magnitude balance: with `balance_field_magnitudes` each frame's weight in the loss is inversely
  proportional to the number of frames in its bin of |ε| (`field_magnitude_weights`), so that many zero-field or
  one-magnitude frames do not drown the frames at other fields;
- branch continuity of the dipole labels (polmodel.data.frames.align_dipole_branches) before every training set is used;
  batches keep the frames of one structure together so that they are moved onto the model's branch as one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from polmodel.data.domain import training_domain
from polmodel.data.frames import (align_dipole_branches, frame_efield, frame_energy, frame_forces, normalize_frames,
                                  structure_key)
from polmodel.data.graphs import atoms_to_graph, average_num_neighbors, collate
from polmodel.runtime.allocator import keep_heap_if_requested
from polmodel.runtime.devices import resolve_device, to_device
from polmodel.training.losses import QUANTITIES, QUANTITY_UNITS, LossWeights, TargetBatch, paired_values, predict, \
    weighted_loss
from polmodel.training.parity_plots import write_parity_plots

if TYPE_CHECKING:
    import numpy.typing as npt
    from ase import Atoms
    from numpy.typing import NDArray

    from polmodel.data.graphs import Graph
    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel

#: per quantity, (labels, predictions) as flat arrays (`predict_pairs`)
Pairs = dict[str, tuple["NDArray[Any]", "NDArray[Any]"]]
#: per quantity, {"mae", "rmse", "count", "unit"} (`metrics_from_pairs`)
Metrics = dict[str, dict[str, Any]]

SCHEDULERS = ("plateau", "cosine", "constant")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# |ε| below this (V/Å) is zero field, its own bin; above, bins are a factor FIELD_BIN_RATIO wide in |ε|
ZERO_FIELD = 1e-6
FIELD_BIN_RATIO = 1.25
# TrainingConfig options that change how a run is executed, not its result (left out of checkpoint fingerprints)
RUN_OPTIONS = ("device", "quiet", "max_time_s", "checkpoint_every")


@dataclass
class TrainingConfig:
    """Everything that determines a training run (JSON-able through `as_dict` / `from_dict`)."""

    cutoff: float = 5.0                        # Å
    architecture: dict[str, Any] = field(default_factory=dict)      # PolModel keyword arguments
    species: list[str] | None = None           # None: the species of the frames, sorted
    loss_weights: LossWeights = field(default_factory=LossWeights)
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
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
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


# --- preparation ---------------------------------------------------------------------------------------------
def _draw_validation(groups: Sequence[Sequence[int]], wanted: float, rng: np.random.Generator) -> list[int]:
    """Indices of whole groups, in random order, until about `wanted` frames (at least one group, never all)."""
    chosen: list[int] = []
    for position, group in enumerate(rng.permutation(len(groups))):
        if position == len(groups) - 1 or (chosen and len(chosen) + 0.5 * len(groups[group]) > wanted):
            break
        chosen.extend(groups[group])
    return chosen


def split_frames(frames: Iterable[Atoms], validation_fraction: float, seed: int
                 ) -> tuple[list[Atoms], list[Atoms]]:
    """Seeded (train, validation) split by structure: all frames of one structure (e.g. the zero-field and ±ε frames
    of one DFT label) land on the same side, so validation measures unseen structures, not unseen fields.

    Whole structures are drawn in random order until the validation set holds `validation_fraction` of the frames;
    at least one structure is held out when the fraction is non-zero, and at least one is kept for training. When
    that would hold out more than twice the requested share (few structures, e.g. the first two DFT labels of an
    active-learning loop) or there is a single structure, the split falls back to frames: training on half of the
    structures would cost more than a leaky validation set.
    """
    frames = list(frames)
    if not validation_fraction > 0 or len(frames) < 2:
        return frames, []
    wanted = validation_fraction * len(frames)
    by_structure: dict[tuple[tuple[int, ...] | bytes, ...], list[int]] = {}
    for index, frame in enumerate(frames):
        by_structure.setdefault(structure_key(frame), []).append(index)
    groups = list(by_structure.values())
    valid_indices = _draw_validation(groups, wanted, np.random.default_rng(seed)) if len(groups) > 1 else []
    if not valid_indices or len(valid_indices) > max(2.0 * wanted, 1.0):
        singletons = [[index] for index in range(len(frames))]
        valid_indices = _draw_validation(singletons, wanted, np.random.default_rng(seed))
    held_out = set(valid_indices)
    valid = [frame for index, frame in enumerate(frames) if index in held_out]
    train = [frame for index, frame in enumerate(frames) if index not in held_out]
    return train, valid


def fit_reference_energies(frames: Sequence[Atoms], species: Sequence[str]) -> dict[str, float]:
    """Per-species energies (dict symbol -> eV) minimizing Σ (E - Σ_s n_s e_s)² over frames with an energy.

    Zero-field frames are used when there are any (finite-field enthalpies carry the field terms). With
    rank-deficient compositions (e.g. one stoichiometry) the minimum-norm solution is taken, which still
    reproduces the mean energy of each composition.
    """
    labelled = [f for f in frames if frame_energy(f) is not None]
    zero_field = [f for f in labelled if not np.any(frame_efield(f))]
    labelled = zero_field or labelled
    if not labelled:
        return {symbol: 0.0 for symbol in species}
    composition = np.array([[f.get_chemical_symbols().count(s) for s in species] for f in labelled], dtype=float)
    energies = np.array([frame_energy(f) for f in labelled])
    solution, *_ = np.linalg.lstsq(composition, energies, rcond=None)
    return {symbol: float(value) for symbol, value in zip(species, solution)}


def fit_energy_scale(frames: Sequence[Atoms], reference_energies: Mapping[str, float]) -> float:
    """RMS force component of the frames; without forces, the RMS per-atom energy residual; 1 eV as a floor case."""
    forces = [frame_forces(f) for f in frames if frame_forces(f) is not None]
    if forces:
        rms = float(np.sqrt(np.mean(np.concatenate(cast("list[NDArray[np.float64]]", forces)) ** 2)))
    else:
        residuals = [(cast(float, frame_energy(f)) - sum(reference_energies[s] for s in f.get_chemical_symbols()))
                     / len(f) for f in frames if frame_energy(f) is not None]
        rms = float(np.sqrt(np.mean(np.square(residuals)))) if residuals else 0.0
    return rms if rms > 1e-8 else 1.0


def field_magnitude_weights(frames: Sequence[Atoms]) -> NDArray[np.float64] | None:
    """(n,) frame weights, mean 1, inversely proportional to the number of frames in each frame's |ε| bin.

    Zero field (|ε| < ZERO_FIELD V/Å) is its own bin; other fields fall in bins a factor FIELD_BIN_RATIO wide in
    |ε| (so labels at ε and 3ε, or MD frames at 0.05 and 0.2 V/Å, are different bins). Every bin then carries the
    same total weight: the protocol's seven frames per structure (one at zero field, six at one magnitude) or a
    set dominated by zero-field frames no longer make one magnitude decide the fit. None when all frames are in
    one bin (every weight would be 1).
    """
    magnitudes = np.array([np.linalg.norm(frame_efield(frame)) for frame in frames])
    bins = np.where(magnitudes < ZERO_FIELD, np.iinfo(np.int64).min,
                    np.round(np.log(np.maximum(magnitudes, ZERO_FIELD)) / np.log(FIELD_BIN_RATIO)).astype(np.int64))
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        return None
    weights = 1.0 / counts[inverse]
    return weights * len(weights) / weights.sum()


class FrameSet:
    """Frames with their graphs and targets, built once and batched many times.

    `frame_weights` (n,) weigh the frames in the loss (None: equal). Frames of one structure (`structure_key`)
    always share a batch, so that their dipoles are moved onto the model's branch together
    (polmodel.training.losses); with one frame per structure the batches are exactly those of a shuffle of the
    frames.
    """

    def __init__(self, frames: Iterable[Atoms], species: Sequence[str], cutoff: float, dtype: torch.dtype,
                 frame_weights: npt.ArrayLike | None = None) -> None:
        self.frames = list(frames)
        self.frame_weights = None if frame_weights is None else np.asarray(frame_weights, dtype=float)
        self.graphs = [atoms_to_graph(frame, species, cutoff, efield=frame_efield(frame), dtype=dtype)
                       for frame in self.frames]
        groups: dict[tuple[tuple[int, ...] | bytes, ...], list[int]] = {}
        for index, frame in enumerate(self.frames):
            groups.setdefault(structure_key(frame), []).append(index)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, indices: Iterable[int]) -> tuple[Graph, TargetBatch]:
        indices = list(indices)
        weights = None if self.frame_weights is None else self.frame_weights[indices]
        return (collate([self.graphs[i] for i in indices]),
                TargetBatch([self.frames[i] for i in indices], frame_weights=weights))

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[Graph, TargetBatch]]:
        """Batches of whole structures, at most `batch_size` frames unless one structure has more; shuffled
        (by structure) when a generator is given."""
        order = (torch.randperm(len(self.groups), generator=generator).tolist() if generator is not None
                 else list(range(len(self.groups))))
        batch: list[int] = []
        for group in order:
            if batch and len(batch) + len(self.groups[group]) > batch_size:
                yield self.batch(batch)
                batch = []
            batch.extend(self.groups[group])
        if batch:
            yield self.batch(batch)


def training_frame_set(frames: Iterable[Atoms] | None, species: Sequence[str], config: TrainingConfig
                       ) -> FrameSet | None:
    """The FrameSet a training run builds from `frames`: dipole branches aligned (align_dipole_branches), frames
    weighted by field magnitude when `config.balance_field_magnitudes`; None for no frames."""
    frames = align_dipole_branches(normalize_frames(frames or []))
    if not frames:
        return None
    weights = field_magnitude_weights(frames) if config.balance_field_magnitudes else None
    return FrameSet(frames, species, config.cutoff, DTYPES[config.dtype], weights)


def _frames_species(frames: Iterable[Atoms]) -> list[str]:
    return sorted({symbol for frame in frames for symbol in frame.get_chemical_symbols()})


def _warm_start_model(initial_model: PolModel, frames: Sequence[Atoms], config: TrainingConfig) -> PolModel:
    """A copy of `initial_model` in the run's dtype, after checking that it can be trained on `frames`."""
    from polmodel.nn.model import PolModel  # e3nn (torch._dynamo, ~2 s to import): only when needed

    if not isinstance(initial_model, PolModel):
        raise TypeError(f"initial_model must be a PolModel, got {type(initial_model).__name__}")
    unknown = sorted(set(_frames_species(frames)) - set(initial_model.species))
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
    species = list(config.species or species or _frames_species(train_frames))
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


# --- one model -----------------------------------------------------------------------------------------------
def _epoch_loss(model: torch.nn.Module, frame_set: FrameSet, weights: LossWeights, batch_size: int
                ) -> tuple[float, dict[str, float]]:
    """Validation pass (no parameter update, on the model's device): (loss, {quantity: RMSE}). The loss is the
    frame-weighted mean of the batch losses; a quantity's RMSE (in the loss's units) is the root of its batch mean
    squared errors averaged over the frames of the batches that carry it."""
    device = _model_device(model)
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


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.scheduler_factor,
                                                          patience=config.scheduler_patience,
                                                          min_lr=config.min_learning_rate)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1),
                                                          eta_min=config.min_learning_rate)
    return None


CHECKPOINT_FORMAT = "polmodel-training-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (unreadable, or written for other frames or settings)."""


def _run_fingerprint(config: TrainingConfig, train_frames: Sequence[Atoms], valid_frames: Sequence[Atoms],
                     initial_model: PolModel | None) -> str:
    """sha256 of what determines a run's result: the settings (not how it runs), the frames, the initial weights."""
    digest = hashlib.sha256()
    settings = {name: value for name, value in config.as_dict().items() if name not in RUN_OPTIONS}
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


def _read_checkpoint(path: str | os.PathLike[str], fingerprint: str | None) -> dict[str, Any]:
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
    from tqdm.auto import tqdm

    train_frames = normalize_frames(train_frames)
    valid_frames = normalize_frames(valid_frames or [])
    if not train_frames:
        raise ValueError("no training frames")
    if not any(TargetBatch([frame]).values for frame in train_frames):
        raise ValueError("none of the training frames carries a label (energy, forces, stress, dipole, Z*, α)")
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_heap_if_requested()   # opt-in: a process-wide setting (polmodel/runtime/allocator.py)
    model = initialize_model(train_frames, config, species or _frames_species(train_frames + valid_frames),
                             initial_model=initial_model).to(device)
    train_set = cast(FrameSet, training_frame_set(train_frames, model.species, config))  # frames checked above
    valid_set = training_frame_set(valid_frames, model.species, config)

    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = _make_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay is not None else None
    weights = config.loss_weights

    def evaluated() -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The weights that are validated and returned: the average, or the raw weights."""
        return average.applied_to(model) if average is not None else contextlib.nullcontext(model)

    start = time.monotonic()
    with evaluated():
        best: dict[str, Any] = {"loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history: dict[str, Any] = {"epochs": [], "stopped": "epochs", "initial_valid_rmse": {}}
    first_epoch, earlier_time, finished, resumed_from = 1, 0.0, False, None
    fingerprint = _run_fingerprint(config, train_frames, valid_frames, initial_model) if checkpoint else None
    if checkpoint and os.path.exists(checkpoint):
        state = _read_checkpoint(checkpoint, fingerprint)
        model.load_state_dict(_state_to(state["model"], device))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if average is not None:
            average.load_state_dict({**state["average"], "averages": [a.to(device) for a in state["average"]["averages"]]})
        best = {**state["best"], "state": _state_to(state["best"]["state"], device)}
        history, earlier_time, finished = state["history"], float(state["wall_time_s"]), bool(state["finished"])
        resumed_from = int(state["epoch"])
        first_epoch = resumed_from + 1
    elif valid_set:   # a fresh start: the untrained model's errors (a resumed run has them in its history)
        history["initial_valid_rmse"] = _epoch_loss(model, valid_set, weights, config.batch_size)[1]

    def save_checkpoint(epoch: int, done: bool) -> None:
        _write_checkpoint(cast("str | os.PathLike[str]", checkpoint), {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch, "finished": done,
            "model": _state_to(model.state_dict(), "cpu"), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "average": average.state_dict() if average is not None else None,
            "best": {**best, "state": _state_to(best["state"], "cpu")}, "history": history,
            "wall_time_s": earlier_time + time.monotonic() - start})

    epoch = first_epoch - 1
    progress = tqdm(range(first_epoch, config.epochs + 1) if not finished else [], initial=first_epoch - 1,
                    total=config.epochs, desc=f"training (seed {config.seed})", disable=config.quiet, leave=False)
    for epoch in progress:
        model.train()
        train_total, train_count = 0.0, 0
        for data, targets in train_set.batches(config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            prediction = predict(model, to_device(data, device), targets, training=True)
            loss, _ = weighted_loss(paired_values(prediction, targets), weights, targets)
            loss.backward()
            if config.gradient_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            optimizer.step()
            if average is not None:
                average.update(model)
            train_total += float(loss.detach()) * len(targets.num_atoms)
            train_count += len(targets.num_atoms)
        model.eval()
        train_loss = train_total / train_count
        with evaluated():
            valid_loss, valid_rmse = (_epoch_loss(model, valid_set, weights, config.batch_size) if valid_set
                                      else (train_loss, {}))
            if valid_loss < best["loss"]:
                best = {"loss": valid_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(valid_loss)
        elif scheduler is not None:
            scheduler.step()
        learning_rate = optimizer.param_groups[0]["lr"]
        history["epochs"].append({"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                                  "valid_rmse": valid_rmse, "learning_rate": learning_rate})
        progress.set_postfix(train=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}", best=best["epoch"])
        if epoch - best["epoch"] >= config.patience:
            history["stopped"] = "patience"
            break
        if config.max_time_s is not None and time.monotonic() - start > config.max_time_s:
            history["stopped"] = "max_time_s"
            break
        if checkpoint and epoch % config.checkpoint_every == 0 and epoch < config.epochs:
            save_checkpoint(epoch, done=False)
    else:
        if not finished:
            history["stopped"] = "epochs"
    progress.close()
    if checkpoint and not finished:
        # a run stopped by its time limit is resumable; one that ran out of epochs or patience is done
        save_checkpoint(epoch, done=history["stopped"] != "max_time_s")
    model.load_state_dict(best["state"])
    model.eval()
    model.training_options = config.training_options()
    history.update(best_epoch=best["epoch"], best_valid_loss=best["loss"],
                   wall_time_s=earlier_time + time.monotonic() - start, num_train=len(train_frames),
                   num_validation=len(valid_frames), resumed_from_epoch=resumed_from,
                   field_magnitude_weights=train_set.frame_weights is not None)
    return model, history


def learning_milestones(history: Mapping[str, Any], quantity: str, converged_within: float = 0.1
                        ) -> tuple[int | None, int | None]:
    """(epoch at which the validation RMSE of `quantity` first fell to half its untrained value, epoch at which it
    first came within `converged_within` of its lowest value in the run) from `train_model`'s history; None where
    it never did or `quantity` was not validated."""
    initial = history.get("initial_valid_rmse", {}).get(quantity)
    curve = [(entry["epoch"], entry.get("valid_rmse", {}).get(quantity)) for entry in history["epochs"]]
    curve = [(epoch, value) for epoch, value in curve if value is not None]
    if initial is None or not curve:
        return None, None
    lowest = min(value for _, value in curve)
    halved = next((epoch for epoch, value in curve if value <= 0.5 * initial), None)
    converged = next(epoch for epoch, value in curve if value <= (1.0 + converged_within) * lowest)
    return halved, converged


# --- evaluation ----------------------------------------------------------------------------------------------
def _model_dtype(model_or_ensemble: torch.nn.Module) -> torch.dtype:
    return next(model_or_ensemble.parameters()).dtype


def _model_device(model_or_ensemble: torch.nn.Module) -> torch.device:
    return next(model_or_ensemble.parameters()).device


def _ensemble_members(model_or_ensemble: PolModel | PolEnsemble) -> list[PolModel] | None:
    from polmodel.nn.model import PolModel  # e3nn (torch._dynamo, ~2 s to import): only when needed

    return None if isinstance(model_or_ensemble, PolModel) else cast("list[PolModel]", list(model_or_ensemble.members))


def predict_pairs(model_or_ensemble: PolModel | PolEnsemble, frames: Iterable[Atoms], batch_size: int = 16) -> Pairs:
    """{quantity: (labels, predictions)} as flat numpy arrays in QUANTITY_UNITS over all labelled entries.

    For an ensemble the prediction is the member mean (polmodel.nn.ensemble.ensemble_response).
    """
    frames = normalize_frames(frames)
    members = _ensemble_members(model_or_ensemble)
    reference = members[0] if members else model_or_ensemble
    frame_set = FrameSet(frames, reference.species, reference.cutoff, _model_dtype(model_or_ensemble))
    collected: dict[str, tuple[list[NDArray[Any]], list[NDArray[Any]]]] = {}
    device = _model_device(model_or_ensemble)
    for data, targets in frame_set.batches(batch_size):
        data = to_device(data, device)
        if members:
            from polmodel.nn.ensemble import ensemble_response  # e3nn (torch._dynamo, ~2 s to import): only when needed

            prediction = ensemble_response(cast("PolEnsemble", model_or_ensemble), data, **targets.response_flags())
        else:
            prediction = predict(model_or_ensemble, data, targets)
        for quantity, (label, predicted) in paired_values(prediction, targets).items():
            collected.setdefault(quantity, ([], []))
            collected[quantity][0].append(label.detach().cpu().numpy().ravel())
            collected[quantity][1].append(predicted.detach().cpu().numpy().ravel())
    return {q: (np.concatenate(collected[q][0]), np.concatenate(collected[q][1])) for q in QUANTITIES
            if q in collected}


def metrics_from_pairs(pairs: Mapping[str, tuple[NDArray[Any], NDArray[Any]]]) -> Metrics:
    """{quantity: {"mae", "rmse", "count", "unit"}} from `predict_pairs` output."""
    metrics: Metrics = {}
    for quantity, (label, predicted) in pairs.items():
        error = predicted.astype(float) - label.astype(float)
        metrics[quantity] = {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))),
                             "count": int(error.size), "unit": QUANTITY_UNITS[quantity]}
    return metrics


def evaluate(model_or_ensemble: PolModel | PolEnsemble, frames: Iterable[Atoms], batch_size: int = 16) -> Metrics:
    """MAE/RMSE per labelled quantity of a model or ensemble on `frames` (counts are label components)."""
    return metrics_from_pairs(predict_pairs(model_or_ensemble, frames, batch_size))


def evaluate_frames(model: PolModel | PolEnsemble, frames: Sequence[Atoms],
                    plots_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """{"num_frames", "errors": MAE/RMSE per labelled quantity, "plots": parity plot paths} of a model or ensemble
    on labelled frames; ValueError when the frames carry no label to compare with. `polmodel evaluate` and the
    demo's held-out errors (polmodel.workflows.demo) report it."""
    pairs = predict_pairs(model, frames)
    if not pairs:
        raise ValueError("the frames hold no labels (energy, forces, dipole, ...) to compare with")
    result = {"num_frames": len(frames), "errors": metrics_from_pairs(pairs), "plots": []}
    if plots_dir:
        result["plots"] = [os.path.abspath(path) for path in write_parity_plots(pairs, plots_dir)]
    return result


# --- ensembles -----------------------------------------------------------------------------------------------
def bootstrap_sample(frames: Sequence[Atoms], seed: int) -> list[Atoms]:
    """As many frames as given, drawn with replacement (seeded)."""
    indices = np.random.default_rng(seed).integers(0, len(frames), size=len(frames))
    return [frames[i] for i in indices]


def member_checkpoint_path(checkpoint: str | os.PathLike[str] | None, member: int, size: int
                           ) -> str | os.PathLike[str] | None:
    """The checkpoint file of ensemble member `member` (the path itself for a single model)."""
    if checkpoint is None or size == 1:
        return checkpoint
    root, extension = os.path.splitext(os.fspath(checkpoint))
    return f"{root}.member{member}{extension}"


def _initial_members(initial_model: PolModel | PolEnsemble | None, size: int) -> list[PolModel | None]:
    """Member k of the new ensemble starts from member k mod M of an initial ensemble of M (or from one model)."""
    if initial_model is None:
        return [None] * size
    members = _ensemble_members(initial_model) or [cast("PolModel", initial_model)]
    return [members[k % len(members)] for k in range(size)]


def train_ensemble(frames: Iterable[Atoms], config: TrainingConfig, size: int, bootstrap: bool = False,
                   initial_model: PolModel | PolEnsemble | None = None,
                   checkpoint: str | os.PathLike[str] | None = None) -> tuple[PolEnsemble, dict[str, Any]]:
    """Train `size` members with seeds config.seed + k on one split; returns (PolEnsemble, metrics).

    `initial_model` (PolModel or PolEnsemble): warm start, member k from member k mod M. `checkpoint`: a path; each
    member k checkpoints to `member_checkpoint_path(checkpoint, k, size)` (see train_model), so a killed ensemble
    run resumes with the member it was training, and finished members are read back, not retrained.
    metrics = {"num_train", "num_validation", "evaluated_on": "validation" | "train" (no validation frames),
    "validation": ensemble-mean metrics, "members": [{"seed", "validation", "best_epoch", "stopped",
    "wall_time_s", "resumed_from_epoch"}, ...], "warm_start": bool}.
    """
    from polmodel.nn.ensemble import PolEnsemble  # e3nn (torch._dynamo, ~2 s to import): only when needed

    if size < 1:
        raise ValueError(f"ensemble size must be >= 1, got {size}")
    frames = normalize_frames(frames)
    train_frames, valid_frames = split_frames(frames, config.validation_fraction, config.seed)
    species = list(config.species or _frames_species(frames))
    evaluation_frames = valid_frames or train_frames
    members, member_metrics = [], []
    for k, initial in enumerate(_initial_members(initial_model, size)):
        member_config = replace(config, seed=config.seed + k)
        member_train = bootstrap_sample(train_frames, member_config.seed) if bootstrap else train_frames
        model, history = train_model(member_train, valid_frames, member_config, species=species,
                                     initial_model=initial, checkpoint=member_checkpoint_path(checkpoint, k, size))
        members.append(model)
        member_metrics.append({"seed": member_config.seed, "validation": evaluate(model, evaluation_frames),
                               "best_epoch": history["best_epoch"], "stopped": history["stopped"],
                               "wall_time_s": history["wall_time_s"],
                               "resumed_from_epoch": history["resumed_from_epoch"]})
    # saved with each member: what the structures and fields it was trained on look like (polmodel/data/domain.py)
    domain = training_domain(train_frames, members[0].cutoff)
    for member, record in zip(members, member_metrics):
        # saved with the member: MD sets its default trust limit from it (polmodel.dynamics.md.spread_threshold_of)
        member.training_options = {**member.training_options, "domain": domain, "validation": {
            "evaluated_on": "validation" if valid_frames else "train", "metrics": record["validation"]}}
    ensemble = PolEnsemble(members)
    metrics = {"num_train": len(train_frames), "num_validation": len(valid_frames),
               "evaluated_on": "validation" if valid_frames else "train", "bootstrap": bool(bootstrap),
               "warm_start": initial_model is not None,
               "validation": evaluate(ensemble, evaluation_frames), "members": member_metrics}
    return ensemble, metrics
