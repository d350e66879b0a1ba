"""The field-aware equivariant energy model E(R, cell, ε).

Message passing in the spirit of NequIP/MACE, kept small: species one-hot → scalar features; per edge, spherical
harmonics of r_ij times a learned radial function (Bessel basis × polynomial cutoff envelope → MLP) weight a
"uvu" tensor product with the sender's features (polmodel/nn/edge_messages.py: e3nn's arithmetic, laid out for cheap
second derivatives); messages are summed over neighbours, normalized by a constant average neighbour count, and
mixed by linears and a gate with a residual connection. Node features are 0e + 1o (feature_lmax 1) by default,
with edge harmonics up to l = 2; feature_lmax 2 adds 2e node features at about twice the cost (E+F+P on a
135-atom cell, one thread: 25 vs 55 ms).

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
Born charges and the contractions with Y²(ε̃) an anisotropic α. Files written before (field_readout 0, no
field_scale) load with their old layout and scale 1 V/Å (`_build_member` at the end of this file), bit-identically.
The gate and the readout's MLP make the energy nonlinear in ε. Because the field is always coupled (also at
ε = 0), the cost of E + F + P at finite field is the cost of E + F at zero field.
Why the last layer by default: every receptive field is the same (num_layers cutoffs) wherever the field is
coupled, but a field coupled before a layer's edge messages makes each Born-charge pass differentiate those
messages' backward as well. Measured (1080-atom BaTiO3, one thread, Born charges over E+F+P): 2.69× with the
field in the last layer, 3.23× in both layers (compute_response). `field_layers=num_layers` couples it in
every layer.

Edge vectors are computed inside `forward` from POSITIONS, CELL and EDGE_CELL_SHIFT, so the energy is
differentiable w.r.t. positions, cell (strain) and field; see polmodel/nn/response.py for the derivatives. The
positions enter only through the edges' harmonics and radial weights (`energy_from_edges`), which
polmodel/nn/edge_inputs.py uses to make Born charges cheaper.
"""
import contextlib
import math
import os

import numpy as np
import torch
from torch.autograd import forward_ad

import e3nn
from e3nn import o3
from e3nn.math import normalize2mom
from e3nn.nn import Gate

from polmodel.data import keys
from polmodel.nn.edge_messages import EdgeMessages, gather_senders, sum_over_receivers, uvu_paths
from polmodel.nn.model_file import ModelFileError, attach_domain_record, read_payload, write_model_file

DEFAULT_HYPERPARAMETERS = {
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
                                 # weight reaches E); 0: the layout of files written before (field through the gate)
}
# The labelled fields sit at |ε̃| ≈ 0.1 field scales: the field's share of a solid's energy at the fields DFT is run
# at is a few per cent, and an untrained model's field terms are ~|ε̃| of its structural ones. Measured on the toy
# potential (tests/toy_potential.py): with the labelled fields at |ε̃| ≈ 1, force learning stalls for over 40 epochs;
# at 0.1 forces learn about as with the field in V/Å and the Born charges' error halves after 7 epochs (0.5: 6 epochs,
# forces ~5 epochs later). An untrained model's Z* is then ~1 % of the labels' (its forces ~1 % too: the untrained
# network is soft in R); an extra gain of 3–30 on the readout's ε̃·v terms made it O(1) but delayed force learning by
# 5–70 epochs, as large early field-term gradients fill Adam's second moments, while Z* halves within 4–5 of ~130
# epochs without it (tests/test_training.py::test_fitting_born_charges_starts_at_once).
LABELLED_FIELD_IN_SCALES = 0.1
# V/Å: the reference field when the training frames are all at zero field (their Z* and α come from ±ε runs at
# about 0.05 V/Å). A model built directly sees the field in V/Å (scale 1) until `set_field_scale`.
DEFAULT_FIELD_SCALE = 0.05 / LABELLED_FIELD_IN_SCALES
# Atoms per Å³ of a typical oxide; only used to guess avg_num_neighbors when none is given.
_TYPICAL_NUMBER_DENSITY = 0.07


def _natural_irreps(multiplicity, lmax):
    """multiplicity × (0e + 1o + 2e + ...): the parities a polar vector's spherical harmonics produce."""
    return o3.Irreps([(multiplicity, (l, (-1) ** l)) for l in range(lmax + 1)])


