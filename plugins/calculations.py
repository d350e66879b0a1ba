"""CalcJobs for the `polmodel` executables: `polmodel train` and `polmodel md`.

One CalcJob per sub-command. Every file lives in the job's working directory under a relative name, so the same
plugins run on `localhost` and on a SLURM computer with a GPU (only the code and the scheduler options change).
"""
import io
import json
import re

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from polmodel.dynamics.md import MDSettings
from polmodel.plugins.data import FRAMES_FILENAME, FramesData, ModelData

TRAIN_PARAMETER_TYPES = {
    "ensemble_size": int,
    "seed": int,
    "epochs": int,
    "hyperparameters": dict,
    "bootstrap": bool,
    "retrain_outliers": bool,
    "validation_fraction": float,
    "device": str,
    "checkpoint": bool,
}
MD_PARAMETER_TYPES = {
    "steps": int,
    "timestep": float,
    "temperature": float,
    "thermostat": str,
    "field": dict,
    "interval": int,
    "born_spread": bool,
    "seed": int,
    "friction": float,
    "device": str,
}
MD_REQUIRED = ("steps", "timestep", "temperature", "field")
# parameter -> the MDSettings field that checks its value (`polmodel md` builds its settings from the same values)
MD_SETTING_OF_PARAMETER = {"steps": "steps", "timestep": "timestep_fs", "temperature": "temperature_K",
                           "thermostat": "thermostat", "friction": "friction", "interval": "interval",
                           "born_spread": "born_spread", "seed": "seed"}
MD_DEFAULT_THERMOSTAT = "langevin"   # `polmodel md`'s default
# torch device of the run on the computer that executes it (checked there: a GPU is only known on that machine)
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def _check_device(parameters, label):
    device = parameters.get("device")
    if device is not None and not DEVICE_PATTERN.match(device):
        return f"{label}: `device` must be cpu, cuda, cuda:N or auto, got {device!r}"
    return None


def _check_types(parameters, types, label):
    """Error message for unknown keys or wrongly typed values in a parameters dict, or None."""
    unknown = sorted(set(parameters) - set(types))
    if unknown:
        return f"{label}: unknown parameter(s) {unknown}; known: {sorted(types)}"
    for key, value in parameters.items():
        expected = types[key]
        # bool is an int subclass: refuse True where a count is meant, accept ints where floats are meant.
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{label}: `{key}` must be an integer, got {value!r}"
        if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{label}: `{key}` must be a number, got {value!r}"
        if expected in (bool, str, dict) and not isinstance(value, expected):
            return f"{label}: `{key}` must be a {expected.__name__}, got {value!r}"
    return None


def validate_train_parameters(node, _):
    """Validate the `parameters` of a `TrainCalculation`."""
    if node is None:
        return None
    parameters = node.get_dict()
    message = _check_types(parameters, TRAIN_PARAMETER_TYPES, "TrainCalculation parameters")
    if message:
        return message
    for key in ("ensemble_size", "epochs"):
        if key in parameters and parameters[key] < 1:
            return f"TrainCalculation parameters: `{key}` must be >= 1, got {parameters[key]}"
    message = _check_device(parameters, "TrainCalculation parameters")
    if message:
        return message
    fraction = parameters.get("validation_fraction")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        return f"TrainCalculation parameters: `validation_fraction` must be in [0, 1), got {fraction}"
    return None


def validate_frames(node, _):
    """A training set must hold at least one frame."""
    if node is not None and not node.count:
        return f"FramesData<{node.pk}> holds no frames: nothing to train on"
    return None


def validate_train_inputs(inputs, _):
    """A warm start must know every species of the frames."""
    model, frames = inputs.get("initial_model"), inputs.get("frames")
    if model is None or frames is None:
        return None
    unknown = sorted(set(frames.species) - set(model.species))
    if unknown:
        return (f"the frames contain species {unknown} that the initial model (ModelData<{model.pk}>) does not know; "
                f"model species: {model.species}")
    return None


def validate_md_parameters(node, _):
    """Validate the `parameters` of an `MdCalculation`, the field protocol included."""
    parameters = node.get_dict()
    message = _check_types(parameters, MD_PARAMETER_TYPES, "MdCalculation parameters")
    if message:
        return message
    missing = [key for key in MD_REQUIRED if key not in parameters]
    if missing:
        return f"MdCalculation parameters: missing required {missing}"
    message = _check_device(parameters, "MdCalculation parameters")
    if message:
        return message
    settings = {field: parameters[key] for key, field in MD_SETTING_OF_PARAMETER.items() if key in parameters}
    settings.setdefault("thermostat", MD_DEFAULT_THERMOSTAT)
    try:
        MDSettings(**settings)
    except ValueError as error:
        key = next((key for key, field in MD_SETTING_OF_PARAMETER.items() if str(error).startswith(field)), None)
        return f"MdCalculation parameters: {error}" + (f" (parameter `{key}`)" if key else "")
    from polmodel.dynamics.fields import field_protocol_from_dict

    try:
        field_protocol_from_dict(parameters["field"])
    except (ValueError, KeyError, TypeError) as error:
        return f"MdCalculation parameters: invalid field protocol {parameters['field']!r}: {error}"
    return None


