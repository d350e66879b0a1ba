"""A committee of PolModels; its spread over members is the uncertainty used for active learning."""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch

from polmodel.data import keys
from polmodel.data.polarization import fold_dipole_difference
from polmodel.nn.model import members_from_payload
from polmodel.nn.model_file import read_payload, write_model_file
from polmodel.nn.response import ResponseFunction, cell_volume, compute_response, periodic_graphs

if TYPE_CHECKING:
    from polmodel.data.graphs import Graph
    from polmodel.nn.model import PolModel

# quantities whose member spread is reported as `<key>_std`
SPREAD_KEYS = (keys.ENERGY, keys.FORCES, keys.DIPOLE, keys.POLARIZATION, keys.BORN_CHARGES, keys.POLARIZABILITY)


class PolEnsemble(torch.nn.Module):
    """Models with the same species and cutoff (they may differ in architecture and weights)."""

    def __init__(self, members: Iterable[PolModel]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        species, cutoff = members[0].species, members[0].cutoff
        for index, member in enumerate(members):
            if member.species != species:
                raise ValueError(f"member {index} has species {member.species}, member 0 has {species}")
            if member.cutoff != cutoff:
                raise ValueError(f"member {index} has cutoff {member.cutoff} Å, member 0 has {cutoff} Å")
        self.members = torch.nn.ModuleList(members)

    @property
    def species(self) -> list[str]:
        return cast("PolModel", self.members[0]).species

    @property
    def cutoff(self) -> float:
        return cast("PolModel", self.members[0]).cutoff

    def __len__(self) -> int:
        return len(self.members)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ensemble file (polmodel/nn/model_file.py format, with its content hash)."""
        write_model_file("ensemble", list(self.members), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PolEnsemble:
        """Read an ensemble file, or a single-model file as an ensemble of one; `ModelFileError` naming the file
        if it is corrupt, truncated or not a polmodel file."""
        path = os.fspath(path)
        return PolEnsemble(members_from_payload(path, read_payload(path)))

    def forward(self, data: Graph) -> Graph:
        """Mean energy over members (ENERGY, ATOMIC_ENERGY), so that the ensemble is itself an energy model."""
        outputs = [member(data) for member in self.members]
        out = dict(data)
        for name in (keys.ATOMIC_ENERGY, keys.ENERGY):
            out[name] = torch.stack([output[name] for output in outputs]).mean(dim=0)
        return out


def onto_first_member_branch(dipoles: torch.Tensor, cell: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    """Member dipoles (K, G, 3) moved by whole e·R_i onto the branch of member 0 (periodic graphs only).

    Members are trained against folded dipoles, so each may settle on another branch of the multivalued ΩP; any
    branch change is an integer combination of e·R_i (the true quantum f·e·R_i is a multiple of it), so folding the
    differences to member 0 on the e·R_i lattice aligns them without knowing f. Genuine disagreements are far
    smaller than e·|R_i|/2.
    """
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    lattice = torch.where(periodic.view(-1, 1, 1), cell, eye)
    aligned = dipoles[0] + fold_dipole_difference(dipoles - dipoles[0], lattice)
    return torch.where(periodic.view(1, -1, 1), aligned, dipoles)


def ensemble_response(ensemble: PolEnsemble, data: Graph, response_function: ResponseFunction = compute_response,
                      **flags: bool) -> Graph:
    """`response_function` (compute_response, or another function of polmodel.nn.response with its signature, such as
    first_order_field_response) of every member; mean under the standard keys, population std as `<key>_std`.

    Dipoles and polarizations are averaged on one branch (`onto_first_member_branch`). `flags` are those of
    polmodel.nn.response.compute_response.
    """
    responses = [response_function(member, data, **flags) for member in ensemble.members]
    stacked = {name: torch.stack([response[name] for response in responses]) for name in responses[0]}
    periodic = periodic_graphs(data)
    if bool(periodic.any()):
        dipoles = onto_first_member_branch(stacked[keys.DIPOLE], data[keys.CELL], periodic)
        stacked[keys.DIPOLE] = dipoles
        if keys.POLARIZATION in stacked:
            volume = torch.where(periodic, cell_volume(data[keys.CELL]), torch.ones(()).to(dipoles))
            stacked[keys.POLARIZATION] = torch.where(periodic.view(1, -1, 1), dipoles / volume.view(1, -1, 1),
                                                     stacked[keys.POLARIZATION])
    result = {}
    for name, values in stacked.items():
        result[name] = values.mean(dim=0)
        if name in SPREAD_KEYS:
            result[f"{name}_std"] = values.std(dim=0, unbiased=False)
    return result
