"""Training of PolModel on labelled frames: reference energies, split, early stopping, metrics, ensembles.

`train_model(train_frames, valid_frames, config) -> (model, history)` trains one model; `train_ensemble(frames,
config, size, bootstrap) -> (PolEnsemble, metrics)` trains `size` members with seeds seed, seed+1, ... on one
train/validation split (optionally each on a bootstrap resample of the training frames); `evaluate(model,
frames)` gives MAE/RMSE per quantity in `polmodel.losses.QUANTITY_UNITS`.

Before training, per-species reference energies are fitted by least squares on composition → energy and the
energy scale is set to the RMS force component, so the network only learns a residual of order one.
Same seed, same frames, same config and the same number of threads → bit-identical weights.
"""
import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from polmodel.allocator import keep_freed_memory_in_heap
from polmodel.data import atoms_to_graph, average_num_neighbors, collate
from polmodel.devices import resolve_device, to_device
from polmodel.frames import frame_efield, frame_energy, frame_forces, normalize_frames
from polmodel.losses import QUANTITIES, QUANTITY_UNITS, LossWeights, TargetBatch, paired_values, predict, \
    weighted_loss

SCHEDULERS = ("plateau", "cosine", "constant")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainingConfig:
    """Everything that determines a training run (JSON-able through `as_dict` / `from_dict`)."""

    cutoff: float = 5.0                        # Å
    hyperparameters: dict = field(default_factory=dict)   # PolModel keyword arguments
    species: list = None                       # None: the species of the frames, sorted
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
    device: str = "cpu"                        # cpu, cuda, cuda:N or auto (polmodel.devices)
    max_time_s: float = None                   # wall-clock limit of one model's training
    quiet: bool = False

    def __post_init__(self):
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

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# --- preparation ---------------------------------------------------------------------------------------------
def structure_key(frame):
    """Frames of one structure (same species, cell and positions, at any field) share this key."""
    rounded = [np.round(np.asarray(array, dtype=float), 6) + 0.0 for array in (frame.cell.array, frame.positions)]
    return (tuple(int(z) for z in frame.numbers),) + tuple(array.tobytes() for array in rounded)


def _draw_validation(groups, wanted, rng):
    """Indices of whole groups, in random order, until about `wanted` frames (at least one group, never all)."""
    chosen = []
    for position, group in enumerate(rng.permutation(len(groups))):
        if position == len(groups) - 1 or (chosen and len(chosen) + 0.5 * len(groups[group]) > wanted):
            break
        chosen.extend(groups[group])
    return chosen


def split_frames(frames, validation_fraction, seed):
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
    groups = {}
    for index, frame in enumerate(frames):
        groups.setdefault(structure_key(frame), []).append(index)
    groups = list(groups.values())
    valid_indices = _draw_validation(groups, wanted, np.random.default_rng(seed)) if len(groups) > 1 else []
    if not valid_indices or len(valid_indices) > max(2.0 * wanted, 1.0):
        singletons = [[index] for index in range(len(frames))]
        valid_indices = _draw_validation(singletons, wanted, np.random.default_rng(seed))
    held_out = set(valid_indices)
    valid = [frame for index, frame in enumerate(frames) if index in held_out]
    train = [frame for index, frame in enumerate(frames) if index not in held_out]
    return train, valid


def fit_reference_energies(frames, species):
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


def fit_energy_scale(frames, reference_energies):
    """RMS force component of the frames; without forces, the RMS per-atom energy residual; 1 eV as a floor case."""
    forces = [frame_forces(f) for f in frames if frame_forces(f) is not None]
    if forces:
        rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    else:
        residuals = [(frame_energy(f) - sum(reference_energies[s] for s in f.get_chemical_symbols())) / len(f)
                     for f in frames if frame_energy(f) is not None]
        rms = float(np.sqrt(np.mean(np.square(residuals)))) if residuals else 0.0
    return rms if rms > 1e-8 else 1.0


class FrameSet:
    """Frames with their graphs and targets, built once and batched many times."""

    def __init__(self, frames, species, cutoff, dtype):
        self.frames = list(frames)
        self.graphs = [atoms_to_graph(frame, species, cutoff, efield=frame_efield(frame), dtype=dtype)
                       for frame in self.frames]

    def __len__(self):
        return len(self.frames)

    def batch(self, indices):
        indices = list(indices)
        return collate([self.graphs[i] for i in indices]), TargetBatch([self.frames[i] for i in indices])

    def batches(self, batch_size, generator=None):
        order = (torch.randperm(len(self), generator=generator).tolist() if generator is not None
                 else list(range(len(self))))
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start:start + batch_size])