def validate_md_inputs(inputs, _):
    """The structure may only contain species the model knows."""
    model, structure = inputs.get("model"), inputs.get("structure")
    if model is None or structure is None:
        return None
    unknown = sorted(set(structure.get_symbols_set()) - set(model.species))
    if unknown:
        return (
            f"structure contains species {unknown} that the model (ModelData<{model.pk}>) does not know; "
            f"model species: {model.species}"
        )
    return None


class _PolmodelCalculation(CalcJob):
    """Shared options of the `polmodel` sub-command CalcJobs."""

    _STDOUT = "aiida.out"
    _STDERR = "aiida.err"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.inputs["metadata"]["options"]["resources"].default = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
        spec.inputs["metadata"]["options"]["withmpi"].default = False
        spec.inputs["metadata"]["options"]["output_filename"].default = cls._STDOUT

    def _code_info(self, cmdline_params):
        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = cmdline_params
        codeinfo.stdout_name = self._STDOUT
        codeinfo.stderr_name = self._STDERR
        return codeinfo


class TrainCalculation(_PolmodelCalculation):
    """`polmodel train`: labelled frames -> a model or ensemble file, validation metrics and parity plots."""

    _FRAMES = "frames.xyz"
    _MODEL = "model.pt"
    _METRICS = "metrics.json"
    _PLOTS = "plots"
    _HYPERPARAMETERS = "hyperparameters.json"
    _INITIAL_MODEL = "initial_model.pt"
    # `polmodel train --checkpoint` writes the state of member k of an ensemble to checkpoint.memberK.pt
    _CHECKPOINT = "checkpoint.pt"
    _CHECKPOINT_GLOB = "checkpoint*.pt"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("frames", valid_type=FramesData, validator=validate_frames, help="Labelled training frames.")
        spec.input("initial_model", valid_type=ModelData, required=False,
                   help="Warm start: training starts from this model or ensemble (member k from member k mod M).")
        spec.input("checkpoint", valid_type=orm.FolderData, required=False,
                   help="Resume: the training state a run of the same frames and settings left (its `checkpoint` "
                        "output); the run goes on where that one stopped.")
        spec.inputs.validator = validate_train_inputs
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            required=False,
            validator=validate_train_parameters,
            help=f"Training settings; keys: {sorted(TRAIN_PARAMETER_TYPES)}.",
        )
        spec.inputs["metadata"]["options"]["parser_name"].default = "polmodel.train"
        spec.output("model", valid_type=ModelData, help="The trained model or ensemble.")
        spec.output("metrics", valid_type=orm.Dict, help="Validation metrics as written by `polmodel train`.")
        spec.output("plots", valid_type=orm.FolderData, required=False, help="Parity plots (PNG).")
        spec.output("checkpoint", valid_type=orm.FolderData, required=False,
                    help="The training state of a run that stopped before its end (time limit, kill): the "
                         "`checkpoint` input of the run that resumes it.")
        spec.default_output_node = "metrics"

        # 300-399: the executable did not leave usable output.
        spec.exit_code(300, "ERROR_MISSING_OUTPUT", message="`polmodel train` did not write {filename}; stderr: {stderr}")
        spec.exit_code(310, "ERROR_CORRUPT_METRICS", message="the metrics file could not be parsed: {error}")
        spec.exit_code(311, "ERROR_CORRUPT_MODEL", message="the model file could not be loaded: {error}")
        spec.exit_code(320, "ERROR_INTERRUPTED",
                       message="`polmodel train` stopped before writing a model but left its training state: "
                               "resume from outputs.checkpoint; stderr: {stderr}")

    def prepare_for_submission(self, folder):
        parameters = self.inputs.parameters.get_dict() if "parameters" in self.inputs else {}
        with folder.open(self._FRAMES, "wb") as handle:
            handle.write(self.inputs.frames.base.repository.get_object_content(FRAMES_FILENAME, mode="rb"))
        cmdline = [
            "train", self._FRAMES, "--output", self._MODEL, "--metrics", self._METRICS, "--plots", self._PLOTS, "--quiet",
        ]
        if parameters.get("ensemble_size", 1) > 1:
            cmdline += ["--ensemble", str(parameters["ensemble_size"])]
        if parameters.get("bootstrap"):
            cmdline.append("--bootstrap")
        if parameters.get("retrain_outliers"):
            cmdline.append("--retrain-outliers")
        for key, flag in (("seed", "--seed"), ("epochs", "--epochs"), ("validation_fraction", "--validation-fraction"),
                          ("device", "--device")):
            if key in parameters:
                cmdline += [flag, str(parameters[key])]
        if parameters.get("hyperparameters"):
            with folder.open(self._HYPERPARAMETERS, "w") as handle:
                json.dump(parameters["hyperparameters"], handle, indent=2, sort_keys=True)
            cmdline += ["--hyperparameters", self._HYPERPARAMETERS]
        if "initial_model" in self.inputs:
            # get_content() checks the sha256, so a replaced or corrupt model never reaches the run
            with folder.open(self._INITIAL_MODEL, "wb") as handle:
                handle.write(self.inputs.initial_model.get_content())
            cmdline += ["--initial-model", self._INITIAL_MODEL]
        checkpointed = parameters.get("checkpoint", False) or "checkpoint" in self.inputs
        if "checkpoint" in self.inputs:
            for name in self.inputs.checkpoint.base.repository.list_object_names():
                with folder.open(name, "wb") as handle:
                    handle.write(self.inputs.checkpoint.base.repository.get_object_content(name, mode="rb"))
        if checkpointed:
            cmdline += ["--checkpoint", self._CHECKPOINT]

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [self._code_info(cmdline)]
        calcinfo.retrieve_list = [self._METRICS, self._PLOTS, self._STDOUT, self._STDERR]
        # The model file becomes the ModelData node's own repository content; keeping it in `retrieved` as well
        # would store every model twice. The checkpoints become an output only when the run stopped early.
        calcinfo.retrieve_temporary_list = [self._MODEL] + ([self._CHECKPOINT_GLOB] if checkpointed else [])
        return calcinfo


