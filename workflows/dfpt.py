"""`DfptWorkChain` (`polmodel.dft.dfpt`): Born charges, ε∞ and Γ phonons from ph.x (DFPT), the independent check.

scf (same structure and settings as the field-response chain) → ph.x at Γ with `epsil=.true.` and, by default,
`trans=.true.` → ArrayData `born_effective_charges` (N, 3, 3) [i, a, b] = ∂F_ib/∂ε_a (ph.x's "d Force / dE",
without the acoustic sum rule imposed), `dielectric_tensor` (3, 3), Float `asr_residual`; with `trans`, also
`gamma_phonons` (ArrayData: force constants, TO frequencies with and without the acoustic sum rule, eigenvectors,
mode effective charges, IR intensities) and `static_dielectric_tensor` (ε0 = ε∞ + polar-mode part), computed
from ph.x's dynamical matrix file and Z* by polmodel.analysis.phonons (what dynmat.x does; tests/test_dfpt.py checks the
two agree).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction
from aiida.plugins import WorkflowFactory

from polmodel.analysis import phonons
from polmodel.data import units

from .field_response import _RUN_SPECIFIC
from .response_inputs import validate_ground_state_inputs
from .response_functions import acoustic_sum_rule_residual

if TYPE_CHECKING:
    from aiida.engine import ExitCode, ProcessBuilder
    from aiida.engine.processes.workchains.workchain import WorkChainSpec
    from numpy.typing import NDArray

PwBaseWorkChain = WorkflowFactory("quantumespresso.pw.base")
PhBaseWorkChain = WorkflowFactory("quantumespresso.ph.base")

_FLOAT = r"[-+]?\d+\.\d+"


def parse_ph_dielectric(stdout: str) -> NDArray[np.float64] | None:
    """ε∞ (3, 3) from ph.x's "Dielectric constant in cartesian axis" block (last one), or None."""
    blocks = re.findall(
        rf"Dielectric constant in cartesian axis\s*\n\s*\n((?:\s*\(\s*{_FLOAT}\s+{_FLOAT}\s+{_FLOAT}\s*\)\s*\n){{3}})",
        stdout,
    )
    if not blocks:
        return None
    return np.array([[float(x) for x in re.findall(_FLOAT, line)] for line in blocks[-1].strip().splitlines()])


def parse_ph_born_charges(stdout: str, num_atoms: int) -> NDArray[np.float64] | None:
    """Z* (N, 3, 3) [i, a, b] = ∂F_ib/∂ε_a from ph.x's "Effective charges (d Force / dE)" block, or None.

    ph.x prints, for each atom, rows Ex, Ey, Ez: row a holds ∂F_b/∂E_a for b = x, y, z.
    """
    start = stdout.rfind("Effective charges (d Force / dE) in cartesian axis")
    if start < 0:
        return None
    rows = re.findall(rf"E[xyz]\s+\(\s*({_FLOAT})\s+({_FLOAT})\s+({_FLOAT})\s*\)", stdout[start:])
    if len(rows) < 3 * num_atoms:
        return None
    return np.array(rows[: 3 * num_atoms], dtype=float).reshape(num_atoms, 3, 3)


# ph.x's units (polmodel/data/units.py)
AMU_IN_RY_MASS = units.AMU_IN_RY_MASS
FORCE_CONSTANT_RY_PER_BOHR2_IN_EV_PER_A2 = units.FORCE_CONSTANT_RY_PER_BOHR2_IN_EV_PER_A2


