"""The field-aware equivariant energy model E(R, cell, ε).

Message passing in the spirit of NequIP/MACE, kept small: species one-hot → scalar features; per edge, spherical
harmonics of r_ij times a learned radial function (Bessel basis × polynomial cutoff envelope → MLP) weight a
"uvu" tensor product with the sender's features (polmodel/nn/edge_messages.py: e3nn's arithmetic, laid out for cheap
second derivatives); messages are summed over neighbours, normalized by a constant average neighbour count, and
mixed by linears and a gate with a residual connection. Node features are 0e + 1o (feature_lmax 1) by default,
with edge harmonics up to l = 2; feature_lmax 2 adds 2e node features at about twice the cost
(benchmarks/README.md "Model cost").

The homogeneous field enters as ε̃ = ε / field_scale (a buffer in V/Å, set by training from the frames' RMS
field, like the energy scale, so that the labelled fields sit at |ε̃| ≈ 0.1 whatever their size in V/Å; see
LABELLED_FIELD_IN_SCALES), through the unnormalized spherical
harmonics Y¹(ε̃), Y²(ε̃) and |ε̃|², i.e. polynomials of the field, in two places:
- the field layers (the last `field_layers`, default 1): a per-atom tensor product of the node features with
  (|ε̃|², Y¹, Y²) before the gate (MACE-Field's way: the field as a 1o/2e "node attribute");
- the readout (`field_readout` 1): its invariants are, per channel, the scalars, the vectors dotted with Y¹(ε̃)
  and the rank-2 features contracted with Y²(ε̃). With feature_lmax 1 the last layer has no 2e features; it
  then sums scalar messages weighted by (r̂_ij·ε̃)² − |ε̃|²/3 ∝ Y²(r̂_ij)·Y²(ε̃) (Allegro-pol's way: the field's
  harmonics beside the edge's), one more radial path.
Why: before the readout contracted the field, the last layer's vector outputs (of the field product, the edge
messages, the gate) fed only gated vectors that a scalar readout drops, so those weights had an exactly zero
gradient of E; and nothing let α be anisotropic at a centrosymmetric site (no polar vector exists there, and
the field entered a scalar only as |ε|²). Now every weight element reaches E (tests/test_model.py), ε·v_i gives
Born charges and the contractions with Y²(ε̃) an anisotropic α. `field_readout` 0 keeps the gate-only coupling
(benchmarks/field_model.py compares the two).
The gate and the readout's MLP make the energy nonlinear in ε. Because the field is always coupled (also at
ε = 0), the cost of E + F + P at finite field is the cost of E + F at zero field.
Why the last layer by default: every receptive field is the same (num_layers cutoffs) wherever the field is
coupled, but a field coupled before a layer's edge messages makes each Born-charge pass differentiate those
messages' backward as well (benchmarks/README.md "Model cost"). `field_layers=num_layers` couples it in every layer.

Edge vectors are computed inside `forward` from POSITIONS, CELL and EDGE_CELL_SHIFT, so the energy is
differentiable w.r.t. positions, cell (strain) and field; see polmodel/nn/response.py for the derivatives. The
positions enter only through the edges' harmonics and radial weights (`energy_from_edges`), which
polmodel/nn/edge_inputs.py uses to make Born charges cheaper.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.autograd import forward_ad

import e3nn
from e3nn import o3
from e3nn.math import normalize2mom
from e3nn.nn import Gate

from polmodel.data import keys
from polmodel.nn.edge_messages import EdgeMessages, gather_senders, sum_over_receivers, uvu_paths
from polmodel.nn.model_file import ModelFileError, read_payload, write_model_file

if TYPE_CHECKING:
    import numpy.typing as npt

    from polmodel.data.graphs import Graph

#: The PolModel constructor keywords, the model's "architecture" (as TrainingConfig and model files name it).
DEFAULT_ARCHITECTURE = {
    "num_features": 32,          # channels per irrep of the node features
    "lmax": 2,                   # of the edge spherical harmonics
    "feature_lmax": 1,           # of the node features (0e + 1o by default; 2 adds 2e features, ~2× slower)
    "num_layers": 2,
    "field_layers": 1,           # how many of the last layers couple the field (see the module docstring)
    "num_radial": 8,             # Bessel functions
    "radial_hidden": 64,         # width of the radial MLP
    "readout_hidden": 16,        # width of the per-atom energy MLP
    "polynomial_degree": 6,      # of the smooth cutoff envelope
    "avg_num_neighbors": None,   # None: estimated from the cutoff at a typical solid density
    "field_readout": 1,          # 1: the readout contracts the last layer's l > 0 features with the field (every
                                 # weight reaches E); 0: the field through the gate only
}
#: The name of DEFAULT_ARCHITECTURE in earlier releases, kept for callers.
DEFAULT_HYPERPARAMETERS = DEFAULT_ARCHITECTURE
# The labelled fields sit at |ε̃| ≈ 0.1 field scales: larger ones stall force learning, and there the forces and Born
# charges learn together (benchmarks/README.md "Field scale in training").
LABELLED_FIELD_IN_SCALES = 0.1
# V/Å: the reference field when the training frames are all at zero field (their Z* and α come from ±ε runs at
# about 0.05 V/Å). A model built directly sees the field in V/Å (scale 1) until `set_field_scale`.
DEFAULT_FIELD_SCALE = 0.05 / LABELLED_FIELD_IN_SCALES
# Atoms per Å³ of a typical oxide; only used to guess avg_num_neighbors when none is given.
_TYPICAL_NUMBER_DENSITY = 0.07


def _natural_irreps(multiplicity: int, lmax: int) -> o3.Irreps:
    """multiplicity × (0e + 1o + 2e + ...): the parities a polar vector's spherical harmonics produce."""
    return o3.Irreps([(multiplicity, (l, (-1) ** l)) for l in range(lmax + 1)])


