"""What a training run makes of its frames before the first step, and the batches it draws from them.

- the split holds out whole structures (`split_frames`), so that validation measures unseen structures rather than
  the same structure at another field;
- per-species reference energies (least squares on composition → energy) and an energy scale (the RMS force
  component) are fitted to the training frames, so that the network only learns a residual of order one;
- field-magnitude balance: with `balance_field_magnitudes` each frame's weight in the loss is inversely proportional
  to the number of frames in its bin of |ε| (`field_magnitude_weights`), so that many zero-field or one-magnitude
  frames do not drown the frames at other fields;
- branch continuity of the dipole labels (polmodel.data.frames.align_dipole_branches) before every training set is
  used; batches keep the frames of one structure together so that they are moved onto the model's branch as one.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from polmodel.data.frames import (align_dipole_branches, frame_born_charges, frame_efield, frame_energy, frame_forces,
                                  frame_polarizability, normalize_frames, structure_key)
from polmodel.data.graphs import atoms_to_graph, collate
from polmodel.training.config import DTYPES, TrainingConfig
from polmodel.training.losses import TargetBatch

if TYPE_CHECKING:
    import numpy.typing as npt
    from ase import Atoms
    from numpy.typing import NDArray

    from polmodel.data.graphs import Graph

# |ε| below this (V/Å) is zero field, its own bin; above, bins are a factor FIELD_BIN_RATIO wide in |ε|
ZERO_FIELD = 1e-6
FIELD_BIN_RATIO = 1.25


def _draw_validation(groups: Sequence[Sequence[int]], wanted: float, rng: np.random.Generator) -> list[int]:
    """Indices of whole groups, in random order, until about `wanted` frames (at least one group, never all)."""
    chosen: list[int] = []
    for position, group in enumerate(rng.permutation(len(groups))):
        if position == len(groups) - 1 or (chosen and len(chosen) + 0.5 * len(groups[group]) > wanted):
            break
        chosen.extend(groups[group])
    return chosen


def _has_response(frame: Atoms) -> bool:
    return frame_born_charges(frame) is not None or frame_polarizability(frame) is not None


def _response_group_to_hold_out(frames: Sequence[Atoms], groups: Sequence[Sequence[int]], valid_indices: Sequence[int],
                                 seed: int) -> list[int]:
    """A structure with response labels (Z* or α) to add to a validation part that has none, drawn with `seed`,
    when at least two structures have them (one stays for training); [] otherwise. Without it, the validation part
    of a loop whose response labels are few often holds none, the model's Z* and α errors go unmeasured, and the
    thresholds that follow them (polmodel.active_learning.selection.adapt_trust_window) vanish."""
    if any(_has_response(frames[index]) for index in valid_indices):
        return []
    labelled = [group for group in groups if any(_has_response(frames[index]) for index in group)]
    if len(labelled) < 2:
        return []
    return list(labelled[int(np.random.default_rng([seed, 1]).integers(len(labelled)))])


def split_frames(frames: Iterable[Atoms], validation_fraction: float, seed: int
                 ) -> tuple[list[Atoms], list[Atoms]]:
    """Seeded (train, validation) split by structure: all frames of one structure (e.g. the zero-field and ±ε frames
    of one DFT label) land on the same side, so validation measures unseen structures, not unseen fields.

    Whole structures are drawn in random order until the validation set holds `validation_fraction` of the frames;
    at least one structure is held out when the fraction is non-zero, and at least one is kept for training. When
    that would hold out more than twice the requested share (few structures, e.g. the first two DFT labels of an
    active-learning loop) or there is a single structure, the split falls back to frames: training on half of the
    structures would cost more than a leaky validation set. A validation part without response labels gets one
    structure that has them (`_response_group_to_hold_out`).
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
    held_out = set(valid_indices) | set(_response_group_to_hold_out(frames, groups, valid_indices, seed))
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


def frames_species(frames: Iterable[Atoms]) -> list[str]:
    """The chemical symbols of `frames`, sorted: the species of a model trained on them unless told otherwise."""
    return sorted({symbol for frame in frames for symbol in frame.get_chemical_symbols()})
