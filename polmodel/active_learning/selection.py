"""Choosing the frames of an exploration that are worth a DFT label (docs/design.md "Uncertainty and selection").

Pure numpy + ASE (and polmodel.data's distance limit). A frame is
- *accurate* when its largest atomic force deviation is below the lower trust level and its polarization and
  Born-charge spreads are below their thresholds: the ensemble already agrees there;
- *failed* when its force deviation is at or above the upper trust level, or two atoms are closer than
  `min_distance`, or (with `min_distance_fraction`) closer than that fraction of the shortest distance of their
  species pair in the labelled data (`labelled_pair_distances`, which the loop measures on its dataset before each
  exploration): the structure is unphysical or far outside the data, and a label there would only teach the
  model about a place MD should never go (DP-GEN). The relative limit follows the material: in BaTiO3 (Ti–O
  2.0 Å) the absolute 0.5 Å let frames with Ti–O at 1.33 Å through, which DFT found metallic.
- a *candidate* otherwise.
Candidates are drawn at random (seeded, so a selection is reproducible; or, with `draw` LARGEST_SPREAD_FIRST, in the
order of their spread relative to its level) and deduplicated in that order with a
structural fingerprint (smoothed, per species-pair histograms of interatomic distances, which are invariant to
rotations, translations and permutations of like atoms); at most `max_candidates` are kept. Random draws, not
largest spread first: the most uncertain frames of a trust window sit at its upper edge, next to the blow-ups,
and a budget spent there teaches the model about the places MD should not go (DP-GEN draws at random too).

The trust window adapts to the model (`adapt_trust_window`): the lower level is `force_lower_factor` times the
current validation force error (in spread units when the training measured its spread / error), never below
`force_lower`, never above half the upper level and, within a stage, never above its value at the stage's last
exploration, so a model that has become more accurate asks for labels at smaller spreads, a poor one does not flood
the window, and a noisy error estimate does not close it.

`assign_label_tiers` decides how each selected frame is labelled within a budget counted in pw.x runs.
"""
from dataclasses import asdict, dataclass

import numpy as np

# the distance limit is shared with PolCalculator, so it lives below both
from polmodel.data.domain import MIN_INTERATOMIC_DISTANCE

ACCURATE, CANDIDATE, FAILED = "accurate", "candidate", "failed"
RANDOM_DRAW, LARGEST_SPREAD_FIRST = "random", "largest-spread-first"
DRAWS = (RANDOM_DRAW, LARGEST_SPREAD_FIRST)