def _frames_species(frames):
    return sorted({symbol for frame in frames for symbol in frame.get_chemical_symbols()})


def initialize_model(train_frames, config, species=None):
    """The untrained model: seeded weights, neighbour normalization, reference energies, energy scale."""
    from polmodel.model import PolModel, field_scale_from_fields

    train_frames = normalize_frames(train_frames)
    species = list(config.species or species or _frames_species(train_frames))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = PolModel(species, config.cutoff, **config.hyperparameters)
    model = model.to(DTYPES[config.dtype])
    if "avg_num_neighbors" not in config.hyperparameters:
        graphs = [atoms_to_graph(frame, species, config.cutoff, dtype=DTYPES[config.dtype]) for frame in train_frames]
        model.set_avg_num_neighbors(average_num_neighbors(graphs))
    references = fit_reference_energies(train_frames, species)
    model.set_reference_energies(references)
    model.set_energy_scale(fit_energy_scale(train_frames, references))
    model.set_field_scale(field_scale_from_fields([frame_efield(frame) for frame in train_frames]))
    return model


# --- one model -----------------------------------------------------------------------------------------------
def _epoch_loss(model, frame_set, weights, batch_size):
    """Validation loss: frame-weighted mean of the batch losses (no parameter update), on the model's device."""
    device = _model_device(model)
    total, count = 0.0, 0
    for data, targets in frame_set.batches(batch_size):
        loss, _ = weighted_loss(paired_values(predict(model, to_device(data, device), targets), targets), weights)
        total += float(loss) * len(targets.num_atoms)
        count += len(targets.num_atoms)
    return total / count


def _make_scheduler(optimizer, config):
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.scheduler_factor,
                                                          patience=config.scheduler_patience,
                                                          min_lr=config.min_learning_rate)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1),
                                                          eta_min=config.min_learning_rate)
    return None


