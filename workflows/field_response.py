"""`FieldResponseWorkChain` (`polmodel.dft.field_response`): DFT labels of one structure at zero and finite field.

Three label tiers (input `tier`, docs/design.md "Label tiers"), one workchain: they share the zero-field scf, its metal
check, the k-mesh, the Zener limit and the field-breakdown handling, and the loop switches tier per structure with
one input instead of choosing among process classes.
- `energy_forces`: one zero-field scf → one frame with E, F, stress.
- `field_frames`: a zero-field `lelfield` scf (E, F, stress and the cell dipole at zero field) and one `lelfield` scf
  per requested field vector (E, F, dipole at that field); Z* and α one-sided where c·x̂, c·ŷ, c·ẑ are all run.
- `full` (below): the central-difference response with Berry phases, plus a frame per extra field vector.

Full tier: zero-field scf (E, F, stress, band edges) → Berry-phase nscf along the three lattice vectors (P and its quantum) and
`lelfield` scf at ±ε along x, y, z (F and the cell dipole at each field), all in parallel → calcfunctions derive Z*,
α, ε∞, P, the acoustic-sum-rule residual and the seven labelled frames. With `string_extrapolation_scale` the six
field runs are repeated on a coarser k-mesh and α, ε∞ are Richardson-extrapolated to infinitely dense Berry strings
(lelfield's discretized dψ/dk makes α converge only as 1/N²; Born charges converge far faster and are not).

Every pw.x run is a `PwBaseWorkChain` (`ResubmittingPwBaseWorkChain`), so walltime runs are restarted there and a job
the scheduler ended (`scancel`, preemption, a failed node) is resubmitted; this chain handles what is specific to
fields: metals are refused right after the first zero-field pw.x run (`InsulatorPwBaseWorkChain`, before
any restart), a field above the Zener limit is halved before it is applied, and a field run that does not converge
halves every field and reruns all of them (bounded), then exits with a clear code.
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ProcessHandlerReport, ToContext, WorkChain, if_, process_handler, while_
from aiida.plugins import CalculationFactory
from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin, recursive_merge
from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

from polmodel.active_learning.selection import TIERS, pw_runs_per_label  # noqa: F401 (part of this API)
from polmodel.data import units

from . import response_functions
from .protocol_utils import PW_NAMELISTS, merge_overrides
from .response_inputs import (number_of_electrons, validate_electron_count, validate_field_vectors, validate_inputs,
                              validate_pw_code, validate_structure)
from .response_functions import FIELD_LABELS, band_gap, field_run_label
from .scheduler_restarts import resubmit_jobs_ended_by_the_scheduler

if TYPE_CHECKING:
    import numpy.typing as npt
    from aiida.engine import ExitCode, ProcessBuilder
    from aiida.engine.processes.workchains.workchain import WorkChainSpec
    from numpy.typing import NDArray

    from .structures import StructureLike

PwCalculation = CalculationFactory("quantumespresso.pw")

PARSER_NAME = "polmodel.pw"
EMPTY_BANDS = 4  # empty bands in the zero-field scf, enough to see the lowest unoccupied level
# Keys that belong to one kind of run only; removed from the shared scf parameters before each run is built.
_RUN_SPECIFIC = {
    "CONTROL": ("calculation", "lelfield", "lberry", "gdir", "nppstr", "nberrycyc", "tstress", "tprnfor"),
    "SYSTEM": ("nbnd",),
    "ELECTRONS": ("efield_cart", "efield_phase", "startingwfc", "startingpot"),
}


#: SCF steps of a zero-field run's first pw.x attempt (InsulatorPwBaseWorkChain): the oxides of this project converge
#: in 15-30 steps with fixed occupations; a metal shows its (missing) gap at any step
FIRST_RUN_ELECTRON_MAXSTEP = 40
#: pw.x's own default of electron_maxstep (INPUT_PW)
PW_DEFAULT_ELECTRON_MAXSTEP = 100


def zener_field_limit(band_gap: float, cell: npt.ArrayLike, mesh: npt.ArrayLike) -> float:
    """Largest field (V/Å) before Zener tunnelling across a Berry string: E_gap / (e · max_i N_i |a_i|)."""
    lengths = np.linalg.norm(np.asarray(cell, dtype=float), axis=1) * np.asarray(mesh)
    return band_gap / float(lengths.max())


def axis_field_vectors(magnitudes: Iterable[float]) -> list[list[float]]:
    """+m·x̂, +m·ŷ, +m·ẑ for each magnitude m (V/Å): the field runs that give one-sided Z* and α at m."""
    return [(m * np.eye(3)[axis]).tolist() for m in magnitudes for axis in range(3)]


def protocol_field_vectors(tier: str, field_magnitude: float, field_magnitudes: Iterable[float]) -> list[list[float]]:
    """The fields (V/Å) a tier labels when none are given: `field_frames` the axes at `field_magnitude` (one-sided
    Z*, α) and at each of `field_magnitudes`; `full` the axes at each of `field_magnitudes` beside its ±ε runs."""
    if tier == "energy_forces":
        return []
    leading = [field_magnitude] if tier == "field_frames" else []
    return axis_field_vectors(leading + list(field_magnitudes))


class ResubmittingPwBaseWorkChain(PwBaseWorkChain):
    """`PwBaseWorkChain` that also resubmits a pw.x job that the scheduler ended before it finished (`scancel`,
    preemption, a failed node): `PwBaseWorkChain` has no handler for it and would abort with an unhandled failure."""

    # Above every handler of PwBaseWorkChain and the metal check: the cut-short output of an ended job says nothing
    # about the inputs, and none of those handlers may change them for it.
    handle_job_ended_by_the_scheduler = resubmit_jobs_ended_by_the_scheduler(priority=750)


class InsulatorPwBaseWorkChain(ResubmittingPwBaseWorkChain):
    """`PwBaseWorkChain` that stops at the first pw.x run whose band gap shows a metal, before any restart.

    A metal with fixed occupations often does not converge; the stock handlers would then restart it with smaller
    mixing (three runs, hours on a cluster) and end in an unhandled failure that says nothing about a metal. The
    first run is also capped at `first_run_electron_maxstep` SCF steps, so that a metal is seen after that many
    steps and not after the full `electron_maxstep` (a 2-atom Al cell ran 150 steps, 2 minutes, before).
    """

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:
        super().define(spec)
        spec.input(
            "min_band_gap", valid_type=orm.Float, default=lambda: orm.Float(0.1),
            help="A pw.x run with a smaller gap (eV) between its highest occupied and lowest unoccupied level stops "
                 "the work chain.",
        )
        spec.input(
            "first_run_electron_maxstep", valid_type=orm.Int, default=lambda: orm.Int(FIRST_RUN_ELECTRON_MAXSTEP),
            help="SCF steps of the first pw.x run at most: enough for an insulator to converge or to show its gap; "
                 "an unconverged first run with a gap is continued with the full electron_maxstep.",
        )
        spec.exit_code(
            330, "ERROR_NOT_AN_INSULATOR",
            message="The cell is metallic or nearly metallic: gap {gap} eV < {minimum} eV after the first pw.x run.",
        )

    def setup(self) -> None:
        """The stock setup, then the first run's SCF steps capped (the full limit is kept for the restarts)."""
        super().setup()
        electrons = self.ctx.inputs.parameters["ELECTRONS"]
        full = int(electrons.get("electron_maxstep", PW_DEFAULT_ELECTRON_MAXSTEP))
        cap = self.inputs.first_run_electron_maxstep.value
        if cap < full:
            electrons["electron_maxstep"] = cap
            self.ctx.full_electron_maxstep = full

    @process_handler(priority=700)
    def handle_metal(self, calculation: orm.CalcJobNode) -> ProcessHandlerReport | None:
        """Strategy: read the gap of every finished pw.x run (converged or not: pw.x writes the band edges to its XML
        either way) and stop at once when it is below `min_band_gap`: no restart can make a metal an insulator. A
        run with a gap gets back the full electron_maxstep for whatever restart the stock handlers decide."""
        full = self.ctx.get("full_electron_maxstep")
        if full is not None:
            self.ctx.inputs.parameters["ELECTRONS"]["electron_maxstep"] = full
            self.ctx.full_electron_maxstep = None
        if "output_parameters" not in calculation.outputs:
            return None
        gap = band_gap(calculation.outputs.output_parameters.get_dict())
        minimum = self.inputs.min_band_gap.value
        if gap is None or gap >= minimum:
            return None
        self.report(f"{calculation.process_label}<{calculation.pk}>: gap {gap:.3f} eV < {minimum} eV, a metal; "
                    "no restart")
        return ProcessHandlerReport(
            do_break=True, exit_code=self.exit_codes.ERROR_NOT_AN_INSULATOR.format(gap=f"{gap:.3f}", minimum=minimum)
        )


