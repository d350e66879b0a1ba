"""Training targets from labelled frames, and the weighted loss on energy, forces, stress, dipole, Z* and α.

Every quantity is compared in one unit per quantity (`QUANTITY_UNITS`): extensive quantities per atom (energy,
cell dipole, polarizability), the others per component. A label that a frame lacks is masked out; a quantity
that no frame of the batch carries contributes nothing (its term is absent, not zero-filled).

The cell dipole is compared through the minimum image over the quanta of the label frame: a Berry-phase
dipole on another branch (shifted by an integer combination of quanta) gives exactly the same error. The same
branch enters the energy of a finite-field frame: pw.x's enthalpy contains -ε·ΩP with ΩP on its own branch, so a
label whose dipole is K quanta away from the model's has an energy off by ε·K. The energy label is moved onto
the prediction's branch with the dipole (E + ε·ΩP_label - ε·ΩP_on_branch); without that, no model could fit
the ±ε energies of, e.g., cubic BaTiO3, whose pw.x dipole (6 quanta, 48 e·Å) makes E(±ε) differ by 3.5 eV.
Frames that share `info['dipole_branch']` (set by polmodel.data.frames.align_dipole_branches from the ±ε runs of one
structure or the frames of one trajectory, never from the model) are moved onto the prediction's branch by one
common integer combination of quanta, the one that fits them best together, so no frame of such a group can be
put on another branch than the rest; a frame without a group is folded on its own against the prediction
(the fallback).

Frames may carry weights (`TargetBatch(frames, frame_weights=...)`, e.g. polmodel.training.data's field-magnitude
balance): each quantity's mean squared error is then the weighted mean over its labelled entries, a per-atom
entry weighted by its frame's weight.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from polmodel.data import keys
from polmodel.data.frames import (frame_born_charges, frame_dipole, frame_efield, frame_energy, frame_forces,
                                  frame_polarizability, frame_polarization_quantum, frame_stress)
from polmodel.data.polarization import common_lattice_coefficients, nearest_lattice_coefficients
from polmodel.nn.response import compute_response

# quantity (a polmodel.data.keys name) -> unit in which it is compared, reported and plotted
QUANTITY_UNITS = {
    keys.ENERGY: "eV/atom",
    keys.FORCES: "eV/Å",
    keys.STRESS: "eV/Å^3",
    keys.DIPOLE: "e·Å/atom (folded)",
    keys.BORN_CHARGES: "e",
    keys.POLARIZABILITY: "e·Å²/V/atom",
}
QUANTITIES = tuple(QUANTITY_UNITS)


@dataclass
class LossWeights:
    """Weight of each quantity's mean squared error (in QUANTITY_UNITS) in the total loss.

    The defaults put the terms on a similar footing for typical ionic solids: per-atom energy errors are
    ~10x smaller than force errors, and stress components (eV/Å^3) ~Ω/N ≈ 10-20x smaller than per-atom virials.
    """

    energy: float = 10.0
    forces: float = 1.0
    stress: float = 100.0
    dipole: float = 10.0
    born_effective_charges: float = 1.0
    polarizability: float = 1.0

    def as_dict(self):
        return asdict(self)

    def of(self, quantity):
        return getattr(self, quantity)

    def divided_by(self, variances):
        """These weights with each quantity's divided by its label variance (`label_variances`): the term then is
        the quantity's squared error relative to its spread in the data, and the weights say how much each
        quantity counts, whatever its unit. Quantities without a variance keep their weight."""
        return LossWeights(**{quantity: weight / variances[quantity] if variances.get(quantity) else weight
                              for quantity, weight in self.as_dict().items()})


#: TrainingConfig.loss_normalization: "none" (the weights as given, in QUANTITY_UNITS) or "label_variance"
LOSS_NORMALIZATIONS = ("none", "label_variance")


def label_variances(frames, reference_energies):
    """{quantity: variance of its labels over `frames`, in QUANTITY_UNITS} for energy (per atom, after the
    per-species reference energies: what the network learns), forces, stress, Z* and α (per atom); quantities
    with fewer than two labelled entries are left out. The dipole is left out too: a Berry-phase dipole is defined
    only up to a quantum, and the spread of its labels says more about their branches than about the data."""
    targets = TargetBatch(frames)
    variances = {}
    for quantity in (keys.ENERGY, keys.FORCES, keys.STRESS, keys.BORN_CHARGES, keys.POLARIZABILITY):
        if quantity not in targets.values:
            continue
        values = targets.values[quantity].double()
        if quantity in (keys.ENERGY, keys.POLARIZABILITY):
            index = targets.index[quantity]
            atoms = targets.num_atoms[index].double().view(-1, *([1] * (values.dim() - 1)))
            if quantity == keys.ENERGY:
                reference = torch.tensor([sum(reference_energies[symbol] for symbol in frames[g].get_chemical_symbols())
                                          for g in index.tolist()], dtype=torch.float64)
                values = values - reference
            values = values / atoms
        values = values.reshape(-1)
        if values.numel() > 1:
            variances[quantity] = float(values.var(unbiased=False))
    return variances


class TargetBatch:
    """Labels of a batch of frames as tensors, with per-frame / per-atom masks of what is labelled.

    `values[q]` holds the labels of quantity q for the labelled entries only (in frame order), `index[q]` the
    graph indices (per-graph quantities) or atom indices (forces, Z*) they belong to.
    """

    def __init__(self, frames, dtype=torch.float64, frame_weights=None):
        self.num_atoms = torch.tensor([len(frame) for frame in frames], dtype=torch.long)
        # (G,) weight of each frame in every quantity's mean (None: all equal)
        self.frame_weights = None if frame_weights is None else torch.as_tensor(frame_weights, dtype=torch.float64)
        atom_offsets = np.concatenate([[0], np.cumsum([len(frame) for frame in frames])[:-1]])
        per_graph = {keys.ENERGY: frame_energy, keys.STRESS: frame_stress, keys.DIPOLE: frame_dipole,
                     keys.POLARIZABILITY: frame_polarizability}
        per_atom = {keys.FORCES: frame_forces, keys.BORN_CHARGES: frame_born_charges}
        self.values, self.index = {}, {}
        for quantity, accessor in per_graph.items():
            labelled = [(g, value) for g, value in enumerate(map(accessor, frames)) if value is not None]
            if labelled:
                self.index[quantity] = torch.tensor([g for g, _ in labelled], dtype=torch.long)
                self.values[quantity] = torch.tensor(np.array([v for _, v in labelled], dtype=float), dtype=dtype)
        for quantity, accessor in per_atom.items():
            labelled = [(offset, value) for offset, value in zip(atom_offsets, map(accessor, frames))
                        if value is not None]
            if labelled:
                self.index[quantity] = torch.cat([torch.arange(offset, offset + len(v)) for offset, v in labelled])
                self.values[quantity] = torch.tensor(np.concatenate([v for _, v in labelled]), dtype=dtype)
        # dipole frames without a quantum (open boundaries) are compared without folding
        quanta = [frame_polarization_quantum(frame) for frame in frames]
        dipole_rows = {}
        if keys.DIPOLE in self.index:
            dipole_rows = {g: row for row, g in enumerate(self.index[keys.DIPOLE].tolist())}
            chosen = [quanta[g] for g in self.index[keys.DIPOLE].tolist()]
            self.dipole_folded = torch.tensor([q is not None for q in chosen])
            self.dipole_quantum = torch.tensor(np.array([np.eye(3) if q is None else q for q in chosen]),
                                               dtype=torch.float64)
            # rows with the same id are moved onto the prediction's branch together; a frame without a known
            # branch group is its own group (ids below zero)
            self.dipole_branch = torch.tensor([int(frames[g].info.get("dipole_branch", -1 - g))
                                               for g in self.index[keys.DIPOLE].tolist()], dtype=torch.long)
        if keys.ENERGY in self.index:
            energy_graphs = self.index[keys.ENERGY].tolist()
            # (n_E, 3) V/Å, and the row of each energy frame's dipole label (-1: none, the energy is kept as is)
            self.energy_efield = torch.tensor(np.array([frame_efield(frames[g]) for g in energy_graphs]),
                                              dtype=torch.float64)
            self.energy_dipole_row = torch.tensor([dipole_rows.get(g, -1) for g in energy_graphs], dtype=torch.long)

    def __contains__(self, quantity):
        return quantity in self.values

    def entry_weights(self, quantity):
        """(n_q,) float64 weights of the labelled entries of `quantity` (their frames' weights), or None."""
        if self.frame_weights is None:
            return None
        graphs = self.index[quantity]
        if quantity in (keys.FORCES, keys.BORN_CHARGES):  # per-atom entries: the frame each atom belongs to
            graphs = torch.repeat_interleave(torch.arange(len(self.num_atoms)), self.num_atoms)[graphs]
        return self.frame_weights[graphs]

    def response_flags(self):
        """The derivatives a prediction must contain to be compared with these labels."""
        return {"stress": keys.STRESS in self, "born_charges": keys.BORN_CHARGES in self,
                "polarizability": keys.POLARIZABILITY in self}


def predict(model, data, targets, training=False):
    """The model's response with exactly the derivatives `targets` needs (see polmodel.nn.response)."""
    return compute_response(model, data, training=training, **targets.response_flags())


def dipole_branch_shift(prediction, targets):
    """(n_D, 3) float64: the integer combination of quanta that moves each dipole label onto the prediction's branch.

    For a frame on its own, label + shift is the label's image nearest to the predicted dipole; frames of one branch
    group (`targets.dipole_branch`) share the integer combination that brings them nearest together
    (polmodel.data.polarization.common_lattice_coefficients). Frames without a quantum get zero.
    """
    device = prediction[keys.DIPOLE].device
    index = targets.index[keys.DIPOLE].to(device)
    with torch.no_grad():
        # float64 on the CPU: a label many quanta away keeps its digits when the branch is subtracted, and the
        # integer search is numpy
        difference = (prediction[keys.DIPOLE][index].detach().to(torch.float64).cpu()
                      - targets.values[keys.DIPOLE]).numpy()
    quanta = targets.dipole_quantum.numpy()
    folded = targets.dipole_folded.numpy()
    branches = targets.dipole_branch.numpy()
    integers = np.zeros_like(difference)
    for branch in np.unique(branches[folded]):
        rows = np.flatnonzero((branches == branch) & folded)
        if len(rows) == 1:
            integers[rows] = nearest_lattice_coefficients(difference[rows], quanta[rows])
        else:
            integers[rows] = common_lattice_coefficients(difference[rows], quanta[rows])
    shift = np.einsum("ri,rij->rj", integers, quanta)
    return torch.from_numpy(shift).to(device)


def paired_values(prediction, targets):
    """{quantity: (label, predicted)} over the labelled entries, both in QUANTITY_UNITS.

    The dipole label is moved onto the prediction's branch (label + integer combination of its quanta), so
    predicted - label is the folded difference, and a finite-field energy label moves with it (-ε·shift); the
    gradient flows through the prediction only.
    """
    shift = dipole_branch_shift(prediction, targets) if keys.DIPOLE in targets else None
    pairs = {}
    for quantity in (keys.ENERGY, keys.FORCES, keys.STRESS, keys.BORN_CHARGES, keys.POLARIZABILITY):
        if quantity not in targets:
            continue
        index = targets.index[quantity].to(prediction[quantity].device)
        predicted = prediction[quantity][index]
        label = targets.values[quantity].to(predicted.device)
        if quantity == keys.ENERGY and shift is not None:
            rows = targets.energy_dipole_row.to(label.device)
            field_shift = (targets.energy_efield.to(label.device) * shift[rows.clamp(min=0)]).sum(-1)
            label = label - torch.where(rows >= 0, field_shift, torch.zeros_like(field_shift))
        label = label.to(predicted.dtype)
        if quantity in (keys.ENERGY, keys.POLARIZABILITY):
            atoms = targets.num_atoms.to(predicted.device)[index].to(predicted.dtype).view(
                -1, *([1] * (predicted.dim() - 1)))
            predicted, label = predicted / atoms, label / atoms
        pairs[quantity] = (label, predicted)
    if shift is not None:
        device = prediction[keys.DIPOLE].device
        index = targets.index[keys.DIPOLE].to(device)
        predicted = prediction[keys.DIPOLE][index]
        label_on_branch = (targets.values[keys.DIPOLE].to(device) + shift).to(predicted.dtype)
        atoms = targets.num_atoms.to(device)[index].to(predicted.dtype).unsqueeze(-1)
        pairs[keys.DIPOLE] = (label_on_branch / atoms, predicted / atoms)
    return pairs


def _mean_squared_error(label, predicted, entry_weights):
    squared = (predicted - label).pow(2)
    if entry_weights is None:
        return squared.mean()
    entry_weights = entry_weights.to(squared)
    per_entry = squared.reshape(len(squared), -1).mean(dim=1)
    return (entry_weights * per_entry).sum() / entry_weights.sum()


def weighted_loss(pairs, weights, targets=None):
    """(total, {quantity: mean squared error}) from `paired_values`; absent quantities are left out.

    With `targets` whose frames carry weights, each mean is weighted by frame (TargetBatch.entry_weights).
    """
    terms = {quantity: _mean_squared_error(label, predicted,
                                           None if targets is None else targets.entry_weights(quantity))
             for quantity, (label, predicted) in pairs.items()}
    if not terms:
        raise ValueError("the batch carries no labels at all: nothing to train on")
    total = sum(weights.of(quantity) * term for quantity, term in terms.items())
    return total, terms


def batch_loss(model, data, targets, weights, training=True):
    """Convenience: response, pairs and weighted loss of one batch."""
    prediction = predict(model, data, targets, training=training)
    return weighted_loss(paired_values(prediction, targets), weights, targets)