def train_model(train_frames, valid_frames, config, species=None):
    """Train one PolModel; returns (model with the best validation weights, history dict).

    Without validation frames the training loss decides early stopping. `history["epochs"]` lists per epoch
    the training and validation loss and the learning rate; `best_epoch`, `stopped` ("epochs", "patience",
    "max_time_s") and `wall_time_s` summarize the run.
    """
    from tqdm.auto import tqdm

    train_frames = normalize_frames(train_frames)
    valid_frames = normalize_frames(valid_frames or [])
    if not train_frames:
        raise ValueError("no training frames")
    if not any(TargetBatch([frame]).values for frame in train_frames):
        raise ValueError("none of the training frames carries a label (energy, forces, stress, dipole, Z*, α)")
    species = list(config.species or species or _frames_species(train_frames + valid_frames))
    dtype = DTYPES[config.dtype]
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory_in_heap()
    model = initialize_model(train_frames, config, species).to(device)
    train_set = FrameSet(train_frames, species, config.cutoff, dtype)
    valid_set = FrameSet(valid_frames, species, config.cutoff, dtype) if valid_frames else None

    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = _make_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    weights = config.loss_weights

    start = time.monotonic()
    best = {"loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = {"epochs": [], "stopped": "epochs"}
    progress = tqdm(range(1, config.epochs + 1), desc=f"training (seed {config.seed})", disable=config.quiet,
                    leave=False)
    for epoch in progress:
        model.train()
        train_total, train_count = 0.0, 0
        for data, targets in train_set.batches(config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            prediction = predict(model, to_device(data, device), targets, training=True)
            loss, _ = weighted_loss(paired_values(prediction, targets), weights)
            loss.backward()
            if config.gradient_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            optimizer.step()
            train_total += float(loss.detach()) * len(targets.num_atoms)
            train_count += len(targets.num_atoms)
        model.eval()
        train_loss = train_total / train_count
        valid_loss = _epoch_loss(model, valid_set, weights, config.batch_size) if valid_set else train_loss
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(valid_loss)
        elif scheduler is not None:
            scheduler.step()
        learning_rate = optimizer.param_groups[0]["lr"]
        history["epochs"].append({"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                                  "learning_rate": learning_rate})
        if valid_loss < best["loss"]:
            best = {"loss": valid_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        progress.set_postfix(train=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}", best=best["epoch"])
        if epoch - best["epoch"] >= config.patience:
            history["stopped"] = "patience"
            break
        if config.max_time_s is not None and time.monotonic() - start > config.max_time_s:
            history["stopped"] = "max_time_s"
            break
    progress.close()
    model.load_state_dict(best["state"])
    model.eval()
    history.update(best_epoch=best["epoch"], best_valid_loss=best["loss"],
                   wall_time_s=time.monotonic() - start, num_train=len(train_frames), num_validation=len(valid_frames))
    return model, history


# --- evaluation ----------------------------------------------------------------------------------------------
def _model_dtype(model_or_ensemble):
    return next(model_or_ensemble.parameters()).dtype


def _model_device(model_or_ensemble):
    return next(model_or_ensemble.parameters()).device


def _ensemble_members(model_or_ensemble):
    from polmodel.model import PolModel

    return None if isinstance(model_or_ensemble, PolModel) else list(model_or_ensemble.members)


def predict_pairs(model_or_ensemble, frames, batch_size=16):
    """{quantity: (labels, predictions)} as flat numpy arrays in QUANTITY_UNITS over all labelled entries.

    For an ensemble the prediction is the member mean (polmodel.ensemble.ensemble_response).
    """
    frames = normalize_frames(frames)
    members = _ensemble_members(model_or_ensemble)
    reference = members[0] if members else model_or_ensemble
    frame_set = FrameSet(frames, reference.species, reference.cutoff, _model_dtype(model_or_ensemble))
    collected = {}
    device = _model_device(model_or_ensemble)
    for data, targets in frame_set.batches(batch_size):
        data = to_device(data, device)
        if members:
            from polmodel.ensemble import ensemble_response

            prediction = ensemble_response(model_or_ensemble, data, **targets.response_flags())
        else:
            prediction = predict(model_or_ensemble, data, targets)
        for quantity, (label, predicted) in paired_values(prediction, targets).items():
            collected.setdefault(quantity, ([], []))
            collected[quantity][0].append(label.detach().cpu().numpy().ravel())
            collected[quantity][1].append(predicted.detach().cpu().numpy().ravel())
    return {q: (np.concatenate(collected[q][0]), np.concatenate(collected[q][1])) for q in QUANTITIES
            if q in collected}


def metrics_from_pairs(pairs):
    """{quantity: {"mae", "rmse", "count", "unit"}} from `predict_pairs` output."""
    metrics = {}
    for quantity, (label, predicted) in pairs.items():
        error = predicted.astype(float) - label.astype(float)
        metrics[quantity] = {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))),
                             "count": int(error.size), "unit": QUANTITY_UNITS[quantity]}
    return metrics


def evaluate(model_or_ensemble, frames, batch_size=16):
    """MAE/RMSE per labelled quantity of a model or ensemble on `frames` (counts are label components)."""
    return metrics_from_pairs(predict_pairs(model_or_ensemble, frames, batch_size))


# --- ensembles -----------------------------------------------------------------------------------------------
def bootstrap_sample(frames, seed):
    """As many frames as given, drawn with replacement (seeded)."""
    indices = np.random.default_rng(seed).integers(0, len(frames), size=len(frames))
    return [frames[i] for i in indices]


def train_ensemble(frames, config, size, bootstrap=False):
    """Train `size` members with seeds config.seed + k on one split; returns (PolEnsemble, metrics).

    metrics = {"num_train", "num_validation", "evaluated_on": "validation" | "train" (no validation frames),
    "validation": ensemble-mean metrics, "members": [{"seed", "validation", "best_epoch", "stopped",
    "wall_time_s"}, ...]}.
    """
    from polmodel.ensemble import PolEnsemble

    if size < 1:
        raise ValueError(f"ensemble size must be >= 1, got {size}")
    frames = normalize_frames(frames)
    train_frames, valid_frames = split_frames(frames, config.validation_fraction, config.seed)
    species = list(config.species or _frames_species(frames))
    evaluation_frames = valid_frames or train_frames
    members, member_metrics = [], []
    for k in range(size):
        member_config = replace(config, seed=config.seed + k)
        member_train = bootstrap_sample(train_frames, member_config.seed) if bootstrap else train_frames
        model, history = train_model(member_train, valid_frames, member_config, species=species)
        members.append(model)
        member_metrics.append({"seed": member_config.seed, "validation": evaluate(model, evaluation_frames),
                               "best_epoch": history["best_epoch"], "stopped": history["stopped"],
                               "wall_time_s": history["wall_time_s"]})
    ensemble = PolEnsemble(members)
    metrics = {"num_train": len(train_frames), "num_validation": len(valid_frames),
               "evaluated_on": "validation" if valid_frames else "train", "bootstrap": bool(bootstrap),
               "validation": evaluate(ensemble, evaluation_frames), "members": member_metrics}
    return ensemble, metrics