@dataclass(frozen=True)
class SelectionCriteria:
    """Trust levels and limits; forces in eV/Å, polarization in e/Å², Born charges in e, distances in Å."""

    force_lower: float = 0.05
    force_upper: float = 0.5
    polarization_threshold: float | None = None
    born_charge_threshold: float | None = None
    polarizability_threshold: float | None = None  # e·Å²/V per atom, of polmodel.data.spreads.polarizability_spread
    max_candidates: int = 10
    similarity_tolerance: float = 0.05
    fingerprint_cutoff: float = 5.0
    min_distance: float = MIN_INTERATOMIC_DISTANCE
    # adaptive lower level = factor × the validation force error, in spread units where measured (adapt_trust_window)
    force_lower_factor: float | None = None
    # adaptive Z* and α thresholds = factor × the model's current Z* and α error, likewise
    response_threshold_factor: float | None = None
    seed: int = 0                             # of the random draw among the candidates
    # RANDOM_DRAW: candidates in a seeded random order (explored MD frames); LARGEST_SPREAD_FIRST: in the order of
    # their largest spread relative to its level (a pool of real structures, where no frame is a blow-up)
    draw: str = "random"
    min_distance_fraction: float | None = None     # of each species pair's shortest labelled distance
    labelled_pair_distances: dict | None = None    # {"A-B" (sorted symbols): shortest labelled distance, Å}

    def __post_init__(self):
        if not 0.0 <= self.force_lower < self.force_upper:
            raise ValueError(
                f"trust levels need 0 <= force_lower < force_upper, got {self.force_lower}, {self.force_upper}"
            )
        for name in ("polarization_threshold", "born_charge_threshold", "polarizability_threshold",
                     "response_threshold_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {self.draw!r}")
        if self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0, got {self.max_candidates}")
        if self.force_lower_factor is not None and not self.force_lower_factor > 0:
            raise ValueError(f"force_lower_factor must be positive or None, got {self.force_lower_factor}")
        if self.similarity_tolerance < 0 or self.fingerprint_cutoff <= 0:
            raise ValueError("similarity_tolerance must be >= 0 and fingerprint_cutoff > 0")
        if self.min_distance_fraction is not None and not 0.0 < self.min_distance_fraction <= 1.0:
            raise ValueError(f"min_distance_fraction must be in (0, 1] or None, got {self.min_distance_fraction}")
        for pair, distance in (self.labelled_pair_distances or {}).items():
            parts = str(pair).split("-")
            if len(parts) != 2 or pair != pair_key(*parts) or not float(distance) > 0:
                raise ValueError(f"labelled_pair_distances: expected 'A-B' (symbols sorted) -> positive Å, "
                                 f"got {pair!r}: {distance}")

    def pair_limits(self):
        """{"A-B": Å} below which a pair makes a frame failed (the relative limit, never below min_distance);
        empty without `min_distance_fraction` or labelled distances."""
        if self.min_distance_fraction is None:
            return {}
        return {pair: max(self.min_distance, self.min_distance_fraction * float(distance))
                for pair, distance in (self.labelled_pair_distances or {}).items()}

    def too_close(self, atoms):
        """Whether two atoms of `atoms` are closer than `min_distance` or than their pair's relative limit."""
        if closest_pair(atoms)[0] < self.min_distance:
            return True
        limits = self.pair_limits()
        if not limits:
            return False
        shortest = shortest_pair_distances([atoms], max(limits.values()))
        return any(distance < limits[pair] for pair, distance in shortest.items() if pair in limits)

    @classmethod
    def from_dict(cls, values):
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown selection parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def as_dict(self):
        return asdict(self)


def _checked_error(value, name):
    error = float(value)
    if not np.isfinite(error) or error < 0:
        raise ValueError(f"validation {name} error must be a finite, non-negative number, got {value}")
    return error


#: the quantity names of a calibration (polmodel.training.evaluation.spread_calibration) behind each level
CALIBRATED_LEVELS = {"force_lower": "forces", "born_charge_threshold": "born_effective_charges",
                     "polarizability_threshold": "polarizability"}