@contextlib.contextmanager
def _plain_fx_codegen():
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

    def __init__(self, cutoff, num_radial, polynomial_degree):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(polynomial_degree)
        self.register_buffer("frequencies", math.pi / self.cutoff * torch.arange(1, num_radial + 1,
                                                                                  dtype=torch.get_default_dtype()))

    def envelope(self, r):
        x = r / self.cutoff
        p = self.p
        value = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x ** p + p * (p + 2.0) * x ** (p + 1.0)
                 - p * (p + 1.0) / 2.0 * x ** (p + 2.0))
        return value * (x < 1.0)

    def forward(self, r):
        r = r.unsqueeze(-1)
        bessel = math.sqrt(2.0 / self.cutoff) * torch.sin(self.frequencies * r) / r
        return bessel * self.envelope(r)

    def with_slope(self, r):
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

    def __init__(self, widths, activation):
        super().__init__()
        self.activation = normalize2mom(activation)
        self.num_layers = len(widths) - 1
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(width_in, width_out))
            setattr(self, f"layer{index}", layer)

    def matrices(self):
        """Each layer's weight divided by √(its input width), first to last."""
        weights = [getattr(self, f"layer{index}").weight for index in range(self.num_layers)]
        return [weight / weight.shape[0] ** 0.5 for weight in weights]

    def hidden(self, x):
        """The last hidden layer's output."""
        for matrix in self.matrices()[:-1]:
            x = self.activation(x @ matrix)
        return x

    def hidden_with_slope(self, x, slope):
        """(last hidden output, its derivative along a direction of the input given by `slope`), forward mode."""
        for matrix in self.matrices()[:-1]:
            with forward_ad.dual_level():
                x, slope = forward_ad.unpack_dual(self.activation(forward_ad.make_dual(x @ matrix, slope @ matrix)))
        return x, slope

    def forward(self, x):
        return self.hidden(x) @ self.matrices()[-1]


def field_scale_from_fields(efields, default=DEFAULT_FIELD_SCALE):
    """The reference field (V/Å) for a set of frame fields (M, 3): the RMS magnitude of the non-zero ones divided
    by LABELLED_FIELD_IN_SCALES, so that the labelled fields sit at |ε̃| ≈ 0.1 whatever their size in V/Å;
    `default` when every field is zero."""
    efields = torch.as_tensor(np.asarray(efields, dtype=float)).reshape(-1, 3)
    magnitudes = torch.linalg.norm(efields, dim=-1)
    finite = magnitudes[magnitudes > 0]
    return float(finite.square().mean().sqrt()) / LABELLED_FIELD_IN_SCALES if len(finite) else float(default)


def _field_scale_of_files_before_it(module, state_dict, prefix, *args):
    """Models saved before the field scale existed saw the field in V/Å: a scale of 1 V/Å answers as they did
    (ε / 1 is exact, so their numbers are unchanged to the bit)."""
    if prefix + "field_scale" not in state_dict:
        state_dict[prefix + "field_scale"] = torch.ones_like(module.field_scale)


def _drop_e3nn_edge_product_constants(module, state_dict, prefix, *args):
    """Model files written before EdgeMessages replaced e3nn's TensorProduct hold that module's constants (an
    empty weight, an output mask, Wigner symbols) under `edge_tp.`; they carry no learned state."""
    for name in [name for name in state_dict if name.startswith(prefix + "edge_tp.")]:
        del state_dict[name]


class FieldProduct(torch.nn.Module):
    """Per atom, the 'uvu' product of the node features with the field's harmonics, one learned weight per path
    and channel shared by all atoms: e3nn's TensorProduct arithmetic (its "component" normalization, path weight
    sqrt(2 l_out + 1)), with the Wigner symbols kept in float64 and cast per call as in EdgeMessages, so that a
    model built in float32 and moved to float64 is equivariant to float64 precision (e3nn's module stores them
    as buffers rounded at construction)."""

    def __init__(self, irreps_in, irreps_field, allowed):
        super().__init__()
        self.irreps_in, self.irreps_field = o3.Irreps(irreps_in), o3.Irreps(irreps_field)
        self.irreps_out, instructions = uvu_paths(self.irreps_in, self.irreps_field, allowed)
        self.paths = [(i_in, i_field) for i_in, i_field, _, _, _ in instructions]
        self.multiplicity = self.irreps_in[0].mul
        self.weight = torch.nn.Parameter(torch.randn(len(self.paths), self.multiplicity))
        self._exact_couplings = [
            o3.wigner_3j(self.irreps_in[i_in].ir.l, self.irreps_field[i_field].ir.l, ir_out.l, dtype=torch.float64)
            * math.sqrt(ir_out.dim) for (i_in, i_field), (_, ir_out) in zip(self.paths, self.irreps_out)]
        self._cast_couplings = {}

    def forward(self, features, field):
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


def _reachable(irreps_hidden, irreps_in, irreps_other):
    """The blocks of `irreps_hidden` whose irrep appears in in ⊗ other or in `irreps_in` itself."""
    produced = {ir_out for _, ir_in in irreps_in for _, ir_other in irreps_other for ir_out in ir_in * ir_other}
    produced |= {ir for _, ir in irreps_in}
    return o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir in produced])


