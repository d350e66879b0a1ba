"""A committee of PolModels; its spread over members is the uncertainty used for active learning."""
import torch

from polmodel import keys
from polmodel.response import compute_response

# quantities whose member spread is reported as `<key>_std`
SPREAD_KEYS = (keys.ENERGY, keys.FORCES, keys.DIPOLE, keys.POLARIZATION, keys.BORN_CHARGES, keys.POLARIZABILITY)


class PolEnsemble(torch.nn.Module):
    """Models with the same species and cutoff (they may differ in hyperparameters and weights)."""

    def __init__(self, members):
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
    def species(self):
        return self.members[0].species

    @property
    def cutoff(self):
        return self.members[0].cutoff

    def __len__(self):
        return len(self.members)

    def forward(self, data):
        """Mean energy over members (ENERGY, ATOMIC_ENERGY), so that the ensemble is itself an energy model."""
        outputs = [member(data) for member in self.members]
        out = dict(data)
        for name in (keys.ATOMIC_ENERGY, keys.ENERGY):
            out[name] = torch.stack([output[name] for output in outputs]).mean(dim=0)
        return out


def ensemble_response(ensemble, data, **flags):
    """compute_response of every member; mean under the standard keys, population std as `<key>_std`.

    `flags` are those of polmodel.response.compute_response.
    """
    responses = [compute_response(member, data, **flags) for member in ensemble.members]
    result = {}
    for name in responses[0]:
        stacked = torch.stack([response[name] for response in responses])
        result[name] = stacked.mean(dim=0)
        if name in SPREAD_KEYS:
            result[f"{name}_std"] = stacked.std(dim=0, unbiased=False)
    return result