def adapt_trust_window(criteria, validation_force_rmse, born_charge_rmse=None, polarizability_rmse=None,
                       previous=None, calibration=None):
    """The criteria with the lower trust level, and the response thresholds, set from the model's current errors.

    force_lower = clip(force_lower_factor × validation_force_rmse, criteria.force_lower, criteria.force_upper / 2):
    `criteria.force_lower` is the floor, and half the upper level the ceiling, so a window always remains.
    With `response_threshold_factor`, the Z* and α thresholds become that factor times the model's Z* and α RMSE
    (where given and > 0), so the response, like the forces, is asked for where the members disagree by more
    than the model's own error. Quantities without a factor or an error keep their criteria.

    `previous` (the criteria this function returned for the last exploration of the same stage) keeps every
    adapted level from rising: no level is set above its previous value. The errors come from a validation part
    of a few frames, whose estimate can rise from one iteration to the next by chance while the model, trained on
    more labels, has not got worse; a level that followed it up could lie above every spread, and the loop would
    find no candidate and call itself converged on noise (benchmarks/README.md "Pool-based active learning"). A
    level held too low only asks for more labels.

    `calibration` (the training's `spread_calibration`: per quantity the members' mean spread and the ensemble's
    mean error on its validation frames, both in the form MD records and the level is compared with) puts each
    level into spread units: the level becomes factor × that error × spread / error. A level follows the error, but
    it is compared with a spread, and the spread of a small ensemble lies several times below its error:
    uncalibrated, a level of 2 × the error lay above every frame's spread, and the loop took nothing from its first
    ensemble on (benchmarks/README.md "Pool-based active learning"). The error is the calibration's, not the RMSE
    given: the RMSE is per component, the spread a frame's largest atomic norm, and a level built from the one and
    compared with the other sat 2–4 × lower than its factor says (every explored frame of the toy loop a candidate).
    Without a calibration the factor bridges those forms, as it always has.
    """
    from dataclasses import replace

    changes = {}
    if criteria.force_lower_factor is not None and validation_force_rmse is not None:
        level = _spread_level(criteria.force_lower_factor, validation_force_rmse, "force_lower", calibration)
        changes["force_lower"] = min(max(level, criteria.force_lower), 0.5 * criteria.force_upper)
    if criteria.response_threshold_factor is not None:
        for name, value in (("born_charge_threshold", born_charge_rmse),
                            ("polarizability_threshold", polarizability_rmse)):
            if value is not None and _checked_error(value, name) > 0:
                changes[name] = _spread_level(criteria.response_threshold_factor, value, name, calibration)
    if previous is not None:
        for name, value in changes.items():
            earlier = getattr(previous, name)
            if earlier is not None:
                changes[name] = min(value, earlier)
    return replace(criteria, **changes) if changes else criteria


def _spread_level(factor, rmse, name, calibration):
    """factor × the error, in spread units: with a calibration of the level's quantity, its error and spread / error
    (both in the form of the spread the level is compared with); without, the RMSE as given."""
    measured = (calibration or {}).get(CALIBRATED_LEVELS[name])
    if not measured:
        return factor * _checked_error(rmse, name)
    error = _checked_error(measured["error"], name)
    return factor * error * float(measured["ratio"])


def _spread_norm(spread, count):
    """Per-frame scalar of a spread given as (T,) or (T, 3); None stays None."""
    if spread is None:
        return None
    spread = np.asarray(spread, dtype=float)
    if spread.ndim == 2:
        spread = np.linalg.norm(spread, axis=1)
    if spread.shape != (count,):
        raise ValueError(f"spread has shape {spread.shape}, expected ({count},) or ({count}, 3)")
    return spread


def classify(max_force_std, criteria, polarization_std=None, born_charge_std=None, polarizability_std=None):
    """Per-frame labels ACCURATE / CANDIDATE / FAILED (numpy array of str). The spreads are one number per frame
    (polarization also (T, 3)): a frame is a candidate when its force spread is inside the trust window or any
    response spread is above its threshold."""
    force = np.asarray(max_force_std, dtype=float)
    if force.ndim != 1:
        raise ValueError(f"max_force_std must be one value per frame, got shape {force.shape}")
    if not np.all(np.isfinite(force)):
        raise ValueError("max_force_std contains non-finite values")
    polarization = _spread_norm(polarization_std, len(force))
    born = _spread_norm(born_charge_std, len(force))
    polarizability = _spread_norm(polarizability_std, len(force))

    uncertain = force >= criteria.force_lower
    if polarization is not None and criteria.polarization_threshold is not None:
        uncertain |= polarization > criteria.polarization_threshold
    if born is not None and criteria.born_charge_threshold is not None:
        uncertain |= born > criteria.born_charge_threshold
    if polarizability is not None and criteria.polarizability_threshold is not None:
        uncertain |= polarizability > criteria.polarizability_threshold
    labels = np.full(len(force), ACCURATE, dtype=object)
    labels[uncertain] = CANDIDATE
    labels[force >= criteria.force_upper] = FAILED
    return labels


