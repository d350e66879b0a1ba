"""ASE calculator for a `PolModel` or `PolEnsemble` at a homogeneous electric field.

The energy is the electric enthalpy E(R, h, ε) (it includes -ΩP·ε), so under a field forces and stress are its
derivatives at fixed field and MD conserves enthalpy + kinetic energy. Energy, forces, stress, dipole and
polarization come from one backward pass and are always computed together; Born charges and polarizability
need second derivatives and are computed only when asked for (`calculate(properties=[...])` or the getters),
so `get_forces` never pays for them.
"""
from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from polmodel.data import keys
from polmodel.data.domain import MIN_INTERATOMIC_DISTANCE, model_domain, outside_domain
from polmodel.data.graphs import atoms_to_graph, species_indices
from polmodel.data.neighbors import neighbor_list
from polmodel.dynamics.fields import validate_field_vector
from polmodel.nn.chunked import chunked_response, default_memory_limit_gb, plan_for_cell
from polmodel.nn.response import FIELD_COUPLINGS, compute_response, first_order_field_response
from polmodel.runtime.allocator import keep_heap_if_requested

if TYPE_CHECKING:
    import numpy.typing as npt
    from numpy.typing import NDArray

    from polmodel.data.graphs import Graph
    from polmodel.nn.ensemble import PolEnsemble

_BASE_PROPERTIES = ["energy", "free_energy", "forces", "stress", "dipole", "polarization"]
_SECOND_ORDER = {"born_effective_charges": "born_charges", "polarizability": "polarizability",
                 "dielectric_tensor": "polarizability"}
_ENSEMBLE_SPREAD = ["energy_std", "forces_std", "dipole_std", "polarization_std", "born_effective_charges_std",
                    "polarizability_std"]
# response-dict key -> ASE property name (per graph quantities lose their leading batch axis)
_PER_GRAPH = {keys.ENERGY: "energy", keys.DIPOLE: "dipole", keys.POLARIZATION: "polarization",
              keys.POLARIZABILITY: "polarizability", keys.DIELECTRIC: "dielectric_tensor"}
_PER_ATOM = {keys.FORCES: "forces", keys.BORN_CHARGES: "born_effective_charges"}


# what ASE's Calculator.__init__ itself takes; anything else would be kept silently as a parameter
_ASE_CONSTRUCTOR_ARGUMENTS = {"restart", "ignore_bad_restart_file", "label", "atoms", "directory"}


class OverlappingAtomsError(ValueError):
    """Two atoms closer than the calculator's `min_distance`."""


class OutsideDomainWarning(UserWarning):
    """The structure or field lies outside what the model was trained on (polmodel/data/domain.py)."""


class OutsideDomainError(ValueError):
    """As OutsideDomainWarning, from a calculator made with outside_domain="refuse"."""


_OUTSIDE_DOMAIN_ACTIONS = ("warn", "refuse", "ignore")


def _refuse_unknown(names: set[str], where: str) -> None:
    """TypeError naming each unknown keyword (and the likely intended one): ASE would keep it and ignore it."""
    if not names:
        return
    known = sorted(PolCalculator.default_parameters)
    hints = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{where} got unknown keyword(s) {', '.join(hints)}; its parameters are {', '.join(known)}")


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, or torch.float32 / torch.float64 (also by name); the model's derivatives need one of them."""
    if dtype is None or dtype in _DTYPES.values():
        return cast("torch.dtype | None", dtype)
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be float32 or float64 (torch dtype or name), got {dtype!r}: lower precisions "
                     "cannot carry the second derivatives (Born charges, polarizability)")


def _load_model(model_or_path: torch.nn.Module | str | os.PathLike[str]) -> torch.nn.Module:
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    from polmodel.nn.serialization import load  # the model classes import e3nn (seconds): only for a file
    return load(model_or_path)


