"""Errors of a trained model or ensemble against labels, in the units of `polmodel.training.losses.QUANTITY_UNITS`:
what `polmodel train` and `polmodel evaluate` report, what an ensemble member stores as its validation metrics, and
how fast a run learned (`learning_milestones`). An ensemble is judged by its member mean, the prediction MD and the
loop use.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from polmodel.data.frames import normalize_frames
from polmodel.runtime.devices import to_device
from polmodel.training.data import FrameSet
from polmodel.training.losses import QUANTITIES, QUANTITY_UNITS, paired_values, predict
from polmodel.training.parity_plots import write_parity_plots

if TYPE_CHECKING:
    from ase import Atoms
    from numpy.typing import NDArray

    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel

#: per quantity, (labels, predictions) as flat arrays (`predict_pairs`)
Pairs = dict[str, tuple["NDArray[Any]", "NDArray[Any]"]]
#: per quantity, {"mae", "rmse", "count", "unit"} (`metrics_from_pairs`)
Metrics = dict[str, dict[str, Any]]


def _model_dtype(model_or_ensemble: torch.nn.Module) -> torch.dtype:
    return next(model_or_ensemble.parameters()).dtype


def model_device(model_or_ensemble: torch.nn.Module) -> torch.device:
    return next(model_or_ensemble.parameters()).device


def ensemble_members(model_or_ensemble: PolModel | PolEnsemble) -> list[PolModel] | None:
    from polmodel.nn.model import PolModel  # e3nn (torch._dynamo, ~2 s to import): only when needed

    return None if isinstance(model_or_ensemble, PolModel) else cast("list[PolModel]", list(model_or_ensemble.members))


def predict_pairs(model_or_ensemble: PolModel | PolEnsemble, frames: Iterable[Atoms], batch_size: int = 16) -> Pairs:
    """{quantity: (labels, predictions)} as flat numpy arrays in QUANTITY_UNITS over all labelled entries.

    For an ensemble the prediction is the member mean (polmodel.nn.ensemble.ensemble_response).
    """
    frames = normalize_frames(frames)
    members = ensemble_members(model_or_ensemble)
    reference = members[0] if members else model_or_ensemble
    frame_set = FrameSet(frames, reference.species, reference.cutoff, _model_dtype(model_or_ensemble))
    collected: dict[str, tuple[list[NDArray[Any]], list[NDArray[Any]]]] = {}
    device = model_device(model_or_ensemble)
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


def frame_spreads(ensemble: PolEnsemble, frames: Sequence[Atoms], batch_size: int = 8
                  ) -> dict[str, dict[str, NDArray[np.float64]]]:
    """Per quantity (forces, Z*, α) and per frame, the members' spread and the member mean's error against the
    frame's label, in the forms MD records and selection compares (polmodel.data.spreads: the largest atomic force
    and Z* norms, α per atom and component): {quantity: {"spread": (F,), "error": (F,)}}, the error NaN where the
    frame has no such label. The spread needs no label: it is what the loop sees of a frame before labelling it."""
    from polmodel.data import keys
    from polmodel.data.frames import frame_born_charges, frame_forces, frame_polarizability
    from polmodel.data.spreads import largest_atom_norm, polarizability_spread
    from polmodel.nn.ensemble import ensemble_response  # e3nn (torch._dynamo, ~2 s to import): only when needed

    frames = normalize_frames(frames)
    members = cast("list[PolModel]", list(ensemble.members))
    frame_set = FrameSet(frames, members[0].species, members[0].cutoff, _model_dtype(ensemble))
    device = model_device(ensemble)
    labels = {keys.FORCES: frame_forces, keys.BORN_CHARGES: frame_born_charges,
              keys.POLARIZABILITY: frame_polarizability}
    found: dict[str, dict[str, list[float]]] = {quantity: {"spread": [], "error": []} for quantity in labels}
    for start in range(0, len(frames), batch_size):
        indices = list(range(start, min(start + batch_size, len(frames))))
        data, _ = frame_set.batch(indices)
        response = ensemble_response(ensemble, to_device(data, device), born_charges=True, polarizability=True)
        atoms_of = data[keys.BATCH].cpu().numpy()
        predicted = {quantity: (response[quantity].detach().cpu().numpy(),
                                response[f"{quantity}_std"].detach().cpu().numpy()) for quantity in labels}
        for graph, index in enumerate(indices):
            frame, mine = frames[index], atoms_of == graph
            for quantity, label_of in labels.items():
                mean, std = predicted[quantity]
                label = label_of(frame)
                if quantity == keys.POLARIZABILITY:
                    spread = polarizability_spread(std[graph], len(frame))
                    error = np.nan if label is None else polarizability_spread(mean[graph] - label, len(frame))
                else:
                    spread = largest_atom_norm(std[mine])
                    error = np.nan if label is None else largest_atom_norm(mean[mine].reshape(label.shape) - label)
                found[quantity]["spread"].append(spread)
                found[quantity]["error"].append(error)
    return {quantity: {name: np.asarray(values, dtype=float) for name, values in columns.items()}
            for quantity, columns in found.items()}


def spread_calibration(ensemble: PolEnsemble, frames: Sequence[Atoms], batch_size: int = 8
                       ) -> dict[str, dict[str, float]]:
    """How far the members disagree where the ensemble's error is known: per quantity (forces, Z*, α) the mean over
    the labelled `frames` of the per-frame spread and error (`frame_spreads`), and `ratio` = spread / error.
    Selection scales its error-following levels by the ratio (polmodel.active_learning.selection.
    adapt_trust_window): a small ensemble's spread lies well below its error, and a level of 2 × the error then
    lies above every frame's spread."""
    calibration = {}
    for quantity, columns in frame_spreads(ensemble, frames, batch_size).items():
        labelled = np.isfinite(columns["error"])
        if labelled.any() and np.mean(columns["error"][labelled]) > 0:
            spread, error = float(np.mean(columns["spread"][labelled])), float(np.mean(columns["error"][labelled]))
            calibration[quantity] = {"spread": spread, "error": error, "ratio": spread / error,
                                     "frames": int(labelled.sum())}
    return calibration


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