def parse_ph_dynamical_matrix(text: str) -> dict[str, Any] | None:
    """The Γ force constants and masses of a ph.x dynamical-matrix file (`fildyn`), or None.

    Returns a dict: `force_constants` (N, 3, N, 3) eV/Å² = ∂²E/∂R_ia∂R_jb (the real part; at Γ the imaginary
    part vanishes), `masses` (N,) amu, `species` (N,) names. ph.x writes C_ij in Ry/bohr² per atom pair (i, j),
    three rows a of (Re, Im) pairs over b, after the header with the species masses (Ry units) and positions.
    """
    lines = text.splitlines()
    try:
        header = lines[2].split()
        num_types, num_atoms, ibrav = int(header[0]), int(header[1]), int(header[2])
        row = 3 + (4 if ibrav == 0 else 0)
        type_masses, type_names = {}, {}
        for line in lines[row: row + num_types]:
            index, rest = line.split(maxsplit=1)
            name, mass = rest.rsplit(maxsplit=1)
            type_masses[int(index)] = float(mass) / AMU_IN_RY_MASS
            type_names[int(index)] = name.strip("' ").strip()
        row += num_types
        atom_types = [int(line.split()[1]) for line in lines[row: row + num_atoms]]
        start = next(k for k, line in enumerate(lines) if "Dynamical  Matrix in cartesian axes" in line)
    except (IndexError, ValueError, StopIteration):
        return None
    force_constants = np.zeros((num_atoms, 3, num_atoms, 3))
    row = next((k for k in range(start + 1, len(lines)) if lines[k].split()[:1] == ["1"]), len(lines))
    try:
        for _ in range(num_atoms * num_atoms):
            i, j = (int(x) - 1 for x in lines[row].split())
            block = np.array([[float(x) for x in lines[row + 1 + a].split()] for a in range(3)])
            force_constants[i, :, j, :] = block[:, 0::2]
            row += 4
    except (IndexError, ValueError):
        return None
    return {"force_constants": force_constants * FORCE_CONSTANT_RY_PER_BOHR2_IN_EV_PER_A2,
            "masses": np.array([type_masses[t] for t in atom_types]),
            "species": [type_names[t] for t in atom_types]}


def _dynamical_matrix_file(retrieved: orm.FolderData) -> str | None:
    """Text of the Γ dynamical matrix among ph.x's retrieved files (DYN_MAT/dynamical-matrix-1; -0 lists q)."""
    repository = retrieved.base.repository
    if "DYN_MAT" not in repository.list_object_names():
        return None
    names = sorted(name for name in repository.list_object_names("DYN_MAT") if not name.endswith("-0"))
    if not names:
        return None
    return repository.get_object_content(f"DYN_MAT/{names[0]}", mode="r")


# A calcfunction's parameters are annotated orm.Data: AiiDA makes the annotations the valid types of its ports, and
# Data is what they were before they had any.
@calcfunction
def extract_gamma_phonons(structure: orm.Data, retrieved: orm.Data, born_effective_charges: orm.Data,
                          dielectric_tensor: orm.Data) -> dict[str, orm.ArrayData]:
    """Γ TO modes, mode charges, IR intensities and ε0 = ε∞ + Σ_m S_m/(ε_vac Ω ω_m²) from ph.x's dynamical
    matrix and Z*, with the acoustic sum rule imposed on both (polmodel.analysis.phonons); the frequencies without
    it are kept beside them (`wavenumbers_raw`, what dynmat.x prints with asr='no')."""
    text = _dynamical_matrix_file(retrieved)
    matrix = None if text is None else parse_ph_dynamical_matrix(text)
    if matrix is None:
        raise ValueError("ph.x retrieved no readable dynamical matrix (was trans=.true.?)")
    born = born_effective_charges.get_array("born_effective_charges")
    epsilon_inf = dielectric_tensor.get_array("dielectric_tensor")
    volume = structure.get_cell_volume()
    result = phonons.gamma_response(matrix["force_constants"], matrix["masses"], born, epsilon_inf, volume)
    raw = phonons.gamma_modes(matrix["force_constants"], matrix["masses"], acoustic_sum_rule=False)
    arrays = {"force_constants": matrix["force_constants"], "masses": matrix["masses"],
              "wavenumbers": result["wavenumbers"], "wavenumbers_raw": raw["wavenumbers"],
              "eigenvectors": result["eigenvectors"], "acoustic": result["acoustic"],
              "mode_charges": result["mode_charges"],
              "ir_intensities": result["ir_intensities"]["debye2_per_angstrom2_amu"],
              "ir_intensities_km_per_mol": result["ir_intensities"]["km_per_mol"]}
    outputs = {"gamma_phonons": orm.ArrayData(arrays)}
    if result["epsilon_static"] is not None:
        outputs["static_dielectric_tensor"] = orm.ArrayData({"static_dielectric_tensor": result["epsilon_static"]})
    return outputs