class MdCalculation(_PolmodelCalculation):
    """`polmodel md`: molecular dynamics of a structure under a field protocol with a model or ensemble."""

    _MODEL = "model.pt"
    _STRUCTURE = "structure.xyz"
    _FIELD = "field.json"
    _TRAJECTORY = "trajectory.xyz"

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input("model", valid_type=ModelData, help="Model or ensemble; an ensemble gives per-frame spreads.")
        spec.input("structure", valid_type=orm.StructureData, help="Starting structure.")
        spec.input(
            "parameters",
            valid_type=orm.Dict,
            validator=validate_md_parameters,
            help=f"MD settings; keys: {sorted(MD_PARAMETER_TYPES)}; `field` is a polmodel.dynamics.fields protocol "
                 "dict.",
        )
        spec.inputs.validator = validate_md_inputs
        spec.inputs["metadata"]["options"]["parser_name"].default = "polmodel.md"
        spec.output("trajectory", valid_type=orm.TrajectoryData, help="Frames with P(t), field(t), energies, spreads.")

        # 300-399: the executable did not leave usable output.
        spec.exit_code(300, "ERROR_MISSING_OUTPUT", message="`polmodel md` did not write {filename}; stderr: {stderr}")
        spec.exit_code(310, "ERROR_CORRUPT_OUTPUT", message="the trajectory could not be parsed: {error}")
        spec.exit_code(311, "ERROR_EMPTY_TRAJECTORY", message="the trajectory holds no frames")

    def prepare_for_submission(self, folder):
        from ase.io import write

        parameters = self.inputs.parameters.get_dict()
        # get_content() checks the sha256 before the file leaves the repository: a replaced or corrupt model
        # never reaches a run.
        content = self.inputs.model.get_content()
        with folder.open(self._MODEL, "wb") as handle:
            handle.write(content)
        handle = io.StringIO()
        write(handle, self.inputs.structure.get_ase(), format="extxyz")
        with folder.open(self._STRUCTURE, "w") as stream:
            stream.write(handle.getvalue())
        with folder.open(self._FIELD, "w") as stream:
            json.dump(parameters["field"], stream, indent=2, sort_keys=True)

        cmdline = [
            "md",
            "--model", self._MODEL,
            "--structure", self._STRUCTURE,
            "--output", self._TRAJECTORY,
            "--steps", str(parameters["steps"]),
            "--timestep", str(parameters["timestep"]),
            "--temperature", str(parameters["temperature"]),
            "--thermostat", parameters.get("thermostat", "langevin"),
            "--field", self._FIELD,
            "--interval", str(parameters.get("interval", 1)),
            "--quiet",
        ]
        if parameters.get("born_spread"):
            cmdline.append("--born-spread")
        for key, flag in (("seed", "--seed"), ("friction", "--friction"), ("device", "--device")):
            if key in parameters:
                cmdline += [flag, str(parameters[key])]

        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [self._code_info(cmdline)]
        calcinfo.retrieve_list = [self._STDOUT, self._STDERR]
        calcinfo.retrieve_temporary_list = [self._TRAJECTORY]
        return calcinfo