@contextlib.contextmanager
def _plain_fx_codegen() -> Iterator[None]:
    """Build e3nn modules as plain torch.fx code (e3nn's "eager" jit mode) instead of TorchScript or inductor.

    TorchScript's profiling executor re-optimizes a module after its first calls, which changes the rounding of
    double-backward results (Born charges) from call to call; plain fx code gives bit-reproducible outputs, so a
    saved and reloaded model answers exactly as the original. e3nn's own default is "eager" only from torch 2.10
    on; the mode is set here whatever the default, and the defaults are restored afterwards.
    """
    saved = e3nn.get_optimization_defaults()
    e3nn.set_optimization_defaults(jit_mode="eager")
    try:
        yield
    finally:
        e3nn.set_optimization_defaults(jit_mode=saved["jit_mode"])


class BesselBasis(torch.nn.Module):
    """sqrt(2/rc) sin(nπr/rc)/r, n = 1..num_radial, times a polynomial envelope that goes smoothly to 0 at rc."""

    frequencies: torch.Tensor  # a buffer

    def __init__(self, cutoff: float, num_radial: int, polynomial_degree: int) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(polynomial_degree)
        self.register_buffer("frequencies", math.pi / self.cutoff * torch.arange(1, num_radial + 1,
                                                                                  dtype=torch.get_default_dtype()))

    def envelope(self, r: torch.Tensor) -> torch.Tensor:
        x = r / self.cutoff
        p = self.p
        value = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x ** p + p * (p + 2.0) * x ** (p + 1.0)
                 - p * (p + 1.0) / 2.0 * x ** (p + 2.0))
        return value * (x < 1.0)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        bessel = math.sqrt(2.0 / self.cutoff) * torch.sin(self.frequencies * r) / r
        return bessel * self.envelope(r)

    def with_slope(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis, d basis / dr), both (E, num_radial)."""
        r = r.unsqueeze(-1)
        kr = self.frequencies * r
        bessel = math.sqrt(2.0 / self.cutoff) * torch.sin(kr) / r
        bessel_slope = math.sqrt(2.0 / self.cutoff) * (self.frequencies * torch.cos(kr) - torch.sin(kr) / r) / r
        x, p = r / self.cutoff, self.p
        envelope_slope = (p * (p + 1.0) * (p + 2.0) / 2.0 * x ** (p - 1.0) * (2.0 * x - 1.0 - x * x)
                          / self.cutoff * (x < 1.0))
        envelope = self.envelope(r)
        return bessel * envelope, bessel_slope * envelope + bessel * envelope_slope


class RadialNetwork(torch.nn.Module):
    """The radial MLP: hidden layers h ← φ(h W / √h_in) with φ = silu scaled to unit second moment on a standard
    normal input (e3nn.math.normalize2mom), then a linear output h W / √h_in. This is e3nn's FullyConnectedNet
    arithmetic (unit variances, no output activation) with its parameter names (`layer0.weight`, ...), which model
    files hold; it is written out here because the slope pass below needs each layer's matrix and activation."""

    def __init__(self, widths: Sequence[int], activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.activation = normalize2mom(activation)
        self.num_layers = len(widths) - 1
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(width_in, width_out))
            setattr(self, f"layer{index}", layer)

    def matrices(self) -> list[torch.Tensor]:
        """Each layer's weight divided by √(its input width), first to last."""
        weights = [getattr(self, f"layer{index}").weight for index in range(self.num_layers)]
        return [weight / weight.shape[0] ** 0.5 for weight in weights]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's output."""
        for matrix in self.matrices()[:-1]:
            x = self.activation(x @ matrix)
        return x

    def hidden_with_slope(self, x: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden output, its derivative along a direction of the input given by `slope`), forward mode."""
        for matrix in self.matrices()[:-1]:
            with forward_ad.dual_level():
                x, slope = forward_ad.unpack_dual(self.activation(forward_ad.make_dual(x @ matrix, slope @ matrix)))
        return x, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x) @ self.matrices()[-1]


def field_scale_from_fields(efields: npt.ArrayLike, default: float = DEFAULT_FIELD_SCALE) -> float:
    """The reference field (V/Å) for a set of frame fields (M, 3): the RMS magnitude of the non-zero ones divided
    by LABELLED_FIELD_IN_SCALES, so that the labelled fields sit at |ε̃| ≈ 0.1 whatever their size in V/Å;
    `default` when every field is zero."""
    efields = torch.as_tensor(np.asarray(efields, dtype=float)).reshape(-1, 3)
    magnitudes = torch.linalg.norm(efields, dim=-1)
    finite = magnitudes[magnitudes > 0]
    return float(finite.square().mean().sqrt()) / LABELLED_FIELD_IN_SCALES if len(finite) else float(default)


class FieldProduct(torch.nn.Module):
    """Per atom, the 'uvu' product of the node features with the field's harmonics, one learned weight per path
    and channel shared by all atoms: e3nn's TensorProduct arithmetic (its "component" normalization, path weight
    sqrt(2 l_out + 1)), with the Wigner symbols kept in float64 and cast per call as in EdgeMessages, so that a
    model built in float32 and moved to float64 is equivariant to float64 precision (e3nn's module stores them
    as buffers rounded at construction)."""

    def __init__(self, irreps_in: o3.Irreps | str, irreps_field: o3.Irreps | str, allowed: set[o3.Irrep]) -> None:
        super().__init__()
        self.irreps_in, self.irreps_field = o3.Irreps(irreps_in), o3.Irreps(irreps_field)
        self.irreps_out, instructions = uvu_paths(self.irreps_in, self.irreps_field, allowed)
        self.paths = [(i_in, i_field) for i_in, i_field, _, _, _ in instructions]
        self.multiplicity = self.irreps_in[0].mul
        self.weight = torch.nn.Parameter(torch.randn(len(self.paths), self.multiplicity))
        self._exact_couplings = [
            o3.wigner_3j(self.irreps_in[i_in].ir.l, self.irreps_field[i_field].ir.l, ir_out.l, dtype=torch.float64)
            * math.sqrt(ir_out.dim) for (i_in, i_field), (_, ir_out) in zip(self.paths, self.irreps_out)]
        self._cast_couplings: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}

    def forward(self, features: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """features (N, irreps_in.dim), field (N, irreps_field.dim) -> (N, irreps_out.dim)."""
        key = (features.dtype, features.device)
        if key not in self._cast_couplings:
            self._cast_couplings[key] = [c.to(dtype=features.dtype, device=features.device)
                                         for c in self._exact_couplings]
        num_atoms, u = features.shape[0], self.multiplicity
        blocks = [features[:, block].reshape(num_atoms, u, ir.dim)
                  for (_, ir), block in zip(self.irreps_in, self.irreps_in.slices())]
        harmonics = [field[:, block] for block in self.irreps_field.slices()]
        outputs = []
        for (i_in, i_field), coupling, weight in zip(self.paths, self._cast_couplings[key], self.weight):
            coupled = torch.einsum("nj,ijk->nik", harmonics[i_field], coupling)        # (N, d_in, d_out)
            product = torch.einsum("nui,nik->nuk", blocks[i_in], coupled) * weight.unsqueeze(-1)
            outputs.append(product.reshape(num_atoms, -1))
        return torch.cat(outputs, dim=-1)


def _reachable(irreps_hidden: o3.Irreps, irreps_in: o3.Irreps, irreps_other: o3.Irreps) -> o3.Irreps:
    """The blocks of `irreps_hidden` whose irrep appears in in ⊗ other or in `irreps_in` itself."""
    produced = {ir_out for _, ir_in in irreps_in for _, ir_other in irreps_other for ir_out in ir_in * ir_other}
    produced |= {ir for _, ir in irreps_in}
    return o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir in produced])


class InteractionBlock(torch.nn.Module):
    """One message-passing layer with field coupling; `irreps_out` = the hidden irreps."""

    def __init__(self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_sh: o3.Irreps, irreps_field: o3.Irreps,
                 num_radial: int, radial_hidden: int, couple_field: bool, field_projected_messages: bool = False,
                 exact_field_product: bool = True) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        # Only the hidden irreps this layer can produce are kept: the messages and the self-connection reach
        # in ⊗ sh and in (`irreps_mixed`), the field product mixed ⊗ field. An irrep nothing produces would be a
        # constant zero whose weights never change E (e.g. 2e features in a first layer with lmax 1).
        irreps_hidden = o3.Irreps(irreps_hidden)
        irreps_mixed = _reachable(irreps_hidden, self.irreps_in, irreps_sh)
        self.irreps_out = (_reachable(irreps_hidden, irreps_mixed, irreps_field) if couple_field
                           else irreps_mixed)
        allowed = {ir for _, ir in irreps_mixed}

        self.linear_up = o3.Linear(self.irreps_in, self.irreps_in)
        self.edge_messages = EdgeMessages(self.irreps_in, irreps_sh, allowed)
        # (readout layer without 2e features) one more radial path: scalar messages weighted by the rank-2
        # projection (r̂·ε̃)² - |ε̃|²/3 ∝ Y²(r̂)·Y²(ε̃), written with the l = 1 harmonics so that any lmax has it
        self.field_projected_messages = bool(field_projected_messages)
        self._y1_slice = o3.Irreps(irreps_sh).slices()[1]
        radial_out = self.edge_messages.weight_numel + self.edge_messages.multiplicity * self.field_projected_messages
        self.radial = RadialNetwork([num_radial, radial_hidden, radial_out], torch.nn.functional.silu)
        self.linear_message = o3.Linear(self.edge_messages.irreps_out, irreps_mixed)

        scalars = o3.Irreps([(mul, ir) for mul, ir in self.irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in self.irreps_out if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        self.gate = Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid], gated)

        self.couple_field = bool(couple_field)
        allowed_out = {ir for _, ir in self.irreps_out}
        if self.couple_field and exact_field_product:
            self.field_tp = FieldProduct(irreps_mixed, irreps_field, allowed_out)
            self.linear_field = o3.Linear(self.field_tp.irreps_out, self.gate.irreps_in)
        elif self.couple_field:      # field_readout 0: e3nn's TensorProduct, whose parameter names its files hold
            irreps_field_out, field_instructions = uvu_paths(irreps_mixed, irreps_field, allowed_out)
            self.field_tp = o3.TensorProduct(irreps_mixed, irreps_field, irreps_field_out,
                                                  field_instructions, shared_weights=True, internal_weights=True)
            self.linear_field = o3.Linear(irreps_field_out, self.gate.irreps_in)
        self.linear_mix = o3.Linear(irreps_mixed, self.gate.irreps_in)
        self.self_connection = o3.Linear(self.irreps_in, irreps_mixed)
        self.residual = self.irreps_in == self.irreps_out

    def _radial_output_columns(self) -> tuple[torch.Tensor, ...]:
        """The last radial layer's matrix, split into one block of columns per edge-message path."""
        return self.radial.matrices()[-1].split(self.edge_messages.multiplicity, dim=1)

    def path_weights(self, edge_radial: torch.Tensor) -> list[torch.Tensor]:
        """The radial network's output, one (E, u) tensor per edge-message path.

        Each path's weights are a product with its own columns of the last layer, so no edge tensor is sliced
        (a slice's backward fills an edge-sized tensor with zeros, on every Born-charge pass).
        """
        hidden = self.radial.hidden(edge_radial)
        return [hidden @ columns for columns in self._radial_output_columns()]

    def path_weights_with_slope(self, edge_radial: torch.Tensor, edge_radial_slope: torch.Tensor
                                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(path_weights, their derivatives along the edge length): two lists of (E, u), one tensor per path."""
        hidden, slope = self.radial.hidden_with_slope(edge_radial, edge_radial_slope)
        columns = self._radial_output_columns()
        return [hidden @ block for block in columns], [slope @ block for block in columns]

    def forward(self, node_features: torch.Tensor, node_field: torch.Tensor, edge_sh: torch.Tensor,
                path_weights: Sequence[torch.Tensor], edge_index: torch.Tensor, avg_num_neighbors: float
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The layer's output features; with `field_projected_messages` also (N, u) invariants
        q_i = Σ_j w_ij s_j ((r̂_ij·ε̃)² - |ε̃|²/3) / avg_num_neighbors, s_j the sender's scalar features.
        `node_field` (N, 9): |ε̃|², Y¹(ε̃), Y²(ε̃) of each atom's graph."""
        receivers, senders = edge_index[0], edge_index[1]
        up = self.linear_up(node_features)
        num_paths = len(self.edge_messages.paths)
        aggregated = self.edge_messages(up, edge_sh, path_weights[:num_paths], senders, receivers)
        # the atom's own features join the neighbourhood before the field coupling, so that an atom without
        # neighbours still responds to the field (|ε|² gives it a polarizability)
        mixed = self.linear_message(aggregated / avg_num_neighbors) + self.self_connection(node_features)
        pre_gate = self.linear_mix(mixed)
        if self.couple_field:
            pre_gate = pre_gate + self.linear_field(self.field_tp(mixed, node_field))
        out = self.gate(pre_gate)
        out = out + node_features if self.residual else out
        if not self.field_projected_messages:
            return out
        # the rank-2 shape of the neighbourhood met by the field's on each edge (field harmonics beside the edge
        # harmonics, as in Allegro-pol): a rank-2 node feature contracted with Y²(ε̃), at the cost of a scalar path
        u = self.edge_messages.multiplicity
        edge_field = node_field[receivers, :4]                                     # |ε̃|², Y¹(ε̃) = √3 ε̃ (e3nn order)
        along = (edge_sh[:, self._y1_slice] * edge_field[:, 1:]).sum(-1, keepdim=True)     # Y¹(r̂)·Y¹(ε̃) = 3 r̂·ε̃
        projection = along * along / 9.0 - edge_field[:, :1] / 3.0                          # (E, 1)
        messages = path_weights[num_paths] * projection * gather_senders(up[:, :u], senders)
        return out, sum_over_receivers(messages, receivers, up.shape[0]) / avg_num_neighbors


class PolModel(torch.nn.Module):
    """E(R, cell, ε): the electric enthalpy of each graph in a batch (keys in polmodel/data/keys.py).

    `PolModel(species, cutoff, **architecture)`; the defaults are in DEFAULT_ARCHITECTURE.
    `.architecture` holds the keyword arguments (JSON-able), so `PolModel(m.species, m.cutoff, **m.architecture)`
    rebuilds the model; energy scale and reference energies are buffers and travel with the state dict.
    `.hyperparameters` is the name of `.architecture` in earlier releases, kept as an alias.
    """

    # set by _build (declared here for type checkers)
    species: list[str]
    cutoff: float
    architecture: dict[str, float]
    irreps_sh: o3.Irreps
    irreps_field: o3.Irreps
    embedding: o3.Linear
    radial_basis: BesselBasis
    field_readout: bool
    layers: torch.nn.ModuleList
    readout_in: o3.Linear
    readout_out: o3.Linear
    energy_scale: torch.Tensor
    reference_energies: torch.Tensor
    field_scale: torch.Tensor
    # the training settings a model file stores (polmodel.training sets them; absent on a model built here)
    training_options: dict[str, Any]

    def __init__(self, species: Sequence[str], cutoff: float, **architecture: float | None) -> None:
        super().__init__()
        with _plain_fx_codegen():
            self._build(species, cutoff, architecture)

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The name of `architecture` in earlier releases, kept as an alias (the same dict)."""
        return self.architecture

    def _build(self, species: Sequence[str], cutoff: float, architecture: Mapping[str, float | None]) -> None:
        unknown = set(architecture) - set(DEFAULT_ARCHITECTURE)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(DEFAULT_ARCHITECTURE)}")
        species = [str(symbol) for symbol in species]
        if not species or len(set(species)) != len(species):
            raise ValueError(f"species must be a non-empty list of distinct symbols, got {species}")
        if not float(cutoff) > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        hp: dict[str, Any] = {**DEFAULT_ARCHITECTURE, **architecture}
        if hp["avg_num_neighbors"] is None:
            hp["avg_num_neighbors"] = 4.0 / 3.0 * math.pi * float(cutoff) ** 3 * _TYPICAL_NUMBER_DENSITY
        hp = {name: (float(value) if name == "avg_num_neighbors" else int(value)) for name, value in hp.items()}
        self.species = species
        self.cutoff = float(cutoff)
        self.architecture = hp

        f, lmax = hp["num_features"], hp["lmax"]
        if lmax < 1 or hp["feature_lmax"] < 1:
            raise ValueError("lmax and feature_lmax must be at least 1 (the field is a vector)")
        too_small = [name for name in ("num_features", "num_layers", "field_layers", "num_radial", "radial_hidden",
                                       "readout_hidden", "polynomial_degree") if hp[name] < 1]
        if too_small or not hp["avg_num_neighbors"] > 0:
            raise ValueError(f"hyperparameters {too_small or ['avg_num_neighbors']} must be positive")
        if hp["field_layers"] > hp["num_layers"]:
            raise ValueError(f"field_layers ({hp['field_layers']}) cannot exceed num_layers ({hp['num_layers']})")
        if hp["field_readout"] not in (0, 1):
            raise ValueError(f"field_readout must be 0 or 1, got {hp['field_readout']}")
        if hp["field_readout"] and hp["feature_lmax"] > 2:
            raise ValueError(f"feature_lmax {hp['feature_lmax']} > 2: the field's harmonics (l ≤ 2) could not reach "
                             f"the last layer's l > 2 features")
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        # |ε|² (0e), Y¹(ε) (1o), Y²(ε) (2e): polynomials of degree 2, 1, 2 in the field
        self.irreps_field = o3.Irreps("0e + 1o + 2e")
        irreps_hidden = _natural_irreps(f, hp["feature_lmax"])

        self.embedding = o3.Linear(o3.Irreps(f"{len(species)}x0e"), o3.Irreps(f"{f}x0e"))
        self.radial_basis = BesselBasis(cutoff, hp["num_radial"], hp["polynomial_degree"])
        layers = []
        irreps_in = o3.Irreps(f"{f}x0e")
        first_field_layer = hp["num_layers"] - hp["field_layers"]
        # with the field readout, a last layer without 2e features gets the field-projected scalar messages instead
        self.field_readout = bool(hp["field_readout"])
        projected = self.field_readout and hp["feature_lmax"] < 2
        for index in range(hp["num_layers"]):
            layers.append(InteractionBlock(irreps_in, irreps_hidden, self.irreps_sh, self.irreps_field,
                                           hp["num_radial"], hp["radial_hidden"],
                                           couple_field=index >= first_field_layer,
                                           field_projected_messages=projected and index == hp["num_layers"] - 1,
                                           exact_field_product=self.field_readout))
            irreps_in = layers[-1].irreps_out
        self.layers = torch.nn.ModuleList(layers)
        # the readout's invariants: the scalars, and with the field readout each l = 1, 2 block contracted with
        # Y^l(ε̃) (one invariant per channel; the field-projected messages stand in for an absent 2e block)
        num_invariants = sum(mul for mul, _ in irreps_in) + (f if projected else 0)
        readout_irreps = o3.Irreps(f"{num_invariants}x0e") if self.field_readout else irreps_in
        self.readout_in = o3.Linear(readout_irreps, o3.Irreps(f"{hp['readout_hidden']}x0e"))
        self.readout_out = o3.Linear(o3.Irreps(f"{hp['readout_hidden']}x0e"), o3.Irreps("0e"))

        self.register_buffer("energy_scale", torch.ones((), dtype=torch.get_default_dtype()))
        self.register_buffer("reference_energies", torch.zeros(len(species), dtype=torch.get_default_dtype()))
        self.register_buffer("field_scale", torch.ones((), dtype=torch.get_default_dtype()))

    # --- scales -------------------------------------------------------------------------------------------------
    def set_energy_scale(self, scale: float) -> None:
        """Multiply the learned per-atom energy by `scale` (eV), e.g. the force RMS of the training set."""
        self.energy_scale.fill_(float(scale))

    def set_field_scale(self, value: float) -> None:
        """The reference field (V/Å) the network divides ε by, e.g. `field_scale_from_fields` of the training
        frames; inputs and outputs stay in V/Å."""
        if not float(value) > 0:
            raise ValueError(f"field_scale must be positive, got {value}")
        self.field_scale.fill_(float(value))

    def set_reference_energies(self, energies: Mapping[str, float]) -> None:
        """Per-species constant energies (dict symbol -> eV) added to each atom; species not given stay 0."""
        unknown = set(energies) - set(self.species)
        if unknown:
            raise ValueError(f"reference energies for species {sorted(unknown)} not in the model's {self.species}")
        values = torch.tensor([float(energies.get(symbol, 0.0)) for symbol in self.species])
        self.reference_energies.copy_(values.to(self.reference_energies))

    def set_avg_num_neighbors(self, value: float) -> None:
        """The constant that normalizes the neighbour sum (e.g. polmodel.data.graphs.average_num_neighbors(graphs))."""
        if not float(value) > 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {value}")
        self.architecture["avg_num_neighbors"] = float(value)

    # --- energy -------------------------------------------------------------------------------------------------
    def edge_vectors(self, data: Graph) -> torch.Tensor:
        """r_ij = r_j - r_i + S @ cell[batch[i]] (differentiable w.r.t. positions and cell)."""
        positions, cell = data[keys.POSITIONS], data[keys.CELL]
        receivers, senders = data[keys.EDGE_INDEX][0], data[keys.EDGE_INDEX][1]
        edge_cell = cell[data[keys.BATCH][receivers]]
        shift = torch.einsum("ek,ekl->el", data[keys.EDGE_CELL_SHIFT], edge_cell)
        return positions[senders] - positions[receivers] + shift

    def edge_harmonics(self, vectors: torch.Tensor) -> torch.Tensor:
        """(E, irreps_sh.dim): spherical harmonics of the edge directions ("component" normalization)."""
        return o3.spherical_harmonics(self.irreps_sh, vectors, normalize=True, normalization="component")

    def radial_weights(self, lengths: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per layer, the radial weights of its edge-message paths: a list (layers) of lists (paths) of (E, u)."""
        edge_radial = self.radial_basis(lengths)
        return [cast(InteractionBlock, layer).path_weights(edge_radial) for layer in self.layers]

    def forward(self, data: Graph) -> Graph:
        """Return a shallow copy of `data` with ATOMIC_ENERGY (N,) and ENERGY (G,) added."""
        vectors = self.edge_vectors(data)
        lengths = torch.linalg.norm(vectors, dim=-1)
        return self.energy_from_edges(data, self.edge_harmonics(vectors), self.radial_weights(lengths))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model file (polmodel/nn/model_file.py format, with its content hash)."""
        write_model_file("model", [self], path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PolModel:
        """Read a single-model file; `ModelFileError` naming the file if it is corrupt, truncated, not a polmodel
        file or an ensemble file."""
        path = os.fspath(path)
        payload = read_payload(path)
        members = members_from_payload(path, payload)
        if payload["kind"] == "ensemble":
            raise ModelFileError(f"{path}: holds an ensemble of {len(members)} models, not a single model; "
                                 f"read it with PolEnsemble.load")
        return members[0]

    def _field_invariants(self, last_layer_output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                          node_field: torch.Tensor) -> torch.Tensor:
        """(N, 3u): the scalar features, the vector features dotted with Y¹(ε̃) and the rank-2 ones (the 2e block,
        or the field-projected messages without one) with Y²(ε̃), per channel. Every l > 0 output of the last
        layer reaches the energy this way, and the rank-2 term lets α be anisotropic at a centrosymmetric site."""
        features, projected = (last_layer_output if isinstance(last_layer_output, tuple)
                               else (last_layer_output, None))
        num_atoms = features.shape[0]
        harmonics = {1: node_field[:, 1:4], 2: node_field[:, 4:9]}
        invariants = []
        irreps_out = cast(InteractionBlock, self.layers[-1]).irreps_out
        for (mul, ir), block in zip(irreps_out, irreps_out.slices()):
            x = features[:, block]
            if ir.l > 0:
                x = (x.reshape(num_atoms, mul, ir.dim) * harmonics[ir.l].unsqueeze(1)).sum(-1)
            invariants.append(x)
        if projected is not None:
            invariants.append(projected)
        return torch.cat(invariants, dim=-1)

    def energy_from_edges(self, data: Graph, edge_sh: torch.Tensor,
                          path_weights: Sequence[Sequence[torch.Tensor]]) -> Graph:
        """The energy given the edges' harmonics and radial weights (`edge_harmonics`, `radial_weights`): the
        positions enter only through these, which polmodel/nn/edge_inputs.py uses for cheap Born charges."""
        batch = data[keys.BATCH]
        num_graphs = data[keys.CELL].shape[0]
        species_index = data[keys.SPECIES_INDEX]

        efield = data[keys.EFIELD] / self.field_scale
        field_features = torch.cat([
            (efield * efield).sum(-1, keepdim=True),
            o3.spherical_harmonics([1, 2], efield, normalize=False, normalization="component"),
        ], dim=-1)
        node_field = field_features[batch]

        one_hot = torch.nn.functional.one_hot(species_index, len(self.species)).to(edge_sh.dtype)
        features = self.embedding(one_hot)
        avg = self.architecture["avg_num_neighbors"]
        for layer, layer_weights in zip(self.layers, path_weights):
            features = layer(features, node_field, edge_sh, layer_weights, data[keys.EDGE_INDEX], avg)

        if self.field_readout:
            features = self._field_invariants(features, node_field)
        hidden = torch.nn.functional.silu(self.readout_in(features))
        atomic_energy = (self.energy_scale * self.readout_out(hidden).squeeze(-1)
                         + self.reference_energies[species_index])
        energy = torch.zeros(num_graphs, dtype=atomic_energy.dtype, device=atomic_energy.device)
        energy = energy.index_add(0, batch, atomic_energy)
        out = dict(data)
        out[keys.ATOMIC_ENERGY] = atomic_energy
        out[keys.ENERGY] = energy
        return out


# --- from a model file (polmodel/nn/model_file.py) --------------------------------------------------------------
def _build_member(path: str, species: Sequence[str], cutoff: float, architecture: Mapping[str, Any],
                  state_dict: Mapping[str, torch.Tensor]) -> PolModel:
    try:
        model = PolModel(species, cutoff, **architecture)
        dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
        model.load_state_dict(state_dict, strict=True)
    except Exception as error:
        raise ModelFileError(f"{path}: the stored weights do not fit the stored architecture ({error})") from error
    return model


def members_from_payload(path: str, payload: Mapping[str, Any]) -> list[PolModel]:
    """The PolModels of a model file read by `read_payload` (one for kind "model"), each with its training settings
    (for a file saved without a training domain, with the one recorded beside it: `upgrade_payload`);
    ModelFileError if the weights do not fit the architecture."""
    members = []
    for architecture, training, state_dict in zip(payload["architecture"], payload["training"],
                                                  payload["state_dicts"]):
        member = _build_member(path, payload["species"], payload["cutoff"], architecture, state_dict)
        if training is not None:
            member.training_options = training
        members.append(member)
    return members
