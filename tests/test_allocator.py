"""The CPU heap setting that keeps freed tensor memory for reuse (polmodel/runtime/allocator.py): opt-in for library
use, on in the processes the project owns.

The setting is observed as glibc does it, not through the module's own bookkeeping: with glibc's defaults a
64 MiB malloc is served by a fresh mmap (mallinfo2's `hblks` count goes up by one); with the heap setting
(M_MMAP_MAX = 0) it comes from the heap (`hblks` unchanged)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polmodel.runtime import allocator

_TESTS = str(Path(__file__).parent)
_MMAP_PROBE = textwrap.dedent("""
    import ctypes
    class _Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Info
    _libc.malloc.restype = ctypes.c_void_p
    _libc.malloc.argtypes = [ctypes.c_size_t]
    def large_malloc_is_mmapped():
        before = _libc.mallinfo2().hblks
        block = _libc.malloc(64 << 20)
        mmapped = _libc.mallinfo2().hblks > before
        _libc.free(ctypes.c_void_p(block))
        return mmapped
""")
_LIBRARY_USE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import polmodel
    from polmodel import PolCalculator
    import polmodel.training.config
    import polmodel.training.train
    from mixins_model import distorted_perovskite, make_test_model
    atoms = distorted_perovskite()
    atoms.calc = PolCalculator(make_test_model(num_features=4, lmax=1, num_layers=1){keep_heap})
    atoms.get_forces()
    if {train}:
        from toy_potential import make_toy_frames
        frames = make_toy_frames(1, seed=0)
        polmodel.training.train.train_model(frames[:2], frames[2:], polmodel.training.config.TrainingConfig(
            epochs=1, quiet=True, architecture=dict(num_features=4, lmax=1, num_layers=1)))
    print(large_malloc_is_mmapped())
""")

needs_glibc = pytest.mark.skipif(allocator._libc() is None or not hasattr(allocator._libc(), "mallinfo2"),
                                 reason="observing the setting needs glibc >= 2.33 (mallinfo2)")


def _python(code, **environment):
    env = {key: value for key, value in os.environ.items() if key != allocator.ENVIRONMENT_VARIABLE}
    completed = subprocess.run([sys.executable, "-c", _MMAP_PROBE + code], capture_output=True, text=True,
                               env={**env, "OMP_NUM_THREADS": "1", **environment})
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.split()


@needs_glibc
def test_the_probe_sees_the_setting():
    code = ("import polmodel.runtime.allocator as a; print(large_malloc_is_mmapped()); "
            "print(a.keep_freed_memory_in_heap(), a.keep_freed_memory_in_heap()); print(large_malloc_is_mmapped())")
    assert _python(code) == ["True", "True", "True", "False"]


@pytest.mark.slow
@needs_glibc
def test_library_use_leaves_the_allocator_alone():
    # importing polmodel, PolCalculator and training, a calculation and a training epoch on the CPU
    assert _python(_LIBRARY_USE.format(tests=_TESTS, keep_heap="", train=True)) == ["True"]


@needs_glibc
@pytest.mark.parametrize("argument, environment", [("", {"POLMODEL_KEEP_HEAP": "1"}), (", keep_heap=True", {})])
def test_library_use_applies_it_when_asked(argument, environment):
    assert _python(_LIBRARY_USE.format(tests=_TESTS, keep_heap=argument, train=False), **environment) == ["False"]


@needs_glibc
def test_the_environment_veto_wins_over_the_argument():
    code = "import polmodel.runtime.allocator as a; print(a.keep_heap_if_requested(True), large_malloc_is_mmapped())"
    assert _python(code, POLMODEL_KEEP_HEAP="0") == ["False", "True"]
    assert _python(code) == ["True", "False"]


@needs_glibc
@pytest.mark.parametrize("command", ["md", "train"])
def test_the_commands_the_project_owns_apply_it(command, tmp_path):
    # the command's run() applies it first thing, so arguments that fail the input checks (exit 2) show it
    code = (f"from polmodel.cli import main; status = main({_failing_argv(command, tmp_path)!r}); "
            "print(status, large_malloc_is_mmapped())")
    assert _python(code) == ["2", "False"]
    assert _python(code, POLMODEL_KEEP_HEAP="0") == ["2", "True"]


def _failing_argv(command, tmp_path):
    missing = str(tmp_path / "missing")
    if command == "md":
        return ["md", "--model", missing, "--structure", missing, "--output", str(tmp_path / "t.xyz"), "--steps", "1"]
    return ["train", missing, "--output", str(tmp_path / "m.pt")]


def test_a_bad_environment_value_is_an_error():
    code = "import polmodel.runtime.allocator as a; a.keep_heap_if_requested()"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "POLMODEL_KEEP_HEAP": "yes"})
    assert completed.returncode != 0 and "POLMODEL_KEEP_HEAP must be 0 or 1" in completed.stderr


def test_release_is_safe_at_any_time():
    allocator.release_freed_memory()
