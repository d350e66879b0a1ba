"""What a model was trained on, as a structure sees it, and how far a new structure lies from it.

`training_domain(frames, cutoff)` summarizes the training frames: per species pair the shortest distance and the
median of each atom's nearest-neighbour distance to that species, the number density (atoms/Å³) of the periodic
frames, the largest labelled field and, where the frames record it, the highest MD temperature they were sampled at
(`info['sampled_temperature_K']`, which the active-learning loop gives the frames it labels from its explorations).
`polmodel train` stores it with each member (training_options["domain"]). `outside_domain(atoms, domain, field,
temperature)` lists, one sentence each, what in a structure or a run the model never saw: a structure given in Bohr as
Å, a squeezed or torn cell, a species pair never seen close, a field far beyond the labels, MD far hotter than the
frames were sampled at. An ensemble's spread alone does not catch such a structure: far from every training frame the
members can agree (the quartz ensemble gives a force spread of 0.02 eV/Å on a cell in Bohr).
"""
import hashlib
import json
import os

import numpy as np

from polmodel.data.frames import frame_efield
from polmodel.data.neighbors import neighbor_list

#: Å; atoms closer than this are a collapsed structure, not one to label with DFT (also the DFT input check): the
#: default of PolCalculator's min_distance and of the loop's selection (polmodel/active_learning/selection.py)
MIN_INTERATOMIC_DISTANCE = 0.5
#: a pair closer than this fraction of its shortest training distance is outside the domain
SHORTEST_DISTANCE_FRACTION = 0.85
#: typical nearest-neighbour distances (per pair) outside this range of the training ones are outside the domain
TYPICAL_DISTANCE_RANGE = (0.85, 1.2)
#: number densities outside this range of the training ones are outside the domain
DENSITY_RANGE = (0.75, 1.3)
#: fields beyond this multiple of the largest labelled one are outside the domain
FIELD_FACTOR = 2.0
#: MD temperatures beyond this multiple of the highest temperature the training frames were sampled at are outside
#: the domain: below the 2x at which a converged loop was already unsure, above a run some tens of kelvin hotter
#: (benchmarks/README.md "Training domain temperature").
TEMPERATURE_FACTOR = 1.5
#: the frame info key of the MD temperature (K) a labelled structure was sampled at
SAMPLED_TEMPERATURE_KEY = "sampled_temperature_K"
#: a model file written before domains were stored (and that must stay byte-identical to its node in a provenance
#: archive) gets its domain from a record beside it: MODEL + this suffix (`polmodel domain`)
DOMAIN_RECORD_SUFFIX = ".domain.json"


def _pair(a, b):
    return "-".join(sorted((a, b)))


def _nearest_by_pair(atoms, cutoff):
    """{pair: (N_pair,) distances}: for each atom, the distance to its nearest neighbour of each species (within
    the cutoff)."""
    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, cutoff)
    if edge_index.shape[1] == 0:
        return {}
    receivers, senders = edge_index
    vectors = atoms.positions[senders] - atoms.positions[receivers] + shifts @ np.asarray(atoms.cell[:])
    lengths = np.linalg.norm(vectors, axis=1)
    symbols = np.array(atoms.get_chemical_symbols())
    nearest = {}
    for species in np.unique(symbols[senders]):
        to_species = symbols[senders] == species
        per_atom = np.full(len(atoms), np.inf)
        np.minimum.at(per_atom, receivers[to_species], lengths[to_species])
        for receiver_species in np.unique(symbols):
            values = per_atom[(symbols == receiver_species) & np.isfinite(per_atom)]
            if len(values):
                nearest.setdefault(_pair(receiver_species, species), []).append(values)
    return {pair: np.concatenate(values) for pair, values in nearest.items()}


def _density(atoms):
    return len(atoms) / abs(atoms.cell.volume) if np.all(atoms.pbc) else None


def training_domain(frames, cutoff):
    """The domain of `frames` (a JSON-able dict): pairs {"A-B": {"shortest", "typical"}} in Å, density [min,
    max] in atoms/Å³ (None without periodic frames), field_max in V/Å (the largest |ε| of any frame),
    sampled_temperature_K: the highest `info['sampled_temperature_K']` of the frames that record one (None when none
    does: a temperature nobody recorded is not guessed)."""
    distances, densities, fields, temperatures = {}, [], [0.0], []
    for atoms in frames:
        for pair, values in _nearest_by_pair(atoms, cutoff).items():
            distances.setdefault(pair, []).append(values)
        density = _density(atoms)
        if density is not None:
            densities.append(density)
        fields.append(float(np.linalg.norm(frame_efield(atoms))))   # a frame without a field is at zero
        if atoms.info.get(SAMPLED_TEMPERATURE_KEY) is not None:
            temperatures.append(float(atoms.info[SAMPLED_TEMPERATURE_KEY]))
    pairs = {}
    for pair, values in sorted(distances.items()):
        values = np.concatenate(values)
        pairs[pair] = {"shortest": float(values.min()), "typical": float(np.median(values))}
    return {"pairs": pairs, "density": [min(densities), max(densities)] if densities else None,
            "field_max": max(fields), "cutoff": float(cutoff),
            SAMPLED_TEMPERATURE_KEY: max(temperatures) if temperatures else None}