@calcfunction
def extract_dfpt_tensors(structure: orm.Data, retrieved: orm.Data) -> dict[str, orm.Data]:
    """Z*, ε∞ and the ASR residual from a ph.x run's retrieved stdout."""
    stdout = retrieved.base.repository.get_object_content("aiida.out", mode="r")
    dielectric = parse_ph_dielectric(stdout)
    born = parse_ph_born_charges(stdout, len(structure.sites))
    if dielectric is None or born is None:
        raise ValueError("ph.x output holds no dielectric tensor or effective charges")
    return {
        "born_effective_charges": orm.ArrayData({"born_effective_charges": born}),
        "dielectric_tensor": orm.ArrayData({"dielectric_tensor": dielectric}),
        "asr_residual": orm.Float(acoustic_sum_rule_residual(born)),
    }


def validate_inputs(inputs: Mapping[str, Any], _: object) -> str | None:
    message = validate_ground_state_inputs(inputs)
    if message:
        return message
    ph_code = inputs["ph"]["ph"]["code"]
    if ph_code.default_calc_job_plugin != "quantumespresso.ph":
        return f"code `{ph_code.full_label}` runs `{ph_code.default_calc_job_plugin}`, but `quantumespresso.ph` is needed"
    return None


class DfptWorkChain(WorkChain):
    """ph.x Born charges and ε∞ of an insulator at the same settings as `FieldResponseWorkChain`."""

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:
        super().define(spec)
        spec.input("structure", valid_type=orm.StructureData)
        spec.expose_inputs(PwBaseWorkChain, namespace="scf", exclude=("clean_workdir", "pw.structure", "pw.parent_folder"))
        spec.expose_inputs(
            PhBaseWorkChain, namespace="ph",
            exclude=("clean_workdir", "ph.parent_folder", "qpoints", "qpoints_distance", "qpoints_force_parity"),
        )
        spec.inputs["ph"]["ph"].validator = None
        spec.inputs.validator = validate_inputs
        spec.outline(cls.run_scf, cls.inspect_scf, cls.run_ph, cls.inspect_ph, cls.results)
        spec.output("born_effective_charges", valid_type=orm.ArrayData)
        spec.output("dielectric_tensor", valid_type=orm.ArrayData)
        spec.output("asr_residual", valid_type=orm.Float)
        spec.output("gamma_phonons", valid_type=orm.ArrayData, required=False,
                    help="with trans: Γ TO modes, mode effective charges and IR intensities "
                         "(polmodel.analysis.phonons)")
        spec.output("static_dielectric_tensor", valid_type=orm.ArrayData, required=False,
                    help="with trans and no unstable optical mode: ε0 = ε∞ + the polar modes' part")
        # 400s: child failures
        spec.exit_code(401, "ERROR_SCF_FAILED", message="The scf PwBaseWorkChain failed.")
        spec.exit_code(402, "ERROR_PH_FAILED", message="The ph.x PhBaseWorkChain failed.")
        spec.exit_code(403, "ERROR_TENSORS_MISSING", message="ph.x printed no dielectric tensor or effective charges.")
        spec.exit_code(404, "ERROR_PHONONS_MISSING",
                       message="ph.x ran with trans but left no readable dynamical matrix.")

    @classmethod
    def get_builder_from_field_response(cls, field_response_builder: ProcessBuilder, ph_code: orm.AbstractCode | str,
                                        options: Mapping[str, Any] | None = None,
                                        phonons: bool = True) -> ProcessBuilder:
        """A builder with the scf settings of a `FieldResponseWorkChain` builder: same structure, cutoffs, k-points.

        phonons: also compute the Γ phonons (`trans=.true.`; roughly 3N more perturbations than `epsil` alone)."""
        if isinstance(ph_code, str):
            ph_code = orm.load_code(ph_code)
        builder = cls.get_builder()
        builder.structure = field_response_builder.structure
        source = field_response_builder.scf
        for key in ("kpoints", "kpoints_distance", "max_iterations"):
            if key in source:
                builder.scf[key] = source[key]
        builder.scf.pw.code = source.pw.code
        builder.scf.pw.pseudos = source.pw.pseudos
        builder.scf.pw.parameters = source.pw.parameters
        builder.scf.pw.metadata.options = dict(source.pw.metadata.options)
        conv_thr = source.pw.parameters.get_dict().get("ELECTRONS", {}).get("conv_thr", 1e-10)
        builder.ph.ph.code = ph_code
        builder.ph.ph.parameters = orm.Dict({"INPUTPH": {"epsil": True, "trans": bool(phonons),
                                                            "tr2_ph": min(1e-16, conv_thr**1.5)}})
        builder.ph.ph.metadata.options = dict(options or source.pw.metadata.options)
        return builder

    def run_scf(self) -> ToContext:
        """Plain scf with the shared settings (ph.x needs the ground state, symmetry on)."""
        inputs = AttributeDict(self.exposed_inputs(PwBaseWorkChain, namespace="scf"))
        inputs.pw = AttributeDict(inputs.pw)
        parameters = inputs.pw.parameters.get_dict()
        for namelist, keys in _RUN_SPECIFIC.items():
            for key in keys:
                parameters.get(namelist, {}).pop(key, None)
        parameters.setdefault("CONTROL", {})["calculation"] = "scf"
        parameters.setdefault("SYSTEM", {})["occupations"] = "fixed"
        inputs.pw.parameters = orm.Dict(parameters)
        inputs.pw.structure = self.inputs.structure
        inputs.metadata = {"call_link_label": "scf"}
        node = self.submit(PwBaseWorkChain, **inputs)
        self.report(f"launching scf PwBaseWorkChain<{node.pk}>")
        return ToContext(scf=node)

    def inspect_scf(self) -> ExitCode | None:
        if not self.ctx.scf.is_finished_ok:
            return self.exit_codes.ERROR_SCF_FAILED
        return None

    def run_ph(self) -> ToContext:
        """ph.x at Γ with epsil: ε∞ and Z* from the electric-field perturbation only."""
        inputs = AttributeDict(self.exposed_inputs(PhBaseWorkChain, namespace="ph"))
        inputs.ph = AttributeDict(inputs.ph)
        inputs.ph.parent_folder = self.ctx.scf.outputs.remote_folder
        # Γ as one explicit q-point, not a 1x1x1 mesh: a mesh makes ph.x run with ldisp, which computes the phonons
        # whatever `trans` says (an "ε∞ and Z* only" run of quartz spent 0.58 CPU h on Γ phonons)
        qpoints = orm.KpointsData()
        qpoints.set_cell_from_structure(self.inputs.structure)
        qpoints.set_kpoints([[0.0, 0.0, 0.0]])
        inputs.qpoints = qpoints
        inputs.metadata = {"call_link_label": "ph"}
        node = self.submit(PhBaseWorkChain, **inputs)
        self.report(f"launching ph.x PhBaseWorkChain<{node.pk}>")
        return ToContext(ph=node)

    def inspect_ph(self) -> ExitCode | None:
        if not self.ctx.ph.is_finished_ok:
            return self.exit_codes.ERROR_PH_FAILED
        return None

    def results(self) -> ExitCode | None:
        calculation = [c for c in self.ctx.ph.called if isinstance(c, orm.CalcJobNode)][-1]
        try:
            tensors = extract_dfpt_tensors(
                self.inputs.structure, calculation.outputs.retrieved, metadata={"call_link_label": "extract_tensors"}
            )
        except ValueError:
            return self.exit_codes.ERROR_TENSORS_MISSING
        self.out_many(tensors)
        self.report(f"ph.x ASR residual {tensors['asr_residual'].value:.4f} e")
        if not self.ctx.ph.inputs.ph.parameters.get_dict()["INPUTPH"].get("trans", True):
            return None
        try:
            modes = extract_gamma_phonons(
                self.inputs.structure, calculation.outputs.retrieved, tensors["born_effective_charges"],
                tensors["dielectric_tensor"], metadata={"call_link_label": "extract_gamma_phonons"})
        except ValueError:
            return self.exit_codes.ERROR_PHONONS_MISSING
        self.out_many(modes)
        return None