class InteractionBlock(torch.nn.Module):
    """One message-passing layer with field coupling; `irreps_out` = the hidden irreps."""

    def __init__(self, irreps_in, irreps_hidden, irreps_sh, irreps_field, num_radial, radial_hidden, couple_field,
                 field_projected_messages=False, exact_field_product=True):
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
        elif self.couple_field:      # the layout of files written before the field readout
            irreps_field_out, field_instructions = uvu_paths(irreps_mixed, irreps_field, allowed_out)
            self.field_tp = o3.TensorProduct(irreps_mixed, irreps_field, irreps_field_out,
                                                  field_instructions, shared_weights=True, internal_weights=True)
            self.linear_field = o3.Linear(irreps_field_out, self.gate.irreps_in)
        self.linear_mix = o3.Linear(irreps_mixed, self.gate.irreps_in)
        self.self_connection = o3.Linear(self.irreps_in, irreps_mixed)
        self.residual = self.irreps_in == self.irreps_out
        self.register_load_state_dict_pre_hook(_drop_e3nn_edge_product_constants)

    def _radial_output_columns(self):
        """The last radial layer's matrix, split into one block of columns per edge-message path."""
        return self.radial.matrices()[-1].split(self.edge_messages.multiplicity, dim=1)

    def path_weights(self, edge_radial):
        """The radial network's output, one (E, u) tensor per edge-message path.

        Each path's weights are a product with its own columns of the last layer, so no edge tensor is sliced
        (a slice's backward fills an edge-sized tensor with zeros, on every Born-charge pass).
        """
        hidden = self.radial.hidden(edge_radial)
        return [hidden @ columns for columns in self._radial_output_columns()]

    def path_weights_with_slope(self, edge_radial, edge_radial_slope):
        """(path_weights, their derivatives along the edge length): two lists of (E, u), one tensor per path."""
        hidden, slope = self.radial.hidden_with_slope(edge_radial, edge_radial_slope)
        columns = self._radial_output_columns()
        return [hidden @ block for block in columns], [slope @ block for block in columns]

    def forward(self, node_features, node_field, edge_sh, path_weights, edge_index, avg_num_neighbors):
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

    `PolModel(species, cutoff, **hyperparameters)`; the defaults are in DEFAULT_HYPERPARAMETERS.
    `.hyperparameters` holds the keyword arguments (JSON-able), so `PolModel(m.species, m.cutoff,
    **m.hyperparameters)` rebuilds the architecture; energy scale and reference energies are buffers and travel
    with the state dict.
    """

    def __init__(self, species, cutoff, **hyperparameters):
        super().__init__()
        with _plain_fx_codegen():
            self._build(species, cutoff, hyperparameters)

    def _build(self, species, cutoff, hyperparameters):
        unknown = set(hyperparameters) - set(DEFAULT_HYPERPARAMETERS)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(DEFAULT_HYPERPARAMETERS)}")
        species = [str(symbol) for symbol in species]
        if not species or len(set(species)) != len(species):
            raise ValueError(f"species must be a non-empty list of distinct symbols, got {species}")
        if not float(cutoff) > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        hp = {**DEFAULT_HYPERPARAMETERS, **hyperparameters}
        if hp["avg_num_neighbors"] is None:
            hp["avg_num_neighbors"] = 4.0 / 3.0 * math.pi * float(cutoff) ** 3 * _TYPICAL_NUMBER_DENSITY
        hp = {name: (float(value) if name == "avg_num_neighbors" else int(value)) for name, value in hp.items()}
        self.species = species
        self.cutoff = float(cutoff)
        self.hyperparameters = hp

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
        self.register_load_state_dict_pre_hook(_field_scale_of_files_before_it)

    # --- scales -------------------------------------------------------------------------------------------------
    def set_energy_scale(self, scale):
        """Multiply the learned per-atom energy by `scale` (eV), e.g. the force RMS of the training set."""
        self.energy_scale.fill_(float(scale))

    def set_field_scale(self, value):
        """The reference field (V/Å) the network divides ε by, e.g. `field_scale_from_fields` of the training
        frames; inputs and outputs stay in V/Å."""
        if not float(value) > 0:
            raise ValueError(f"field_scale must be positive, got {value}")
        self.field_scale.fill_(float(value))

    def set_reference_energies(self, energies):
        """Per-species constant energies (dict symbol -> eV) added to each atom; species not given stay 0."""
        unknown = set(energies) - set(self.species)
        if unknown:
            raise ValueError(f"reference energies for species {sorted(unknown)} not in the model's {self.species}")
        values = torch.tensor([float(energies.get(symbol, 0.0)) for symbol in self.species])
        self.reference_energies.copy_(values.to(self.reference_energies))

    def set_avg_num_neighbors(self, value):
        """The constant that normalizes the neighbour sum (e.g. polmodel.data.graphs.average_num_neighbors(graphs))."""
        if not float(value) > 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {value}")
        self.hyperparameters["avg_num_neighbors"] = float(value)

    # --- energy -------------------------------------------------------------------------------------------------
    def edge_vectors(self, data):
        """r_ij = r_j - r_i + S @ cell[batch[i]] (differentiable w.r.t. positions and cell)."""
        positions, cell = data[keys.POSITIONS], data[keys.CELL]
        receivers, senders = data[keys.EDGE_INDEX][0], data[keys.EDGE_INDEX][1]
        edge_cell = cell[data[keys.BATCH][receivers]]
        shift = torch.einsum("ek,ekl->el", data[keys.EDGE_CELL_SHIFT], edge_cell)
        return positions[senders] - positions[receivers] + shift

    def edge_harmonics(self, vectors):
        """(E, irreps_sh.dim): spherical harmonics of the edge directions ("component" normalization)."""
        return o3.spherical_harmonics(self.irreps_sh, vectors, normalize=True, normalization="component")

    def radial_weights(self, lengths):
        """Per layer, the radial weights of its edge-message paths: a list (layers) of lists (paths) of (E, u)."""
        edge_radial = self.radial_basis(lengths)
        return [layer.path_weights(edge_radial) for layer in self.layers]

    def forward(self, data):
        """Return a shallow copy of `data` with ATOMIC_ENERGY (N,) and ENERGY (G,) added."""
        vectors = self.edge_vectors(data)
        lengths = torch.linalg.norm(vectors, dim=-1)
        return self.energy_from_edges(data, self.edge_harmonics(vectors), self.radial_weights(lengths))

    def save(self, path):
        """Write the model file (polmodel/nn/model_file.py format, with its content hash)."""
        write_model_file("model", [self], path)

    @classmethod
    def load(cls, path):
        """Read a single-model file; `ModelFileError` naming the file if it is corrupt, truncated, not a polmodel
        file or an ensemble file."""
        path = os.fspath(path)
        payload = read_payload(path)
        members = members_from_payload(path, payload)
        if payload["kind"] == "ensemble":
            raise ModelFileError(f"{path}: holds an ensemble of {len(members)} models, not a single model; "
                                 f"read it with PolEnsemble.load")
        return members[0]

    def _field_invariants(self, last_layer_output, node_field):
        """(N, 3u): the scalar features, the vector features dotted with Y¹(ε̃) and the rank-2 ones (the 2e block,
        or the field-projected messages without one) with Y²(ε̃), per channel. Every l > 0 output of the last
        layer reaches the energy this way, and the rank-2 term lets α be anisotropic at a centrosymmetric site."""
        features, projected = (last_layer_output if isinstance(last_layer_output, tuple)
                               else (last_layer_output, None))
        num_atoms = features.shape[0]
        harmonics = {1: node_field[:, 1:4], 2: node_field[:, 4:9]}
        invariants = []
        for (mul, ir), block in zip(self.layers[-1].irreps_out, self.layers[-1].irreps_out.slices()):
            x = features[:, block]
            if ir.l > 0:
                x = (x.reshape(num_atoms, mul, ir.dim) * harmonics[ir.l].unsqueeze(1)).sum(-1)
            invariants.append(x)
        if projected is not None:
            invariants.append(projected)
        return torch.cat(invariants, dim=-1)

    def energy_from_edges(self, data, edge_sh, path_weights):
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
        avg = self.hyperparameters["avg_num_neighbors"]
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
def _build_member(path, species, cutoff, hyperparameters, state_dict):
    # files written before the field_layers hyperparameter existed couple the field in every layer
    # and files written before field_readout existed couple the field through the gate only (field_scale: above)
    hyperparameters = {"field_layers": hyperparameters.get("num_layers", DEFAULT_HYPERPARAMETERS["num_layers"]),
                       "field_readout": 0, **hyperparameters}
    try:
        model = PolModel(species, cutoff, **hyperparameters)
        dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
        model.load_state_dict(state_dict, strict=True)
    except Exception as error:
        raise ModelFileError(f"{path}: the stored weights do not fit the stored architecture ({error})") from error
    return model


def members_from_payload(path, payload):
    """The PolModels of a model file read by `read_payload` (one for kind "model"), each with its training settings
    and, where it was saved without one, the training domain recorded beside the file; ModelFileError if the
    weights do not fit the architecture."""
    members = []
    for architecture, training, state_dict in zip(payload["architecture"], payload["training"],
                                                  payload["state_dicts"]):
        member = _build_member(path, payload["species"], payload["cutoff"], architecture, state_dict)
        if training is not None:
            member.training_options = training
        members.append(member)
    attach_domain_record(path, members)
    return members