def with_labelled_field(domain, labelled_field):
    """`domain` with field_max at least `labelled_field` (V/Å; None: as it is): zero-field frames whose Z* and α
    were differentiated at that field were labelled there, though they record no field of their own."""
    if labelled_field is None:
        return domain
    return {**domain, "field_max": max(domain["field_max"], float(labelled_field))}


def outside_domain(atoms, domain, field_max=None, temperature_K=None):
    """Sentences naming what in `atoms` (and in a field of magnitude `field_max`, V/Å, and MD at `temperature_K`)
    lies outside `domain`; empty when everything is inside. Domains saved without a sampled temperature (older
    files, frames that record none) say nothing about the temperature."""
    notes = []
    found = _nearest_by_pair(atoms, domain["cutoff"])
    for pair, values in sorted(found.items()):
        trained = domain["pairs"].get(pair)
        if trained is None:
            notes.append(f"{pair} pairs within {domain['cutoff']:g} Å, which no training frame has")
            continue
        shortest, typical = float(values.min()), float(np.median(values))
        if shortest < SHORTEST_DISTANCE_FRACTION * trained["shortest"]:
            notes.append(f"{pair} closest at {shortest:.2f} Å, the training frames at {trained['shortest']:.2f} Å")
        low, high = TYPICAL_DISTANCE_RANGE
        if not low * trained["typical"] <= typical <= high * trained["typical"]:
            notes.append(f"{pair} typical nearest distance {typical:.2f} Å, the training frames' "
                         f"{trained['typical']:.2f} Å (lengths in Bohr given as Å are 1.89x longer)")
    present = set(atoms.get_chemical_symbols())
    for pair, trained in sorted(domain["pairs"].items()):
        # only pairs the training frames always had well inside the cutoff are missed
        if pair not in found and set(pair.split("-")) <= present and trained["typical"] < 0.8 * domain["cutoff"]:
            notes.append(f"no {pair} pair within {domain['cutoff']:g} Å, the training frames' nearest at typically "
                         f"{trained['typical']:.2f} Å (lengths in Bohr given as Å are 1.89x longer)")
    density = _density(atoms)
    if density is not None and domain.get("density"):
        low, high = domain["density"]
        if not DENSITY_RANGE[0] * low <= density <= DENSITY_RANGE[1] * high:
            notes.append(f"number density {density:.4f} atoms/Å³, the training frames' {low:.4f}–{high:.4f}")
    if field_max is not None and field_max > FIELD_FACTOR * domain["field_max"]:
        notes.append(f"a field of {field_max:.3g} V/Å, {field_max / domain['field_max']:.0f}x the largest labelled "
                     f"one ({domain['field_max']:.3g} V/Å)" if domain["field_max"] > 0 else
                     f"a field of {field_max:.3g} V/Å, where every label is at zero field")
    sampled = domain.get(SAMPLED_TEMPERATURE_KEY)
    if temperature_K is not None and sampled is not None and temperature_K > TEMPERATURE_FACTOR * sampled:
        hotter = f"{temperature_K / sampled:.1f}x the" if sampled > 0 else "above the"
        notes.append(f"MD at {temperature_K:g} K, {hotter} highest temperature the training frames were sampled at "
                     f"({sampled:g} K)")
    return notes


def model_domain(model):
    """The domain stored with a model (the first member's for an ensemble), or None for files without one."""
    member = getattr(model, "members", [model])[0]
    return (getattr(member, "training_options", None) or {}).get("domain")


def domain_record_path(model_path):
    return os.fspath(model_path) + DOMAIN_RECORD_SUFFIX


class StaleDomainRecordWarning(UserWarning):
    """The domain record beside a model file was written for another version of the file: it is not used."""


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def read_domain_record(model_path):
    """The domain in the record beside `model_path` (`write_domain_record`), or None when there is none, or when
    the record was written for another file than the one there now (StaleDomainRecordWarning)."""
    import warnings

    path = domain_record_path(model_path)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    if not isinstance(record, dict) or not isinstance(record.get("domain"), dict):
        raise ValueError(f"{path}: not a domain record (no 'domain' object)")
    if record.get("model", {}).get("sha256") != _sha256(model_path):
        warnings.warn(f"{path} was written for another version of {os.fspath(model_path)} (sha256 differs): the "
                      "model's training domain is unknown; rerun `polmodel domain`", StaleDomainRecordWarning,
                      stacklevel=3)
        return None
    return record["domain"]


def write_domain_record(model_path, frames, cutoff, frames_path, sampled_temperature_K=None, labelled_field=None,
                        note=None):
    """Measure the domain of `frames` (read from `frames_path`) and write it beside `model_path` with where it came
    from (the frames file's sha256 and frame count, the model file's sha256). `sampled_temperature_K` (K) sets the
    sampled temperature where the frames record none; `labelled_field` (V/Å) raises the largest field to at least
    that (`with_labelled_field`: zero-field frames whose Z* and α come from finite differences at that field).
    Returns the record."""
    domain = with_labelled_field(training_domain(frames, cutoff), labelled_field)
    if sampled_temperature_K is not None and domain[SAMPLED_TEMPERATURE_KEY] is None:
        domain[SAMPLED_TEMPERATURE_KEY] = float(sampled_temperature_K)
    record = {"domain": domain,
              "model": {"file": os.path.basename(os.fspath(model_path)), "sha256": _sha256(model_path)},
              "frames": {"file": os.fspath(frames_path), "sha256": _sha256(frames_path), "count": len(frames)},
              "note": note}
    path = domain_record_path(model_path)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, path)
    return record
