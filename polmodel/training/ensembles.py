"""Ensembles of differently seeded members, whose disagreement is the uncertainty that MD's trust check and the
loop's selection act on (polmodel/nn/ensemble.py).

All members share one train/validation split, so that their validation metrics and the ensemble's describe the same
held-out structures; they differ by their seeds (config.seed + k: initial weights and batch order) and, on request,
by a bootstrap resample of the training frames. A warm start maps the members of an initial ensemble onto the new
ones (member k from member k mod M), so that the loop's next iteration starts from the last one even when the
ensemble size changes. Each member keeps its training domain and validation metrics with it, because MD sets its
trust limit from them.

A member can fail where the others learn: the α-quartz campaign's member 0 carried, warm start after warm start, an
α 17–43 % off DFT while its two siblings were within 8 %, and a validation split with one α-labelled frame did not
show it. So every member is also measured on (up to HEALTH_FRAMES of) its training frames, and a member whose error
on a quantity there is above OUTLIER_FACTOR times the median of the others' is named in the metrics
(`outlier_members`); with `retrain_outliers` it is trained again from scratch with a new seed and replaces the old
one when it is no longer an outlier.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from polmodel.data.domain import training_domain, with_labelled_field
from polmodel.data.frames import normalize_frames
from polmodel.training.checkpoints import member_checkpoint_path
from polmodel.training.config import TrainingConfig
from polmodel.training.data import frames_species, split_frames
from polmodel.training.evaluation import ensemble_members, evaluate, spread_calibration
from polmodel.training.train import train_model

if TYPE_CHECKING:
    from ase import Atoms

    from polmodel.nn.ensemble import PolEnsemble
    from polmodel.nn.model import PolModel


def bootstrap_sample(frames: Sequence[Atoms], seed: int) -> list[Atoms]:
    """As many frames as given, drawn with replacement (seeded)."""
    indices = np.random.default_rng(seed).integers(0, len(frames), size=len(frames))
    return [frames[i] for i in indices]


#: a member whose training-frame RMSE of a quantity is above this many times the median of the other members' RMSE
#: did not learn what they learned from the same frames (the quartz member above: 7-13x)
OUTLIER_FACTOR = 4.0
#: training frames the members are measured on (seeded choice; all when fewer)
HEALTH_FRAMES = 64


def member_outliers(errors: Sequence[dict[str, dict[str, float]]], factor: float = OUTLIER_FACTOR
                    ) -> dict[int, list[str]]:
    """{member index: [quantities]} of the members whose RMSE (errors[k][quantity]["rmse"], one dict per member as
    `evaluate` returns) is above `factor` times the median RMSE of the other members; empty for fewer than two."""
    outliers: dict[int, list[str]] = {}
    if len(errors) < 2:
        return outliers
    for k, own in enumerate(errors):
        for quantity, values in own.items():
            others = [errors[j][quantity]["rmse"] for j in range(len(errors)) if j != k and quantity in errors[j]]
            if others and values["rmse"] > factor * float(np.median(others)):
                outliers.setdefault(k, []).append(quantity)
    return outliers


def health_frames(train_frames: Sequence[Atoms], seed: int) -> list[Atoms]:
    """The training frames the members' health is measured on: all, or HEALTH_FRAMES of them chosen with `seed`,
    those with response labels (the quantities with fewest labels) first."""
    if len(train_frames) <= HEALTH_FRAMES:
        return list(train_frames)
    order = np.random.default_rng(seed).permutation(len(train_frames))
    responses = [i for i in order if "polarizability" in train_frames[i].info
                 or "born_effective_charges" in train_frames[i].arrays]
    chosen = set(responses)
    rest = [i for i in order if i not in chosen]
    return [train_frames[i] for i in (responses + rest)[:HEALTH_FRAMES]]


def _initial_members(initial_model: PolModel | PolEnsemble | None, size: int) -> list[PolModel | None]:
    """Member k of the new ensemble starts from member k mod M of an initial ensemble of M (or from one model)."""
    if initial_model is None:
        return [None] * size
    members = ensemble_members(initial_model) or [cast("PolModel", initial_model)]
    return [members[k % len(members)] for k in range(size)]


def train_ensemble(frames: Iterable[Atoms], config: TrainingConfig, size: int, bootstrap: bool = False,
                   initial_model: PolModel | PolEnsemble | None = None,
                   checkpoint: str | os.PathLike[str] | None = None,
                   retrain_outliers: bool = False) -> tuple[PolEnsemble, dict[str, Any]]:
    """Train `size` members with seeds config.seed + k on one split; returns (PolEnsemble, metrics).

    `initial_model` (PolModel or PolEnsemble): warm start, member k from member k mod M. `checkpoint`: a path; each
    member k checkpoints to `member_checkpoint_path(checkpoint, k, size)` (see train_model), so a killed ensemble
    run resumes with the member it was training, and finished members are read back, not retrained.
    metrics = {"num_train", "num_validation", "evaluated_on": "validation" | "train" (no validation frames),
    "validation": ensemble-mean metrics, "members": [{"seed", "validation", "best_epoch", "stopped",
    "wall_time_s", "resumed_from_epoch", "train": metrics on the health frames, "retrained": {...} where one was},
    ...], "warm_start": bool, "calibration": the members' spread against the ensemble's error on the same frames
    (`spread_calibration`; ensembles of two or more), "outlier_members": {index: [quantities]} after any retraining
    (module docstring)}. `retrain_outliers`: train an outlier member again from scratch (seed config.seed + k +
    size), and keep the new one when it is no longer an outlier.
    """
    from polmodel.nn.ensemble import PolEnsemble  # e3nn (torch._dynamo, ~2 s to import): only when needed

    if size < 1:
        raise ValueError(f"ensemble size must be >= 1, got {size}")
    frames = normalize_frames(frames)
    train_frames, valid_frames = split_frames(frames, config.validation_fraction, config.seed)
    species = list(config.species or frames_species(frames))
    evaluation_frames = valid_frames or train_frames
    members, member_metrics = [], []
    for k, initial in enumerate(_initial_members(initial_model, size)):
        model, record = _train_member(config.seed + k, initial, train_frames, valid_frames, config, species,
                                      bootstrap, member_checkpoint_path(checkpoint, k, size))
        members.append(model)
        member_metrics.append(record)
    checked = health_frames(train_frames, config.seed)
    for record, model in zip(member_metrics, members):
        record["train"] = evaluate(model, checked)
    outliers = member_outliers([record["train"] for record in member_metrics])
    if retrain_outliers:
        for k, quantities in sorted(outliers.items()):
            _retrain_from_scratch(k, quantities, members, member_metrics, train_frames, valid_frames, checked,
                                  config, species, size, bootstrap, checkpoint)
        outliers = member_outliers([record["train"] for record in member_metrics])
    evaluated_on = "validation" if valid_frames else "train"
    _keep_domain_and_validation(members, member_metrics, train_frames, evaluated_on, config.labelled_field)
    ensemble = PolEnsemble(members)
    metrics = {"num_train": len(train_frames), "num_validation": len(valid_frames),
               "evaluated_on": evaluated_on, "bootstrap": bool(bootstrap),
               "warm_start": initial_model is not None,
               "validation": evaluate(ensemble, evaluation_frames), "members": member_metrics,
               "outlier_members": {str(k): quantities for k, quantities in outliers.items()}}
    if size > 1:
        metrics["calibration"] = spread_calibration(ensemble, evaluation_frames)
    return ensemble, metrics


def _train_member(seed: int, initial: PolModel | None, train_frames: Sequence[Atoms], valid_frames: Sequence[Atoms],
                  config: TrainingConfig, species: list[str], bootstrap: bool,
                  checkpoint: str | os.PathLike[str] | None) -> tuple[PolModel, dict[str, Any]]:
    """One member with seed `seed`, warm-started from `initial` (None: from scratch), on the training frames or their
    bootstrap resample: (model, its record, validated on the validation frames or, without them, the training ones)."""
    member_train = bootstrap_sample(train_frames, seed) if bootstrap else train_frames
    model, history = train_model(member_train, valid_frames, replace(config, seed=seed), species=species,
                                 initial_model=initial, checkpoint=checkpoint)
    return model, _member_record(seed, model, history, valid_frames or train_frames)


def _retrain_from_scratch(k: int, quantities: list[str], members: list[PolModel], records: list[dict[str, Any]],
                          train_frames: Sequence[Atoms], valid_frames: Sequence[Atoms], checked: Sequence[Atoms],
                          config: TrainingConfig, species: list[str], size: int, bootstrap: bool,
                          checkpoint: str | os.PathLike[str] | None) -> None:
    """Member k trained again without a warm start and with a new seed; it replaces the old one (model and record)
    when it is no longer an outlier among the others. The record says what was tried either way."""
    seed = config.seed + k + size
    path = member_checkpoint_path(checkpoint, k, size)
    path = None if path is None else f"{os.fspath(path)}.scratch"
    model, record = _train_member(seed, None, train_frames, valid_frames, config, species, bootstrap, path)
    record["train"] = evaluate(model, checked)
    errors = [r["train"] for r in records]
    errors[k] = record["train"]
    kept = k not in member_outliers(errors)
    summary = {"reason": quantities, "seed": seed, "kept": kept,
               "train_rmse_before": {q: records[k]["train"][q]["rmse"] for q in quantities},
               "train_rmse_after": {q: record["train"][q]["rmse"] for q in quantities}}
    if kept:
        members[k], records[k] = model, {**record, "retrained": summary}
    else:
        records[k]["retrained"] = summary


def _member_record(seed: int, model: PolModel, history: dict[str, Any], evaluation_frames: Sequence[Atoms]
                   ) -> dict[str, Any]:
    """A member's entry of the ensemble's metrics: its seed, its own validation metrics and how its run ended."""
    return {"seed": seed, "validation": evaluate(model, evaluation_frames), "best_epoch": history["best_epoch"],
            "stopped": history["stopped"], "wall_time_s": history["wall_time_s"],
            "resumed_from_epoch": history["resumed_from_epoch"]}


def _keep_domain_and_validation(members: Sequence[PolModel], records: Sequence[dict[str, Any]],
                                train_frames: Sequence[Atoms], evaluated_on: str,
                                labelled_field: float | None) -> None:
    """Each member's `training_options` gain the training domain and the member's validation metrics."""
    # saved with each member: what the structures and fields it was trained on look like (polmodel/data/domain.py)
    domain = with_labelled_field(training_domain(train_frames, members[0].cutoff), labelled_field)
    for member, record in zip(members, records):
        # saved with the member: MD sets its default trust limit from it (polmodel.dynamics.md.spread_threshold_of)
        member.training_options = {**member.training_options, "domain": domain, "validation": {
            "evaluated_on": evaluated_on, "metrics": record["validation"]}}
