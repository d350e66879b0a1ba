"""Protocol overrides that cannot be silently wrong: merge them into protocol inputs and refuse unknown keys.

aiida-quantumespresso's `ProtocolMixin.get_protocol_inputs` only warns about an override key it does not know, so
`{"scf": {"kpoints_distanc": 0.3}}` runs at the protocol's k-point density. `merge_overrides` raises instead.

A key is known where the protocol inputs have it or the process spec has a port of that name (an optional input
the protocol leaves out, e.g. `string_extrapolation_scale`). Nested dicts are checked level by level while either
side still describes the nesting: a port namespace (`scf.pw.metadata.options`) or a protocol dict. Inside the
value of a plain port (a `Dict` input such as `scf.pw.parameters`, or `options.resources`) the keys belong to the
code behind it and are not checked, except for the top-level keys listed in `closed_values` (e.g. pw.x's namelists).
"""
from aiida_quantumespresso.workflows.protocols.utils import recursive_merge
from plumpy import PortNamespace

__all__ = ("merge_overrides", "override_builder_inputs", "unknown_override_keys", "PW_NAMELISTS")

#: The namelists pw.x reads; a misspelt one in `pw.parameters` would be dropped by aiida-quantumespresso's writer.
PW_NAMELISTS = ("CONTROL", "SYSTEM", "ELECTRONS", "IONS", "CELL", "FCP", "RISM")


def unknown_override_keys(overrides, inputs, spec=None, closed_values=None, prefix=""):
    """Dotted paths of the keys in `overrides` that match neither `inputs` (protocol dict) nor `spec` (port namespace).

    `closed_values` maps the dotted path of a plain port (e.g. 'scf.pw.parameters') to the keys its dict value may
    have at the top level.
    """
    closed_values = closed_values or {}
    unknown = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        in_inputs = isinstance(inputs, dict) and key in inputs
        port = spec[key] if isinstance(spec, PortNamespace) and key in spec else None
        if not in_inputs and port is None:
            unknown.append(path)
            continue
        if not isinstance(value, dict):
            continue
        if path in closed_values:
            unknown.extend(f"{path}.{name}" for name in value if name not in closed_values[path])
            continue
        sub_spec = port if isinstance(port, PortNamespace) else None
        sub_inputs = inputs[key] if in_inputs and isinstance(inputs[key], dict) else None
        if port is not None and sub_spec is None:
            continue  # the value of a plain port: its keys belong to the code behind it
        if sub_spec is None and sub_inputs is None:
            continue
        unknown.extend(unknown_override_keys(value, sub_inputs or {}, sub_spec, closed_values, prefix=f"{path}."))
    return unknown


def merge_overrides(inputs, overrides, spec=None, closed_values=None, where="protocol overrides"):
    """`inputs` with `overrides` merged in recursively; a key that matches nothing known raises `ValueError`.

    `spec` is the process's input `PortNamespace` (`cls.spec().inputs`), `closed_values` as in
    `unknown_override_keys`. Returns a new dict; neither argument is changed.
    """
    if not overrides:
        return recursive_merge(inputs, {})
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping, got {type(overrides).__name__}")
    unknown = unknown_override_keys(overrides, inputs, spec, closed_values)
    if unknown:
        names = ", ".join(f"`{name}`" for name in unknown)
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {names} in {where}: matches no protocol input "
                         "or input port (misspelt?)")
    return recursive_merge(inputs, overrides)


def _scalar_inputs():
    from aiida import orm

    return {orm.Int: (int, "an integer"), orm.Float: (float, "a number"), orm.Str: (str, "a string"),
            orm.Bool: (bool, "true or false")}


def _holds(python_type, value):
    """Whether `value` (from JSON or YAML) is a value of `python_type` without a lossy conversion."""
    if python_type is bool or isinstance(value, bool):
        return python_type is bool and isinstance(value, bool)
    if python_type is int:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if python_type is float:
        return isinstance(value, (int, float))
    return isinstance(value, python_type)


def override_builder_inputs(builder, overrides, where="overrides"):
    """Replace inputs of a filled `builder` by `overrides`, a nested mapping in the shape of the process's input
    ports (as `verdi process show` lists them); returns the builder.

    A `Dict` input is merged recursively with its override (keys it does not have are added: they belong to the
    code behind the port), any other input (`Int`, `Float`, `Str`, `Bool`, `List`) is replaced by a node of the port's
    type made from the value. Checked before anything changes: a key that names no port, a namespace given a
    non-mapping, or a value the port's type cannot hold raises `ValueError` naming its dotted path.
    """
    from aiida import orm

    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping, got {type(overrides).__name__}")
    scalar_inputs = _scalar_inputs()
    replacements = []

    def collect(values, namespace, current, prefix):
        for key, value in values.items():
            path = f"{prefix}{key}"
            if key not in namespace:
                raise ValueError(f"unknown key `{path}` in {where}: matches no input port (misspelt?)")
            port = namespace[key]
            if isinstance(port, PortNamespace):
                if not isinstance(value, dict):
                    raise ValueError(f"`{path}` in {where} is a namespace of inputs: give a mapping")
                collect(value, port, current[key], f"{path}.")
                continue
            valid_type = port.valid_type[0] if isinstance(port.valid_type, tuple) else port.valid_type
            existing = current[key] if key in current else None
            try:
                if valid_type is orm.Dict:
                    if not isinstance(value, dict):
                        raise TypeError("a mapping is expected")
                    merged = recursive_merge(existing.get_dict() if existing is not None else {}, value)
                    node = orm.Dict(merged)
                elif valid_type is orm.List:
                    if not isinstance(value, list):
                        raise TypeError("a list is expected")
                    node = orm.List(value)
                elif valid_type in scalar_inputs:
                    python_type, expected = scalar_inputs[valid_type]
                    if not _holds(python_type, value):
                        raise TypeError(f"{expected} is expected")
                    node = valid_type(python_type(value))
                else:
                    raise TypeError(f"inputs of type {getattr(valid_type, '__name__', valid_type)} are not "
                                    "overridable from text")
            except TypeError as error:
                raise ValueError(f"`{path}` in {where}: {error}, got {value!r}") from error
            replacements.append((current, key, node))

    collect(overrides, builder._port_namespace, builder, "")
    for namespace, key, node in replacements:
        namespace[key] = node
    return builder
