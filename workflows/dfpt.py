"""`DfptWorkChain` (`polmodel.dft.dfpt`): Born charges and ε∞ from ph.x (DFPT, `epsil`), the independent check.

scf (same structure and settings as the field-response chain) → ph.x at Γ with `epsil=.true.`, `trans=.false.`
→ ArrayData `born_effective_charges` (N, 3, 3) [i, a, b] = ∂F_ib/∂ε_a (ph.x's "d Force / dE", without the
acoustic sum rule imposed), `dielectric_tensor` (3, 3), and Float `asr_residual`.
"""
import re

import numpy as np
from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ToContext, WorkChain, calcfunction
from aiida.plugins import WorkflowFactory

from .field_response import _RUN_SPECIFIC, validate_ground_state_inputs
from .response_functions import acoustic_sum_rule_residual

PwBaseWorkChain = WorkflowFactory("quantumespresso.pw.base")
PhBaseWorkChain = WorkflowFactory("quantumespresso.ph.base")

_FLOAT = r"[-+]?\d+\.\d+"


def parse_ph_dielectric(stdout):
    """ε∞ (3, 3) from ph.x's "Dielectric constant in cartesian axis" block (last one), or None."""
    blocks = re.findall(
        rf"Dielectric constant in cartesian axis\s*\n\s*\n((?:\s*\(\s*{_FLOAT}\s+{_FLOAT}\s+{_FLOAT}\s*\)\s*\n){{3}})",
        stdout,
    )
    if not blocks:
        return None
    return np.array([[float(x) for x in re.findall(_FLOAT, line)] for line in blocks[-1].strip().splitlines()])


def parse_ph_born_charges(stdout, num_atoms):
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


@calcfunction
def extract_dfpt_tensors(structure, retrieved):
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


def validate_inputs(inputs, _):
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
    def define(cls, spec):
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
        # 400s: child failures
        spec.exit_code(401, "ERROR_SCF_FAILED", message="The scf PwBaseWorkChain failed.")
        spec.exit_code(402, "ERROR_PH_FAILED", message="The ph.x PhBaseWorkChain failed.")
        spec.exit_code(403, "ERROR_TENSORS_MISSING", message="ph.x printed no dielectric tensor or effective charges.")

    @classmethod
    def get_builder_from_field_response(cls, field_response_builder, ph_code, options=None):
        """A builder with the scf settings of a `FieldResponseWorkChain` builder: same structure, cutoffs, k-points."""
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
        builder.ph.ph.parameters = orm.Dict({"INPUTPH": {"epsil": True, "trans": False, "tr2_ph": min(1e-16, conv_thr**1.5)}})
        builder.ph.ph.metadata.options = dict(options or source.pw.metadata.options)
        return builder

    def run_scf(self):
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

    def inspect_scf(self):
        if not self.ctx.scf.is_finished_ok:
            return self.exit_codes.ERROR_SCF_FAILED
        return None

    def run_ph(self):
        """ph.x at Γ with epsil: ε∞ and Z* from the electric-field perturbation only."""
        inputs = AttributeDict(self.exposed_inputs(PhBaseWorkChain, namespace="ph"))
        inputs.ph = AttributeDict(inputs.ph)
        inputs.ph.parent_folder = self.ctx.scf.outputs.remote_folder
        qpoints = orm.KpointsData()
        qpoints.set_kpoints_mesh([1, 1, 1])
        inputs.qpoints = qpoints
        inputs.metadata = {"call_link_label": "ph"}
        node = self.submit(PhBaseWorkChain, **inputs)
        self.report(f"launching ph.x PhBaseWorkChain<{node.pk}>")
        return ToContext(ph=node)

    def inspect_ph(self):
        if not self.ctx.ph.is_finished_ok:
            return self.exit_codes.ERROR_PH_FAILED
        return None

    def results(self):
        calculation = [c for c in self.ctx.ph.called if isinstance(c, orm.CalcJobNode)][-1]
        try:
            tensors = extract_dfpt_tensors(
                self.inputs.structure, calculation.outputs.retrieved, metadata={"call_link_label": "extract_tensors"}
            )
        except ValueError:
            return self.exit_codes.ERROR_TENSORS_MISSING
        self.out_many(tensors)
        self.report(f"ph.x ASR residual {tensors['asr_residual'].value:.4f} e")
        return None
