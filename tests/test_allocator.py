"""The CPU heap setting that keeps freed tensor memory for reuse (polmodel/allocator.py)."""
import subprocess
import sys

import pytest

from polmodel import allocator

_PROBE = ("import polmodel.allocator as a; first = a.keep_freed_memory_in_heap(); "
          "print(first, a.keep_freed_memory_in_heap())")


def _run(environment):
    import os
    completed = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                               env={**os.environ, **environment})
    return completed.stdout.split()


@pytest.mark.skipif(allocator._libc() is None, reason="not glibc")
def test_heap_setting_is_applied_once_on_glibc():
    assert _run({"POLMODEL_KEEP_HEAP": "1"}) == ["True", "True"]


def test_heap_setting_can_be_turned_off():
    assert _run({"POLMODEL_KEEP_HEAP": "0"}) == ["False", "False"]


def test_calculator_on_cpu_applies_it(monkeypatch):
    from mixins_model import distorted_perovskite, make_test_model
    from polmodel.calculator import PolCalculator
    calls = []
    monkeypatch.setattr("polmodel.calculator.keep_freed_memory_in_heap", lambda: calls.append(True))
    calculator = PolCalculator(make_test_model())
    assert calls == [True]
    atoms = distorted_perovskite()
    atoms.calc = calculator
    assert atoms.get_forces().shape == (len(atoms), 3)
    allocator.release_freed_memory()   # safe to call at any time