class PolCalculator(Calculator):
    """ASE calculator around a polmodel model or ensemble.

    model_or_ensemble_or_path: a `PolModel`, a `PolEnsemble`, or the path of a file written by
    `polmodel.nn.serialization.save`. efield: (3,) V/Å, changed later with `calc.set(efield=...)` (which
    discards cached results). dtype: run the model in this torch dtype (a copy is converted; the caller's
    model is untouched); default the model's own. device: torch device, default the model's.

    Properties: energy (= free_energy, electric enthalpy, eV), forces, stress (periodic cells only, Voigt,
    eV/Å³), dipole (ΩP, e·Å), polarization (e/Å², periodic only), born_effective_charges (N,3,3),
    polarizability (3,3), dielectric_tensor (ε∞, periodic only). An ensemble gives the mean under these
    names and the population std over members under <name>_std.

    min_distance: Å; two atoms closer than this are overlapping and a calculation raises OverlappingAtomsError
    instead of returning numbers (the model was never trained there; the same limit as the DFT input check).
    keep_heap: keep freed CPU memory in the heap for speed on large cells (polmodel/runtime/allocator.py; a
    process-wide setting, so off unless True here or POLMODEL_KEEP_HEAP=1). Any other keyword that is not one
    of ASE's own calculator arguments is an error, as is an unknown name given to `set`.
    memory_limit_gb: the memory (GB) one call may use; a cell that needs more is evaluated in spatial chunks with
    halos, exactly (polmodel/nn/chunked.py). Default: half of the memory the device has available when the
    calculator is made.
    A budget too small for one chunk raises polmodel.nn.chunked.MemoryBudgetError. Ensembles are evaluated whole.
    coupling: how the field enters, one of polmodel.nn.response.FIELD_COUPLINGS: "network" (default) evaluates the
    model at the field; "first-order" evaluates it at zero field and adds Z*ᵀε to the forces and αε to the
    dipole, as Allegro-pol's MD does (polmodel.nn.response.first_order_field_response). It has no stress (fixed
    cells) and evaluates the cell whole.
    outside_domain: what the first calculation does when the structure or the field lies outside what the model
    was trained on (polmodel/data/domain.py; models saved with their training domain): "warn" (default, one
    OutsideDomainWarning naming each difference), "refuse" (OutsideDomainError) or "ignore". A calculator does not
    know the temperature of the MD that drives it: `check_domain(atoms, field_max, temperature_K)` checks that too
    (`polmodel md` calls it before the first step).
    """

    default_parameters: dict[str, Any] = {"efield": (0.0, 0.0, 0.0)}

    def __init__(self, model_or_ensemble_or_path: torch.nn.Module | str | os.PathLike[str],
                 efield: npt.ArrayLike = (0.0, 0.0, 0.0), dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, min_distance: float = MIN_INTERATOMIC_DISTANCE,
                 keep_heap: bool | None = None, memory_limit_gb: float | None = None, coupling: str = "network",
                 outside_domain: str = "warn", **kwargs: Any) -> None:
        _refuse_unknown(set(kwargs) - _ASE_CONSTRUCTOR_ARGUMENTS, "PolCalculator()")
        if coupling not in FIELD_COUPLINGS:
            raise ValueError(f"coupling must be one of {', '.join(FIELD_COUPLINGS)}, got {coupling!r}")
        self.coupling = coupling
        if outside_domain not in _OUTSIDE_DOMAIN_ACTIONS:
            raise ValueError(f"outside_domain must be one of {', '.join(_OUTSIDE_DOMAIN_ACTIONS)}, got "
                             f"{outside_domain!r}")
        self.outside_domain = outside_domain
        self._domain_checked = outside_domain == "ignore"
        if not min_distance >= 0.0:
            raise ValueError(f"min_distance must be >= 0 Å, got {min_distance}")
        self.min_distance = float(min_distance)
        if memory_limit_gb is not None and not (np.isfinite(memory_limit_gb) and memory_limit_gb > 0):
            raise ValueError(f"memory_limit_gb must be a positive number of GB, got {memory_limit_gb}")
        super().__init__(efield=tuple(validate_field_vector(efield, "efield").tolist()), **kwargs)
        dtype = _checked_dtype(dtype)
        model = _load_model(model_or_ensemble_or_path)
        parameter = next(model.parameters(), None)
        model_dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
        model_device = parameter.device if parameter is not None else torch.device("cpu")
        self.dtype = dtype or model_dtype
        self.device = torch.device(device) if device is not None else model_device
        if self.dtype != model_dtype or self.device != model_device:
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        if memory_limit_gb is None:
            memory_limit_gb = default_memory_limit_gb(self.device)
        self.memory_limit_gb = float(memory_limit_gb)
        if self.device.type == "cpu":
            keep_heap_if_requested(keep_heap)
        self.is_ensemble = hasattr(model, "members")
        self.species = list(cast("Sequence[str]", model.species))
        self.cutoff = float(cast(float, model.cutoff))
        if self.min_distance >= self.cutoff:
            raise ValueError(f"min_distance {self.min_distance} Å must be below the model's cutoff {self.cutoff} Å")
        base = [name for name in _BASE_PROPERTIES if not (coupling == "first-order" and name == "stress")]
        self.implemented_properties = base + list(_SECOND_ORDER) + (_ENSEMBLE_SPREAD if self.is_ensemble else [])
        # The field the cached results were computed at (it can differ from the parameter after
        # `set_field_for_next_positions`).
        self.results_efield: NDArray[np.float64] | None = None

    @property
    def efield(self) -> NDArray[np.float64]:
        return np.array(self.parameters["efield"], dtype=float)

    def set(self, **kwargs: Any) -> dict[str, Any]:
        _refuse_unknown(set(kwargs) - set(self.default_parameters), "PolCalculator.set()")
        if "efield" in kwargs:
            kwargs["efield"] = tuple(validate_field_vector(kwargs["efield"], "efield").tolist())
        changed = super().set(**kwargs)
        if changed:
            self.reset()  # every result depends on the field (ASE's base class keeps results by default)
        return changed

    def set_field_for_next_positions(self, efield: npt.ArrayLike) -> None:
        """Set the field for the next evaluation at new positions, keeping the cached results.

        For time-dependent fields in MD: the cached results belong to the current positions and the field at
        their time (`results_efield`); the integrator's next force call is at moved positions, hence at a later
        time, and uses the new field. A plain `set(efield=...)` would throw the cache away and make the
        integrator recompute the current forces at the wrong field.
        """
        self.parameters["efield"] = tuple(validate_field_vector(efield, "efield").tolist())

    def reset(self) -> None:
        super().reset()
        self.results_efield = None

    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True) -> Any:
        if atoms is not None and not isinstance(atoms, Atoms):
            raise TypeError(f"PolCalculator evaluates one ase.Atoms at a time, got {type(atoms).__name__}")
        if name in _ENSEMBLE_SPREAD and not self.is_ensemble:
            raise PropertyNotImplementedError(f"{name!r} is the spread of an ensemble; this calculator holds a "
                                              "single model")
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = cast(Atoms, self.atoms)  # set by Calculator.calculate
        periodic = bool(np.all(atoms.pbc))
        if not periodic and np.any(atoms.pbc):
            raise ValueError(f"PolCalculator supports fully periodic or fully open cells, got pbc={atoms.pbc}")
        requested = set(properties)
        for name in ("stress", "polarization", "dielectric_tensor", "polarization_std"):
            if name in requested and not periodic:
                raise PropertyNotImplementedError(f"{name!r} needs a periodic cell (a volume); these atoms have "
                                                  f"pbc={atoms.pbc.tolist()}")
        first_order = self.coupling == "first-order"
        flags = {"stress": periodic and not first_order,
                 "born_charges": bool(requested & {"born_effective_charges", "born_effective_charges_std"}),
                 "polarizability": bool(requested & {"polarizability", "dielectric_tensor",
                                                     "polarizability_std"})}
        efield = self.efield
        if not self._domain_checked:
            self._domain_checked = True
            self.check_domain(atoms, float(np.linalg.norm(efield)))
        if self.results and self.results_efield is not None and not np.array_equal(efield, self.results_efield):
            self.results = {}  # cached first-order results were at another field
        response = None if self.is_ensemble or first_order else self._chunked_response(atoms, efield, flags)
        if response is None:
            response_function = first_order_field_response if first_order else compute_response
            data = atoms_to_graph(atoms, self.species, self.cutoff, efield=efield, dtype=self.dtype)
            self._refuse_overlapping_atoms(atoms, data[keys.EDGE_INDEX].numpy(),
                                           data[keys.EDGE_CELL_SHIFT].double().numpy())
            data = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                    for key, value in data.items()}
            if self.is_ensemble:
                # polmodel.nn.ensemble imports the model classes (e3nn, seconds); an ensemble here has loaded them
                from polmodel.nn.ensemble import ensemble_response
                response = ensemble_response(cast("PolEnsemble", self.model), data, response_function, **flags)
            else:
                response = response_function(self.model, data, **flags)
        self.results.update(self._to_results(response))
        self.results_efield = efield

    def check_domain(self, atoms: Atoms, field_max: float = 0.0, temperature_K: float | None = None) -> list[str]:
        """The notes (polmodel/data/domain.py) on where `atoms`, a field of magnitude `field_max` (V/Å) and MD at
        `temperature_K` lie outside the model's training domain; warned or refused as `outside_domain` says. Empty
        for models saved without their domain."""
        domain = model_domain(self.model)
        notes = outside_domain(atoms, domain, field_max, temperature_K) if domain else []
        if notes and self.outside_domain != "ignore":
            message = "outside what the model was trained on: " + "; ".join(notes)
            if self.outside_domain == "refuse":
                raise OutsideDomainError(message)
            warnings.warn(message, OutsideDomainWarning, stacklevel=3)
        return notes

    def check_atoms(self, atoms: Atoms) -> None:
        """Raise OverlappingAtomsError when two atoms of `atoms` are closer than `min_distance` (what every
        calculation checks first), without evaluating the model: a neighbour list at `min_distance` only."""
        if self.min_distance > 0.0:
            self._refuse_overlapping_atoms(atoms, *neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc,
                                                                 self.min_distance))

    def _refuse_overlapping_atoms(self, atoms: Atoms, edge_index: NDArray[np.int64],
                                  cell_shift: NDArray[np.float64]) -> None:
        """Raise OverlappingAtomsError when two atoms are closer than `min_distance`.

        The closest pair is read from a neighbour list (the graph's, O(edges), or one at `min_distance` on the
        chunked path) rather than with `polmodel.active_learning.selection.closest_pair`, whose all-pairs distance
        matrix would cost O(N²) memory on every MD step of a large cell; any pair below `min_distance` (< cutoff) is
        an edge."""
        if self.min_distance == 0.0 or edge_index.shape[1] == 0:
            return
        receivers, senders = edge_index
        positions = atoms.get_positions()
        cell = np.asarray(atoms.cell, dtype=float)
        vectors = positions[senders] - positions[receivers] + cell_shift @ cell
        lengths = np.linalg.norm(vectors, axis=1)
        closest = int(np.argmin(lengths))
        if lengths[closest] < self.min_distance:
            i, j = int(receivers[closest]), int(senders[closest])
            raise OverlappingAtomsError(
                f"atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are {lengths[closest]:.3f} Å apart "
                f"(< min_distance {self.min_distance} Å): overlapping atoms, where the model has no meaning")

    def _chunked_response(self, atoms: Atoms, efield: NDArray[np.float64], flags: Mapping[str, bool]) -> Graph | None:
        """The response by chunks (polmodel/nn/chunked.py) when the cell needs more than memory_limit_gb, else None."""
        plan = plan_for_cell(self.model, atoms.positions, atoms.cell[:], atoms.pbc, self.memory_limit_gb,
                             dtype=self.dtype, device=self.device, born_charges=flags["born_charges"],
                             polarizability=flags["polarizability"])
        if plan.one_shot:
            return None
        self.check_atoms(atoms)
        return chunked_response(self.model, atoms.positions, atoms.cell[:], atoms.pbc,
                                species_indices(atoms.get_chemical_symbols(), self.species), efield, grid=plan.grid,
                                memory_limit_gb=self.memory_limit_gb, dtype=self.dtype, device=self.device, **flags)

    def _to_results(self, response: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        results = {}
        for suffix in ("", "_std"):
            for key, name in _PER_GRAPH.items():
                if key + suffix in response:
                    value = response[key + suffix].detach().cpu().double().numpy()[0]
                    results[name + suffix] = float(value) if value.ndim == 0 else value
            for key, name in _PER_ATOM.items():
                if key + suffix in response:
                    results[name + suffix] = response[key + suffix].detach().cpu().double().numpy()
        if keys.STRESS in response:
            results["stress"] = full_3x3_to_voigt_6_stress(response[keys.STRESS].detach().cpu().double().numpy()[0])
        results["free_energy"] = results["energy"]
        return results