class FieldResponseWorkChain(ProtocolMixin, WorkChain):
    """DFT labels of one insulator from pw.x at one of three tiers: E, F, stress; plus fields; plus Z*, α, P."""

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:
        super().define(spec)
        cls.define_ground_state_inputs(spec)
        cls.define_field_inputs(spec)
        spec.inputs.validator = validate_inputs
        spec.outline(
            cls.setup,
            cls.run_zero_field,
            cls.inspect_zero_field,
            if_(cls.is_full_tier)(
                cls.run_berry_phases,
            ),
            while_(cls.should_run_field_runs)(
                cls.run_field_runs,
                cls.inspect_field_runs,
            ),
            if_(cls.is_full_tier)(
                cls.inspect_berry_phases,
                cls.results,
            ).else_(
                cls.results_of_cheaper_tiers,
            ),
        )
        cls.define_outputs(spec)
        cls.define_exit_codes(spec)

    @staticmethod
    def define_ground_state_inputs(spec: WorkChainSpec) -> None:
        """The structure, the shared pw.x settings, the tier and the zero-field run's gap check."""
        spec.input("structure", valid_type=orm.StructureData, help="The insulator to label.")
        spec.expose_inputs(
            PwBaseWorkChain,
            namespace="scf",
            exclude=("clean_workdir", "pw.structure", "pw.parent_folder"),
            namespace_options={"help": "Shared settings of every pw.x run (cutoffs, k-points, pseudos, options)."},
        )
        spec.input(
            "tier", valid_type=orm.Str, default=lambda: orm.Str("full"),
            help=f'Label tier, one of {", ".join(TIERS)} (docs/design.md "Label tiers").',
        )
        spec.input(
            "min_band_gap", valid_type=orm.Float, default=lambda: orm.Float(0.1),
            help="Cells with a smaller zero-field gap (eV) are refused as metallic or nearly metallic.",
        )
        spec.input("clean_workdir", valid_type=orm.Bool, default=lambda: orm.Bool(False))

    @staticmethod
    def define_field_inputs(spec: WorkChainSpec) -> None:
        """The fields of the finite-field runs, how far they may go and how they are reduced."""
        spec.input(
            "field_vectors", valid_type=orm.List, required=False,
            help="Fields (V/Å, [x, y, z] each) at which one lelfield scf and one frame each are made: the fields of "
                 "`field_frames`, extra frames for `full`.",
        )
        spec.input("field_magnitude", valid_type=orm.Float, default=lambda: orm.Float(0.0364),
                   help="|ε| of the ±ε runs of the `full` tier, V/Å.")
        spec.input(
            "max_field_halvings", valid_type=orm.Int, default=lambda: orm.Int(3),
            help="How often the fields may be halved (Zener limit or unconverged field runs) before giving up.",
        )
        spec.input(
            "zener_margin", valid_type=orm.Float, default=lambda: orm.Float(0.5),
            help="Fraction of the estimated Zener limit E_gap/(e·L_string) that the field may reach.",
        )
        spec.input(
            "string_extrapolation_scale", valid_type=orm.Float, required=False,
            help="If given (0 < s < 1), the ±ε runs are repeated on the k-mesh scaled by s and α, ε∞ are "
                 "extrapolated to dense Berry strings (about 1.5x the cost of the field runs for s = 0.75).",
        )

    @staticmethod
    def define_outputs(spec: WorkChainSpec) -> None:
        spec.output("frames", valid_type=orm.Data, help="The labelled frames (polmodel.data.frames), zero field first.")
        spec.output("band_gap", valid_type=orm.Float, help="Gap (eV) of the zero-field run.")
        spec.output(
            "born_effective_charges", valid_type=orm.ArrayData, required=False,
            help="Z* (N, 3, 3) e, [i, a, b] = ∂F_ib/∂ε_a, ASR-exact (`born_effective_charges`) and as derived "
                 "(`born_effective_charges_raw`). `full`, and `field_frames` with c·x̂, c·ŷ, c·ẑ (one-sided).",
        )
        spec.output(
            "polarizability", valid_type=orm.ArrayData, required=False,
            help="α (3, 3) e·Å²/V, clamped ions (extrapolated to dense strings with `string_extrapolation_scale`, "
                 "the two meshes' values beside it). Where Z* is.",
        )
        spec.output("dielectric_tensor", valid_type=orm.ArrayData, required=False, help="ε∞ (3, 3). Where α is.")
        spec.output(
            "polarization", valid_type=orm.ArrayData, required=False,
            help="`polarization` (3,) e/Å², `polarization_quantum` (3, 3) e·Å, `dipole` (3,) e·Å at zero field "
                 "(`full`: Berry phase).",
        )
        spec.output("asr_residual", valid_type=orm.Float, required=False,
                    help="max |Σ_i Z*_i| (e) of the Born charges as derived (the k-point convergence check).")
        spec.output("field_magnitude", valid_type=orm.Float, required=False,
                    help="|ε| of the ±ε runs actually used (V/Å), after any halving (`full`).")

    @staticmethod
    def define_exit_codes(spec: WorkChainSpec) -> None:
        # 400s: the zero-field ground state
        spec.exit_code(401, "ERROR_ZERO_FIELD_SCF_FAILED", message="The zero-field scf PwBaseWorkChain failed.")
        spec.exit_code(
            402, "ERROR_NOT_AN_INSULATOR",
            message="The cell is metallic or nearly metallic (gap {gap} eV < {minimum} eV): no Berry phase for metals.",
        )
        spec.exit_code(403, "ERROR_BAND_EDGES_MISSING", message="pw.x reported no lowest unoccupied level.")
        # 410s: finite-field and Berry-phase runs
        spec.exit_code(
            411, "ERROR_ZENER_LIMIT",
            message="The field stays above the Zener limit ({limit:.4g} V/Å) after the allowed halvings.",
        )
        spec.exit_code(
            412, "ERROR_FIELD_RUNS_NOT_CONVERGED",
            message="Finite-field runs did not converge even after halving the field {count} times.",
        )
        spec.exit_code(413, "ERROR_FIELD_RUN_FAILED", message="A finite-field run failed: {details}.")
        spec.exit_code(414, "ERROR_BERRY_PHASE_FAILED", message="A Berry-phase nscf run failed: {details}.")
        spec.exit_code(
            415, "ERROR_MESH_TOO_COARSE_TO_EXTRAPOLATE",
            message="The k-mesh {mesh} scaled by {scale} is not coarser: no string extrapolation possible.",
        )
        # 420s: derived quantities
        spec.exit_code(421, "ERROR_MISSING_LABELS", message="A finished pw.x run lacks parsed labels: {details}.")
        spec.exit_code(
            422, "ERROR_UNPHYSICAL_DIELECTRIC",
            message="ε∞ from the finite-field dipoles is unphysical ({details}): the ±ε runs disagree; outputs kept for "
                    "inspection, the frames must not be trained on.",
        )

    # --- protocols -----------------------------------------------------------------------------------------------

    @classmethod
    def get_protocol_filepath(cls) -> pathlib.Path:
        return pathlib.Path(__file__).parent / "protocols" / "field_response.yaml"

    @classmethod
    def get_protocol_inputs_checked(cls, protocol: str | None = None, overrides: Mapping[str, Any] | None = None
                                    ) -> dict[str, Any]:
        """The protocol's inputs with `overrides` merged in; an override key that matches nothing raises ValueError
        (`protocol_utils.merge_overrides`)."""
        return merge_overrides(
            cls.get_protocol_inputs(protocol), overrides, spec=cls.spec().inputs,
            closed_values={"scf.pw.parameters": PW_NAMELISTS},
        )

    @classmethod
    def get_builder_from_protocol(cls, code: orm.AbstractCode | str, structure: StructureLike, protocol: str | None = None,
                                  overrides: Mapping[str, Any] | None = None, pseudo_family: str | None = None,
                                  options: Mapping[str, Any] | None = None, tier: str | None = None,
                                  field_vectors: Sequence[Sequence[float]] | None = None) -> ProcessBuilder:
        """A builder for `structure` (StructureData, ase.Atoms or pymatgen Structure) at `protocol` ('fast' | 'balanced' | 'stringent'), see protocols/*.yaml.

        Cutoffs are the family's recommended ones times the protocol's `cutoff_factor`; `overrides` is merged last and
        may not hold keys the protocol and the input spec do not know. `tier` (default: the protocol's, `full`) is one
        of TIERS. `field_vectors` (V/Å, (n, 3)): the fields of `field_frames`, or extra frames of `full`; without them
        `field_frames` runs +m·x̂, +m·ŷ, +m·ẑ for m in [`field_magnitude`] + `field_magnitudes` and `full` adds the
        same for each m in `field_magnitudes` (labels at several magnitudes, so that they reach the fields MD drives).
        """
        from aiida_pseudo.groups.family import PseudoPotentialFamily
        from aiida_pseudo.groups.mixins import RecommendedCutoffMixin

        from .structures import to_structure_data

        if isinstance(code, str):
            code = orm.load_code(code)
        structure = to_structure_data(structure)  # StructureData, ase.Atoms or pymatgen Structure
        message = validate_pw_code(code) or validate_structure(structure)
        if message:
            raise ValueError(message)

        inputs = cls.get_protocol_inputs_checked(protocol, overrides)
        meta = inputs.pop("meta_parameters")
        tier = tier if tier is not None else inputs["tier"]
        if tier not in TIERS:
            raise ValueError(f"unknown tier `{tier}`: one of {', '.join(TIERS)}")
        if field_vectors is None:
            field_vectors = inputs.get("field_vectors")
        if field_vectors is None:
            field_vectors = protocol_field_vectors(tier, inputs["field_magnitude"], inputs.get("field_magnitudes") or [])
        message = validate_field_vectors(field_vectors, tier)
        if message:
            raise ValueError(message)
        field_vectors = [[float(x) for x in vector] for vector in field_vectors]

        if pseudo_family is None:
            from polmodel.plugins.pseudos import DEFAULT_PSEUDO_FAMILY

            pseudo_family = DEFAULT_PSEUDO_FAMILY
        family = orm.QueryBuilder().append(PseudoPotentialFamily, filters={"label": pseudo_family}).first(flat=True)
        if family is None:
            raise ValueError(f"pseudopotential family `{pseudo_family}` is not installed (see `make setup`)")
        try:
            pseudos = family.get_pseudos(structure=structure)
        except ValueError as exception:
            raise ValueError(f"family `{pseudo_family}` lacks a pseudopotential: {exception}") from exception
        message = validate_electron_count(structure, pseudos)
        if message:
            raise ValueError(message)

        parameters = inputs["scf"]["pw"]["parameters"]
        system = parameters.setdefault("SYSTEM", {})
        if "ecutwfc" not in system:
            if not isinstance(family, RecommendedCutoffMixin):
                raise ValueError(f"family `{pseudo_family}` recommends no cutoffs: give ecutwfc/ecutrho in overrides")
            ecutwfc, ecutrho = family.get_recommended_cutoffs(structure=structure, unit="Ry")
            system["ecutwfc"] = math.ceil(ecutwfc * meta["cutoff_factor"])
            system["ecutrho"] = math.ceil(ecutrho * meta["cutoff_factor"])
        parameters.setdefault("ELECTRONS", {}).setdefault("conv_thr", meta["conv_thr_per_atom"] * len(structure.sites))

        builder = cls.get_builder()
        builder.structure = structure
        builder.tier = orm.Str(tier)
        if field_vectors:
            builder.field_vectors = orm.List(field_vectors)
        builder.field_magnitude = orm.Float(inputs["field_magnitude"])
        builder.min_band_gap = orm.Float(inputs["min_band_gap"])
        builder.max_field_halvings = orm.Int(inputs["max_field_halvings"])
        builder.clean_workdir = orm.Bool(inputs["clean_workdir"])
        if inputs.get("string_extrapolation_scale") and tier == "full":
            builder.string_extrapolation_scale = orm.Float(inputs["string_extrapolation_scale"])
        builder.scf.kpoints_distance = orm.Float(inputs["scf"]["kpoints_distance"])
        builder.scf.max_iterations = orm.Int(inputs["scf"]["max_iterations"])
        builder.scf.pw.code = code
        builder.scf.pw.pseudos = pseudos
        builder.scf.pw.parameters = orm.Dict(parameters)
        metadata_options = recursive_merge(inputs["scf"]["pw"]["metadata"]["options"], options or {})
        builder.scf.pw.metadata.options = metadata_options
        return builder

    # --- outline ---------------------------------------------------------------------------------------------------

    def setup(self) -> ExitCode | None:
        """Fix one explicit k-mesh for every run (Berry strings and the Zener limit depend on it), the field runs of
        the tier, and the coarser mesh of the string extrapolation if one is asked for."""
        from aiida_quantumespresso.calculations.functions.create_kpoints_from_distance import (
            create_kpoints_from_distance,
        )

        scf = self.inputs.scf
        if "kpoints" in scf:
            kpoints = scf.kpoints
        else:
            kpoints = create_kpoints_from_distance(
                self.inputs.structure, scf.kpoints_distance, scf.get("kpoints_force_parity", orm.Bool(False))
            )
        try:
            mesh, offset = kpoints.get_kpoints_mesh()
        except AttributeError:
            mesh, offset = None, None
        self.ctx.tier = self.inputs.tier.value
        self.ctx.kpoints = kpoints
        self.ctx.mesh = mesh
        # ±ε run context prefix -> k-points (`full` only): the dense mesh always, the coarse one for the extrapolation
        self.ctx.field_kpoints = {"field": kpoints} if self.ctx.tier == "full" else {}
        self.ctx.field_vectors = self.inputs.field_vectors.get_list() if "field_vectors" in self.inputs else []
        self.ctx.field_magnitude = self.inputs.field_magnitude.value
        self.ctx.field_scale = 1.0  # every field of the label is scaled by it (halvings)
        self.ctx.field_halvings = 0
        self.ctx.run_field = bool(self._field_run_keys())
        self.ctx.pw_parameters = self.inputs.scf.pw.parameters.get_dict()
        self.ctx.nberrycyc = self.ctx.pw_parameters.get("CONTROL", {}).get("nberrycyc", 3)
        for namelist, keys in _RUN_SPECIFIC.items():
            for key in keys:
                self.ctx.pw_parameters.get(namelist, {}).pop(key, None)

        if "string_extrapolation_scale" in self.inputs and self.ctx.tier == "full":
            scale = self.inputs.string_extrapolation_scale.value
            mesh_coarse = response_functions.coarse_mesh(mesh, scale)
            if response_functions.string_density_error(mesh_coarse) <= response_functions.string_density_error(mesh):
                return self.exit_codes.ERROR_MESH_TOO_COARSE_TO_EXTRAPOLATE.format(mesh=mesh, scale=scale)
            coarse = orm.KpointsData()
            coarse.set_kpoints_mesh(mesh_coarse, offset)
            self.ctx.field_kpoints["coarse_field"] = coarse
            self.ctx.mesh_coarse = mesh_coarse
        return None

    def is_full_tier(self) -> bool:
        return self.ctx.tier == "full"

    def _base_inputs(self, parameters: Mapping[str, Any], label: str, kpoints: orm.KpointsData | None = None
                     ) -> AttributeDict:
        """PwBaseWorkChain inputs sharing the scf namespace, with `parameters`, the polmodel parser and the fixed
        k-mesh (or `kpoints`)."""
        inputs = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace="scf"))
        inputs.pw = AttributeDict(inputs.pw)
        for name in ("kpoints", "kpoints_distance", "kpoints_force_parity"):
            inputs.pop(name, None)
        inputs.kpoints = kpoints if kpoints is not None else self.ctx.kpoints
        inputs.pw.structure = self.inputs.structure
        inputs.pw.parameters = orm.Dict(parameters)
        metadata = AttributeDict(inputs.pw.get("metadata", {}))
        metadata.options = dict(metadata.get("options", {}), parser_name=PARSER_NAME)
        inputs.pw.metadata = metadata
        inputs.metadata = {"call_link_label": label}
        return inputs

    def _parameters(self, control: Mapping[str, Any] | None = None, system: Mapping[str, Any] | None = None,
                    electrons: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        parameters = {namelist: dict(values) for namelist, values in self.ctx.pw_parameters.items()}
        for namelist, values in (("CONTROL", control), ("SYSTEM", system), ("ELECTRONS", electrons)):
            parameters.setdefault(namelist, {}).update(values or {})
        parameters["SYSTEM"]["occupations"] = "fixed"
        return parameters

    def _lelfield(self, field: npt.ArrayLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """CONTROL and ELECTRONS of a `lelfield` scf at `field` (3,) V/Å (zero field included)."""
        control = {"calculation": "scf", "lelfield": True, "nberrycyc": self.ctx.nberrycyc, "tprnfor": True}
        electrons = {"efield_cart": units.field_v_per_angstrom_to_ry(np.asarray(field, dtype=float)).tolist()}
        return control, electrons

    def run_zero_field(self) -> ToContext:
        """Zero-field scf: energy, forces, stress, and a few empty bands to measure the gap; `field_frames` makes it a
        zero-field `lelfield` run, whose cell dipole is on the branch of the field runs (one-sided α). Checked by hand
        on displaced AlAs (pw.x 6.7, 3x3x3, 20 Ry): the same energy (1e-8 Ry), stress (0.01 kbar) and forces
        (4e-7 Ry/bohr) as the plain scf."""
        n_electrons = number_of_electrons(self.inputs.structure, self.inputs.scf.pw.pseudos)
        self.ctx.occupied_bands = int(math.ceil(n_electrons / 2))
        electrons: dict[str, Any]
        control, electrons = {"calculation": "scf", "tprnfor": True}, {}
        if self.ctx.tier == "field_frames":
            control, electrons = self._lelfield(np.zeros(3))
        control["tstress"] = True
        parameters = self._parameters(
            control=control, electrons=electrons, system={"nbnd": self.ctx.occupied_bands + EMPTY_BANDS},
        )
        inputs = self._base_inputs(parameters, "zero_field")
        inputs.min_band_gap = self.inputs.min_band_gap
        node = self.submit(InsulatorPwBaseWorkChain, **inputs)
        self.report(f"launching zero-field scf InsulatorPwBaseWorkChain<{node.pk}>")
        return ToContext(zero_field=node)

    def inspect_zero_field(self) -> ExitCode | None:
        """Refuse metals and near-metals; halve the fields above the Zener limit until they fit (bounded)."""
        workchain = self.ctx.zero_field
        minimum = self.inputs.min_band_gap.value
        if workchain.exit_status == InsulatorPwBaseWorkChain.exit_codes.ERROR_NOT_AN_INSULATOR.status:
            calculation = max(workchain.called, key=lambda child: child.ctime) if workchain.called else None
            gap = (band_gap(calculation.outputs.output_parameters.get_dict())
                   if calculation is not None and "output_parameters" in calculation.outputs else None)
            return self.exit_codes.ERROR_NOT_AN_INSULATOR.format(
                gap=f"{gap:.3f}" if gap is not None else "?", minimum=minimum)
        if not workchain.is_finished_ok:
            return self.exit_codes.ERROR_ZERO_FIELD_SCF_FAILED
        gap = band_gap(workchain.outputs.output_parameters.get_dict())
        if gap is None:
            return self.exit_codes.ERROR_BAND_EDGES_MISSING
        self.ctx.band_gap = gap
        if gap < minimum:
            return self.exit_codes.ERROR_NOT_AN_INSULATOR.format(gap=f"{gap:.3f}", minimum=minimum)

        if self.ctx.mesh is not None and self.ctx.run_field:
            limit = self.inputs.zener_margin.value * zener_field_limit(gap, self.inputs.structure.cell, self.ctx.mesh)
            while self._largest_field() > limit:
                if self.ctx.field_halvings >= self.inputs.max_field_halvings.value:
                    return self.exit_codes.ERROR_ZENER_LIMIT.format(limit=limit)
                self._halve_fields()
                self.report(f"field above {limit:.4g} V/Å (Zener margin, gap {gap:.3f} eV): fields halved to "
                            f"{self.ctx.field_scale:.4g} of the requested")
        return None

    def _largest_field(self) -> float:
        """The largest |ε| (V/Å) any field run of this label applies."""
        return max(float(np.linalg.norm(field)) for field, _ in self._field_runs().values())

    def _halve_fields(self) -> None:
        self.ctx.field_magnitude /= 2
        self.ctx.field_scale /= 2
        self.ctx.field_halvings += 1

    def run_berry_phases(self) -> None:
        """nscf Berry phase along each lattice vector, strings as dense as the scf mesh (pw.x needs nscf in 6.7)."""
        for gdir in (1, 2, 3):
            nppstr = (self.ctx.mesh[gdir - 1] if self.ctx.mesh is not None else 4) + 1
            parameters = self._parameters(control={"calculation": "nscf", "lberry": True, "gdir": gdir, "nppstr": nppstr})
            inputs = self._base_inputs(parameters, f"berry_phase_{gdir}")
            inputs.pw.parent_folder = self.ctx.zero_field.outputs.remote_folder
            node = self.submit(ResubmittingPwBaseWorkChain, **inputs)
            self.report(f"launching Berry-phase nscf gdir={gdir} {node.process_label}<{node.pk}>")
            self.to_context(**{f"berry_phase_{gdir}": node})

    def should_run_field_runs(self) -> bool:
        return self.ctx.run_field

    def _field_runs(self) -> dict[str, tuple[NDArray[np.float64], orm.KpointsData]]:
        """{context key: (field (3,) V/Å, k-points)} of every field run at the current field scale: `<prefix>_<label>`
        for the ±ε runs of `full`, `field_vector_<i>` for the requested field vectors."""
        runs = {}
        for prefix, kpoints in self.ctx.field_kpoints.items():
            for label in FIELD_LABELS:
                runs[f"{prefix}_{label}"] = (response_functions.field_vector(label, self.ctx.field_magnitude), kpoints)
        for index, vector in enumerate(self.ctx.field_vectors):
            runs[field_run_label(index)] = (self.ctx.field_scale * np.asarray(vector, dtype=float), self.ctx.kpoints)
        return runs

    def _field_run_keys(self) -> list[str]:
        """Context keys of all field runs (see `_field_runs`)."""
        return list(self._field_runs())

    def run_field_runs(self) -> None:
        """lelfield scf at every field of the label (from scratch: each run stands on its own)."""
        for key, (field, kpoints) in self._field_runs().items():
            control, electrons = self._lelfield(field)
            parameters = self._parameters(control=control, electrons=electrons)
            node = self.submit(ResubmittingPwBaseWorkChain, **self._base_inputs(parameters, key, kpoints))
            self.report(f"launching {key} ({np.round(field, 5).tolist()} V/Å) {node.process_label}<{node.pk}>")
            self.to_context(**{key: node})

    def inspect_field_runs(self) -> ExitCode | None:
        """Accept the field runs, or halve the fields after an electronic breakdown and rerun them (bounded)."""
        self.ctx.run_field = False
        failed = [key for key in self._field_run_keys() if not self.ctx[key].is_finished_ok]
        if not failed:
            return None
        if not all(self._is_field_breakdown(self.ctx[key]) for key in failed):
            details = ", ".join(f"{key}: exit {self.ctx[key].exit_status}" for key in failed)
            return self.exit_codes.ERROR_FIELD_RUN_FAILED.format(details=details)
        return self.handle_field_breakdown(failed)

    def handle_field_breakdown(self, failed: Sequence[str]) -> ExitCode | None:
        """Strategy: SCF divergence under field is Zener breakdown or a too-strong perturbation; halve every field and
        rerun all field runs (differences need one scale), at most `max_field_halvings` times in total."""
        if self.ctx.field_halvings >= self.inputs.max_field_halvings.value:
            return self.exit_codes.ERROR_FIELD_RUNS_NOT_CONVERGED.format(count=self.ctx.field_halvings)
        self._halve_fields()
        self.ctx.run_field = True
        self.report(f"field runs {', '.join(failed)} did not converge: fields halved to {self.ctx.field_scale:.4g} of "
                    "the requested")
        return None

    @staticmethod
    def _is_field_breakdown(workchain: orm.WorkChainNode) -> bool:
        """Whether a failed field run failed in its electronic self-consistency (not a setup or code error)."""
        breakdown = {
            PwCalculation.exit_codes.ERROR_ELECTRONIC_CONVERGENCE_NOT_REACHED.status,
            PwCalculation.exit_codes.ERROR_EIGENVECTOR_CONVERGENCE.status,
            PwCalculation.exit_codes.ERROR_BROYDEN_FACTORIZATION.status,
        }
        if workchain.exit_status == PwBaseWorkChain.exit_codes.ERROR_MAXIMUM_ITERATIONS_EXCEEDED.status:
            return True
        calculations = [child for child in workchain.called if child.process_type == PwCalculation.build_process_type()]
        return bool(calculations) and calculations[-1].exit_status in breakdown

    def inspect_berry_phases(self) -> ExitCode | None:
        for gdir in (1, 2, 3):
            workchain = self.ctx[f"berry_phase_{gdir}"]
            if not workchain.is_finished_ok:
                return self.exit_codes.ERROR_BERRY_PHASE_FAILED.format(
                    details=f"gdir={gdir}, exit {workchain.exit_status}"
                )
            if "berry_phase" not in workchain.outputs.output_parameters.get_dict():
                return self.exit_codes.ERROR_MISSING_LABELS.format(details=f"no Berry phase in gdir={gdir}")
        return None

    def _check_field_labels(self) -> ExitCode | None:
        """ERROR_MISSING_LABELS unless every field run (and a `lelfield` zero-field run) has its parsed dipole."""
        keys = self._field_run_keys() + (["zero_field"] if self.ctx.tier == "field_frames" else [])
        for key in keys:
            if "finite_field" not in self.ctx[key].outputs.output_parameters.get_dict():
                return self.exit_codes.ERROR_MISSING_LABELS.format(details=f"no finite-field dipole in {key}")
        return None

    def results(self) -> ExitCode | None:
        """`full`: derive everything through calcfunctions and attach the outputs."""
        missing = self._check_field_labels()
        if missing:
            return missing

        polarization = response_functions.compute_polarization(
            self.inputs.structure,
            **{f"gdir_{gdir}": self.ctx[f"berry_phase_{gdir}"].outputs.output_parameters for gdir in (1, 2, 3)},
            metadata={"call_link_label": "compute_polarization"},
        )
        field_magnitude = orm.Float(self.ctx.field_magnitude)
        field_outputs = self._field_outputs("field")
        response = response_functions.compute_field_response(
            self.inputs.structure, polarization, field_magnitude, **field_outputs,
            metadata={"call_link_label": "compute_field_response"},
        )
        if "coarse_field" in self.ctx.field_kpoints:
            response.update(self._extrapolate_polarizability(polarization, field_magnitude, response))
        frames = response_functions.build_frames(
            self.inputs.structure, polarization, response["born_effective_charges"], response["polarizability"],
            **self._pw_outputs(["zero_field"] + [field_run_label(i) for i in range(len(self.ctx.field_vectors))]),
            **field_outputs,
            metadata={"call_link_label": "build_frames"},
        )
        self.out("polarization", polarization)
        self.out_many(response)
        self.out("frames", frames)
        self.out("field_magnitude", field_magnitude)
        self.out("band_gap", self._band_gap_output())
        dielectric = response["dielectric_tensor"].get_array("dielectric_tensor")
        self.report(f"ASR residual {response['asr_residual'].value:.4f} e; ε∞ diagonal "
                    f"{np.diag(dielectric).round(3).tolist()}")
        defect = response_functions.dielectric_defect(dielectric)
        if defect:
            return self.exit_codes.ERROR_UNPHYSICAL_DIELECTRIC.format(details=defect)
        return None

    def results_of_cheaper_tiers(self) -> ExitCode | None:
        """`energy_forces` and `field_frames`: the frames, and one-sided Z*, α, ε∞ where c·x̂, c·ŷ, c·ẑ were run."""
        missing = self._check_field_labels()
        if missing:
            return missing
        structure = self.inputs.structure
        pw_outputs = self._pw_outputs(["zero_field"] + self._field_run_keys())
        frame_inputs = {}
        response = {}
        if self.ctx.tier == "field_frames":
            frame_inputs["polarization_quantum"] = response_functions.compute_polarization_quantum(
                structure, **self.inputs.scf.pw.pseudos, metadata={"call_link_label": "compute_polarization_quantum"})
            if response_functions.axis_field_triple(self.ctx.field_vectors) is not None:
                response = response_functions.compute_one_sided_response(
                    structure, frame_inputs["polarization_quantum"], **pw_outputs,
                    metadata={"call_link_label": "compute_one_sided_response"},
                )
                frame_inputs["born_effective_charges"] = response["born_effective_charges"]
                frame_inputs["polarizability"] = response["polarizability"]
        frames = response_functions.build_tier_frames(
            structure, **frame_inputs, **pw_outputs, metadata={"call_link_label": "build_frames"})
        self.out_many(response)
        self.out("frames", frames)
        self.out("band_gap", self._band_gap_output())
        self.report(f"{self.ctx.tier}: {frames.count} frames" + (
            f"; one-sided ASR residual {response['asr_residual'].value:.4f} e" if response else ""))
        if response:
            defect = response_functions.dielectric_defect(response["dielectric_tensor"].get_array("dielectric_tensor"))
            if defect:
                return self.exit_codes.ERROR_UNPHYSICAL_DIELECTRIC.format(details=defect)
        return None

    def _band_gap_output(self) -> orm.Float:
        return response_functions.compute_band_gap(
            self.ctx.zero_field.outputs.output_parameters, metadata={"call_link_label": "compute_band_gap"})

    def _pw_outputs(self, keys: Iterable[str]) -> dict[str, orm.Data]:
        """`parameters_<key>` and `trajectory_<key>` of the pw.x runs in context under `keys`, for the calcfunctions."""
        outputs = {}
        for key in keys:
            run = self.ctx[key].outputs
            outputs[f"parameters_{key}"] = run.output_parameters
            outputs[f"trajectory_{key}"] = run.output_trajectory
        return outputs

    def _field_outputs(self, prefix: str) -> dict[str, orm.Data]:
        """`parameters_<label>` and `trajectory_<label>` of the ±ε runs `<prefix>_<label>`, for the calcfunctions."""
        outputs = {}
        for label in FIELD_LABELS:
            run = self.ctx[f"{prefix}_{label}"].outputs
            outputs[f"parameters_{label}"] = run.output_parameters
            outputs[f"trajectory_{label}"] = run.output_trajectory
        return outputs

    def _extrapolate_polarizability(self, polarization: orm.ArrayData, field_magnitude: orm.Float,
                                    dense: Mapping[str, orm.ArrayData]) -> dict[str, orm.Data]:
        """α and ε∞ from the dense- and coarse-mesh field runs, extrapolated to dense Berry strings."""
        coarse = response_functions.compute_field_response(
            self.inputs.structure, polarization, field_magnitude, **self._field_outputs("coarse_field"),
            metadata={"call_link_label": "compute_field_response_coarse_mesh"},
        )
        extrapolated = response_functions.extrapolate_polarizability(
            self.inputs.structure, dense["polarizability"], coarse["polarizability"],
            orm.List(list(self.ctx.mesh)), orm.List(list(self.ctx.mesh_coarse)),
            metadata={"call_link_label": "extrapolate_polarizability"},
        )
        diagonal = {name: np.diag(outputs["dielectric_tensor"].get_array("dielectric_tensor")).round(3).tolist()
                    for name, outputs in (("dense", dense), ("coarse", coarse), ("extrapolated", extrapolated))}
        self.report(f"ε∞ diagonal {diagonal['dense']} on {self.ctx.mesh}, {diagonal['coarse']} on "
                    f"{self.ctx.mesh_coarse}: {diagonal['extrapolated']} extrapolated to dense Berry strings")
        return extrapolated

    def on_terminated(self) -> None:
        """Clean the remote folders of all pw.x runs if `clean_workdir` is set."""
        super().on_terminated()
        if not self.inputs.clean_workdir.value:
            return
        cleaned = []
        for called in self.node.called_descendants:
            if isinstance(called, orm.CalcJobNode):
                try:
                    called.outputs.remote_folder._clean()
                    cleaned.append(str(called.pk))
                except (OSError, KeyError, AttributeError):
                    pass
        if cleaned:
            self.report(f"cleaned remote folders of calculations: {' '.join(cleaned)}")