def fingerprint(atoms, cutoff=5.0, bins=50, width=0.1):
    """Per species-pair, Gaussian-smoothed histograms of interatomic distances up to `cutoff`, per atom.

    Returns a dict {(species_a, species_b): (bins,) array}. Periodic images are included (ASE neighbour list).
    """
    from ase.neighborlist import neighbor_list

    symbols = np.array(atoms.get_chemical_symbols())
    species = sorted(set(symbols))
    centres = np.linspace(0.0, cutoff, bins)
    first, second, distances = neighbor_list("ijd", atoms, cutoff)
    result = {}
    for index, a in enumerate(species):
        for b in species[index:]:
            mask = (symbols[first] == a) & (symbols[second] == b)
            d = distances[mask]
            histogram = np.exp(-0.5 * ((centres[None, :] - d[:, None]) / width) ** 2).sum(axis=0)
            result[(a, b)] = histogram / max(len(atoms), 1)
    return result


def fingerprint_distance(first, second):
    """Root-mean-square difference of two fingerprints (a missing pair counts as zeros)."""
    keys = sorted(set(first) | set(second))
    if not keys:
        return 0.0
    size = len(next(iter(first.values() if first else second.values())))
    total = 0.0
    for key in keys:
        a = first.get(key, np.zeros(size))
        b = second.get(key, np.zeros(size))
        total += float(np.sum((a - b) ** 2))
    return float(np.sqrt(total / (len(keys) * size)))


def remove_near_duplicates(frames, order, tolerance, cutoff=5.0, limit=None):
    """Indices (from `order`, in that order) of frames kept greedily: one is kept when its fingerprint differs
    from every kept frame by more than `tolerance`; stops after `limit` frames.

    Frames with different chemical formulae are never duplicates of each other.
    """
    kept, kept_prints = [], []
    for index in order:
        if limit is not None and len(kept) >= limit:
            break
        atoms = frames[index]
        formula = atoms.get_chemical_formula()
        current = fingerprint(atoms, cutoff=cutoff)
        duplicate = any(
            formula == other_formula and fingerprint_distance(current, other) <= tolerance
            for other_formula, other in kept_prints
        )
        if not duplicate:
            kept.append(int(index))
            kept_prints.append((formula, current))
    return kept


def pair_key(first, second):
    """The species-pair name used in `labelled_pair_distances`: the two symbols sorted, joined by '-'."""
    return "-".join(sorted((str(first), str(second))))


def shortest_pair_distances(frames, cutoff=4.0):
    """{"A-B": shortest distance in Å} over all `frames`, per species pair met within `cutoff` (periodic images
    included; a pair never closer than `cutoff` is absent)."""
    from ase.neighborlist import neighbor_list

    shortest = {}
    for atoms in frames:
        first, second, distances = neighbor_list("ijd", atoms, float(cutoff))
        symbols = np.array(atoms.get_chemical_symbols())
        species = sorted(set(symbols))
        for index, a in enumerate(species):
            for b in species[index:]:
                mask = (((symbols[first] == a) & (symbols[second] == b))
                        | ((symbols[first] == b) & (symbols[second] == a)))
                if mask.any():
                    key = pair_key(a, b)
                    shortest[key] = min(shortest.get(key, np.inf), float(distances[mask].min()))
    return shortest


def closest_pair(atoms):
    """(distance in Å, i, j) of the closest two atoms (minimum image in periodic directions); (inf, -1, -1) for one."""
    if len(atoms) < 2:
        return np.inf, -1, -1
    distances = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    np.fill_diagonal(distances, np.inf)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    return float(distances[i, j]), int(i), int(j)


