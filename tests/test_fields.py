"""Field protocols: values, JSON round trip, clear errors for bad input."""
import json
import math

import numpy as np
import pytest

from polmodel.dynamics.fields import (CosineField, RampField, StaticField, field_protocol_from_dict,
                                      field_protocol_from_json)


def test_static_field_is_constant():
    protocol = StaticField((0.0, 0.0, 0.01))
    for time in (0.0, 13.7, 1e6):
        np.testing.assert_allclose(protocol(time), [0.0, 0.0, 0.01])


def test_ramp_field_interpolates_then_holds():
    protocol = RampField(start=(0, 0, 0), stop=(0.02, 0, -0.01), duration_fs=100.0)
    np.testing.assert_allclose(protocol(0.0), [0, 0, 0])
    np.testing.assert_allclose(protocol(25.0), [0.005, 0, -0.0025])
    np.testing.assert_allclose(protocol(100.0), [0.02, 0, -0.01])
    np.testing.assert_allclose(protocol(500.0), [0.02, 0, -0.01])
    np.testing.assert_allclose(protocol(-10.0), [0, 0, 0])


def test_cosine_field_values_and_normalized_axis():
    protocol = CosineField(amplitude=0.03, period_fs=200.0, axis=(0, 0, 2.0))
    np.testing.assert_allclose(protocol(0.0), [0, 0, 0.03])
    np.testing.assert_allclose(protocol(50.0), [0, 0, 0.0], atol=1e-15)
    np.testing.assert_allclose(protocol(100.0), [0, 0, -0.03])
    shifted = CosineField(amplitude=0.03, period_fs=200.0, axis=(1, 1, 0), phase=-math.pi / 2)
    np.testing.assert_allclose(shifted(50.0), 0.03 * np.array([1, 1, 0]) / math.sqrt(2))


@pytest.mark.parametrize("protocol", [
    StaticField((0.01, -0.02, 0.0)),
    RampField((0, 0, 0), (0, 0.05, 0), 40.0),
    CosineField(0.02, 300.0, (1, 0, 0), phase=0.3),
])
def test_json_round_trip(protocol):
    text = json.dumps(protocol.as_dict())
    again = field_protocol_from_json(text)
    assert type(again) is type(protocol)
    assert again == protocol
    for time in (0.0, 17.0, 123.4):
        np.testing.assert_allclose(again(time), protocol(time))


def test_json_from_file(tmp_path):
    path = tmp_path / "field.json"
    path.write_text(json.dumps({"kind": "static", "vector": [0, 0, 0.01]}))
    np.testing.assert_allclose(field_protocol_from_json(str(path))(5.0), [0, 0, 0.01])


@pytest.mark.parametrize("build, message", [
    (lambda: CosineField(0.01, -5.0, (0, 0, 1)), "period_fs must be positive"),
    (lambda: CosineField(0.01, 0.0, (0, 0, 1)), "period_fs must be positive"),
    (lambda: CosineField(0.01, 100.0, (0, 0, 0)), "non-zero"),
    (lambda: RampField((0, 0, 0), (0, 0, 0.1), 0.0), "duration_fs must be positive"),
    (lambda: StaticField((0, 0, float("nan"))), "finite"),
    (lambda: StaticField((0, 0)), "3-vector"),
    (lambda: StaticField((0, 0, 5.0)), "Zener"),
    (lambda: CosineField(2.0, 100.0, (1, 0, 0)), "Zener"),
    (lambda: CosineField(float("inf"), 100.0, (1, 0, 0)), "finite"),
    (lambda: field_protocol_from_dict({"kind": "square", "amplitude": 1}), "unknown field protocol kind"),
    (lambda: field_protocol_from_dict({"kind": "static", "vektor": [0, 0, 0]}),
     r"unknown key\(s\) 'vektor' \(did you mean 'vector'\?\) in a 'static' field protocol"),
    (lambda: field_protocol_from_json('{"kind": "cosine", "amplitude": 0.01, "period_fs": 9, "axis": [0, 0, 1], '
                                      '"phse": 1}'), r"unknown key\(s\) 'phse' \(did you mean 'phase'\?\)"),
    (lambda: field_protocol_from_dict({"kind": "ramp", "start": [0, 0, 0]}), "needs stop, duration_fs"),
    (lambda: field_protocol_from_json("not-a-file.json"), "neither a JSON object"),
    (lambda: field_protocol_from_json("{bad json"), "not valid JSON"),
])
def test_bad_input_raises_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()
