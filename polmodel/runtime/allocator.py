"""Keep freed CPU tensor memory in the process heap (glibc), so that large cells do not pay page faults per call.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free. A model call on a cell of a few thousand atoms allocates many edge tensors of that size (E × channels
floats, E ≈ 50 N), so each one arrives as new, kernel-zeroed pages, which about doubles the time of a call on a few
thousand atoms and makes the time per atom grow with the cell (benchmarks/README.md "Heap"). torch has no caching
allocator on the CPU, so this is left to the C library: `keep_freed_memory_in_heap` turns mmap off for
malloc and stops the heap from being trimmed, so freed blocks are reused by the next tensors.

The cost is that the resident memory stays at its peak until `release_freed_memory` (malloc_trim) is called,
and it is a process-wide setting. So a library import never applies it: `PolCalculator` and training apply it
only when asked (`keep_heap_if_requested`: their `keep_heap=True` argument, or POLMODEL_KEEP_HEAP=1 in the
environment). The processes the project owns (`polmodel md` and `polmodel train`, which the CalcJobs run) apply
it at start-up by calling `keep_freed_memory_in_heap` directly. POLMODEL_KEEP_HEAP=0 leaves glibc's defaults
alone everywhere. On a C library other than glibc it does nothing.
"""
import ctypes
import os

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 * 2 ** 20
ENVIRONMENT_VARIABLE = "POLMODEL_KEEP_HEAP"

_applied = None


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _environment_choice():
    """True for POLMODEL_KEEP_HEAP=1, False for =0, None when unset or empty."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be 0 or 1, got {value!r}")
    return value == "1"


def keep_freed_memory_in_heap():
    """Apply the heap setting now, once per process (unless POLMODEL_KEEP_HEAP=0); True when it is in effect.

    For code that owns its process (the `polmodel md` / `polmodel train` commands, benchmarks); library code
    calls `keep_heap_if_requested` instead."""
    global _applied
    if _applied is None:
        libc = _libc()
        if libc is None or _environment_choice() is False:
            _applied = False
        else:
            # a trim threshold of -1 means the top of the heap is never given back on free
            _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)
                            and libc.mallopt(_M_TRIM_THRESHOLD, -1)
                            and libc.mallopt(_M_TOP_PAD, _TOP_PAD_BYTES))
    return _applied


def keep_heap_if_requested(requested=None):
    """The library's hook: apply the heap setting only when asked; True when it is in effect.

    requested: True or False from the caller's own argument; None defers to POLMODEL_KEEP_HEAP (unset: no).
    POLMODEL_KEEP_HEAP=0 wins over requested=True (the user's veto on the whole process)."""
    if requested is None:
        requested = bool(_environment_choice())
    if requested:
        return keep_freed_memory_in_heap()
    return bool(_applied)


def release_freed_memory():
    """Give free heap pages back to the operating system (e.g. after a large cell, before small ones)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