def select_candidates(frames, max_force_std, criteria, polarization_std=None, born_charge_std=None,
                      polarizability_std=None):
    """Classify `frames`, deduplicate the candidates and keep at most `criteria.max_candidates`.

    Returns (selected indices, statistics dict). The fractions refer to all frames: `candidate_fraction` is the
    share between the trust levels (or above a P / Z* threshold), `failed_fraction` the share above the upper
    trust level, and `accurate_fraction` (DP-GEN's accurate ratio) the rest.
    """
    if len(frames) != len(max_force_std):
        raise ValueError(f"{len(frames)} frames but {len(max_force_std)} force spreads")
    labels = classify(max_force_std, criteria, polarization_std, born_charge_std, polarizability_std)
    labels[[criteria.too_close(frame) for frame in frames]] = FAILED
    force = np.asarray(max_force_std, dtype=float)
    candidates = np.flatnonzero(labels == CANDIDATE)
    if criteria.draw == LARGEST_SPREAD_FIRST:
        relative = relative_spread(criteria, force, born_charge_std, polarizability_std)
        order = candidates[np.argsort(-relative[candidates], kind="stable")]
    else:
        # A seeded random order, not largest spread first (see the module docstring).
        order = np.random.default_rng(criteria.seed).permutation(candidates)
    selected = remove_near_duplicates(
        frames, order, criteria.similarity_tolerance, criteria.fingerprint_cutoff, limit=criteria.max_candidates
    )
    total = len(frames)
    counts = {label: int(np.sum(labels == label)) for label in (ACCURATE, CANDIDATE, FAILED)}
    statistics = {
        "num_frames": total,
        "num_accurate": counts[ACCURATE],
        "num_candidates": counts[CANDIDATE],
        "num_failed": counts[FAILED],
        "num_selected": len(selected),
        "accurate_fraction": counts[ACCURATE] / total if total else 0.0,
        "candidate_fraction": counts[CANDIDATE] / total if total else 0.0,
        "failed_fraction": counts[FAILED] / total if total else 0.0,
        "max_force_std_max": float(force.max()) if total else 0.0,
        "max_force_std_mean": float(force.mean()) if total else 0.0,
        "criteria": criteria.as_dict(),
    }
    return selected, statistics


def relative_spread(criteria, max_force_std, born_charge_std=None, polarizability_std=None):
    """Per frame, the largest of its spreads each divided by its level: the force spread by the lower trust level,
    the Z* and α spreads by their thresholds (where set); the order of LARGEST_SPREAD_FIRST."""
    force = np.asarray(max_force_std, dtype=float)
    ratios = [force / criteria.force_lower if criteria.force_lower > 0 else force]
    response = response_spread_ratio(criteria, _spread_norm(born_charge_std, len(force)),
                                     _spread_norm(polarizability_std, len(force)))
    if response is not None:
        ratios.append(response)
    return np.max(ratios, axis=0)


def is_converged(statistics, threshold):
    """DP-GEN's criterion: converged when the untrusted share (candidates + failed) is below `threshold`."""
    if statistics["num_frames"] == 0:
        return False
    return statistics["candidate_fraction"] + statistics["failed_fraction"] < threshold


# --- label tiers ---------------------------------------------------------------------------------------------------
#: The label tiers of the DFT labelling, cheapest first (docs/design.md "Label tiers").
ENERGY_FORCES, FIELD_FRAMES, FULL = "energy_forces", "field_frames", "full"
TIERS = (ENERGY_FORCES, FIELD_FRAMES, FULL)


def pw_runs_per_label(tier, field_vectors=(), string_extrapolation=False):
    """pw.x runs one label of `tier` with `field_vectors` costs, before any restart or field halving (budgets in pw.x
    runs): 1 zero-field scf, 1 per field vector, and for `full` 3 Berry-phase nscf and 6 ±ε runs (12 with the
    string extrapolation). The one home of the tiers' costs: `energy_forces` 1, `field_frames` at one field 2,
    `full` 10 (16 with the string extrapolation)."""
    runs = 1 + len(field_vectors)
    if tier == FULL:
        runs += 3 + 6 * (2 if string_extrapolation else 1)
    return runs


@dataclass(frozen=True)
class LabelPlan:
    """How one selected frame is labelled: its tier, the field vectors of a `field_frames` label, its pw.x runs."""

    index: int
    tier: str
    fields: tuple
    cost: int


