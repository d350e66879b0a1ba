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
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from polmodel import keys
from polmodel.frames import (frame_born_charges, frame_dipole, frame_efield, frame_energy, frame_forces,
                             frame_polarizability, frame_polarization_quantum, frame_stress)
from polmodel.polarization import fold_dipole_difference
from polmodel.response import compute_response

# quantity (a polmodel.keys name) -> unit in which it is compared, reported and plotted
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


class TargetBatch:
    """Labels of a batch of frames as tensors, with per-frame / per-atom masks of what is labelled.

    `values[q]` holds the labels of quantity q for the labelled entries only (in frame order), `index[q]` the
    graph indices (per-graph quantities) or atom indices (forces, Z*) they belong to.
    """

    def __init__(self, frames, dtype=torch.float64):
        self.num_atoms = torch.tensor([len(frame) for frame in frames], dtype=torch.long)
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
        if keys.ENERGY in self.index:
            energy_graphs = self.index[keys.ENERGY].tolist()
            # (n_E, 3) V/Å, and the row of each energy frame's dipole label (-1: none, the energy is kept as is)
            self.energy_efield = torch.tensor(np.array([frame_efield(frames[g]) for g in energy_graphs]),
                                              dtype=torch.float64)
            self.energy_dipole_row = torch.tensor([dipole_rows.get(g, -1) for g in energy_graphs], dtype=torch.long)

    def __contains__(self, quantity):
        return quantity in self.values

    def response_flags(self):
        """The derivatives a prediction must contain to be compared with these labels."""
        return {"stress": keys.STRESS in self, "born_charges": keys.BORN_CHARGES in self,
                "polarizability": keys.POLARIZABILITY in self}


def predict(model, data, targets, training=False):
    """The model's response with exactly the derivatives `targets` needs (see polmodel.response)."""
    return compute_response(model, data, training=training, **targets.response_flags())


def dipole_branch_shift(prediction, targets):
    """(n_D, 3) float64: the integer combination of quanta that moves each dipole label onto the prediction's branch.

    label + shift is the label's image nearest to the predicted dipole (for frames without a quantum, zero).
    """
    device = prediction[keys.DIPOLE].device
    index = targets.index[keys.DIPOLE].to(device)
    label = targets.values[keys.DIPOLE].to(device)
    with torch.no_grad():
        # float64: a label many quanta away keeps its digits when the branch is subtracted
        difference = prediction[keys.DIPOLE][index].detach().to(torch.float64) - label
        folded = fold_dipole_difference(difference, targets.dipole_quantum.to(device))
        shift = difference - folded
    return torch.where(targets.dipole_folded.to(device).unsqueeze(-1), shift, torch.zeros_like(shift))


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


def weighted_loss(pairs, weights):
    """(total, {quantity: mean squared error}) from `paired_values`; absent quantities are left out."""
    terms = {quantity: (predicted - label).pow(2).mean() for quantity, (label, predicted) in pairs.items()}
    if not terms:
        raise ValueError("the batch carries no labels at all: nothing to train on")
    total = sum(weights.of(quantity) * term for quantity, term in terms.items())
    return total, terms


def batch_loss(model, data, targets, weights, training=True):
    """Convenience: response, pairs and weighted loss of one batch."""
    prediction = predict(model, data, targets, training=training)
    return weighted_loss(paired_values(prediction, targets), weights)