def cheap_tier(efield, field_tolerance=1e-8):
    """(tier, fields, pw.x runs) of the cheap label of a frame sampled at `efield` (V/Å): `energy_forces` (one
    zero-field SCF) when the field is zero, otherwise `field_frames` at that field (zero field plus one lelfield
    SCF), so that the labels follow the field range the exploration reaches."""
    efield = np.asarray(efield if efield is not None else np.zeros(3), dtype=float)
    if np.linalg.norm(efield) <= field_tolerance:
        return ENERGY_FORCES, (), pw_runs_per_label(ENERGY_FORCES)
    fields = (tuple(float(x) for x in efield),)
    return FIELD_FRAMES, fields, pw_runs_per_label(FIELD_FRAMES, fields)


def full_response_spread(max_born_charge_std, polarization_std_norm):
    """The spread that decides who gets the full response: the Born-charge spread (e) where the MD recorded one
    (> 0), else the norm of the polarization spread (e/Å²)."""
    return float(max_born_charge_std) if max_born_charge_std > 0 else float(polarization_std_norm)


def response_spread_ratio(criteria, born_charge_std=None, polarizability_std=None):
    """Per frame, the largest ratio of a response spread (Z*, α; one number per frame) to its threshold in
    `criteria`; None when no spread has a threshold. Above 1 the members disagree on the response by more than
    the threshold: `assign_label_tiers(..., response_spread=ratio, min_full_spread=1.0)` upgrades those frames."""
    ratios = [np.asarray(spread, dtype=float) / threshold
              for spread, threshold in ((born_charge_std, criteria.born_charge_threshold),
                                        (polarizability_std, criteria.polarizability_threshold))
              if spread is not None and threshold is not None]
    return np.max(ratios, axis=0) if ratios else None


def assign_label_tiers(efields, response_spread, budget, full_cost, max_full, min_full_spread=0.0):
    """Plan the labels of selected frames within `budget` pw.x runs.

    The rule: every frame gets the cheap tier at the field it was sampled at (`cheap_tier`); the `max_full` frames
    with the largest polarization / Born-charge spread (`response_spread`, one number per frame; None: no spread
    known, nobody is upgraded) above `min_full_spread` get the full central-difference response instead
    (`full_cost` pw.x runs), as long as the budget allows it: where the ensemble already agrees on the response, a
    full label would spend `full_cost` runs to confirm it. Frames are then taken in the given order (the
    selection's random order), full ones first, until the budget is spent; frames that no longer fit are left out.
    Returns [LabelPlan] in frame order.
    """
    count = len(efields)
    if budget < 0 or full_cost < 1 or max_full < 0 or min_full_spread < 0:
        raise ValueError(f"need budget >= 0, full_cost >= 1, max_full >= 0, min_full_spread >= 0; got {budget}, "
                         f"{full_cost}, {max_full}, {min_full_spread}")
    cheap = [cheap_tier(efield) for efield in efields]
    upgraded = set()
    if response_spread is not None and max_full:
        spread = np.asarray(response_spread, dtype=float)
        if spread.shape != (count,):
            raise ValueError(f"response_spread has shape {spread.shape}, expected ({count},)")
        order = np.argsort(-spread, kind="stable")
        upgraded = {int(index) for index in order[:max_full] if spread[index] > min_full_spread}
    plans, spent = {}, 0
    for index in sorted(upgraded, key=lambda i: -float(response_spread[i])):
        if spent + full_cost <= budget:
            plans[index] = LabelPlan(index, FULL, (), int(full_cost))
            spent += full_cost
    for index in range(count):
        if index in plans:
            continue
        tier, fields, cost = cheap[index]
        if spent + cost <= budget:
            plans[index] = LabelPlan(index, tier, fields, cost)
            spent += cost
    return [plans[index] for index in sorted(plans)]
