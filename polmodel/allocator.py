"""Keep freed CPU tensor memory in the process heap (glibc), so that large cells do not pay page faults per call.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free. A model call on a cell of a few thousand atoms allocates many edge tensors of that size (E × channels
floats, E ≈ 50 N), so each one arrives as new, kernel-zeroed pages: measured on 2,560-atom BaTiO3 with one
thread, E+F+P took 2.26 s with glibc's defaults and 1.12 s with the heap kept, and the time per atom grew with
the cell (the N^1.14 scaling in benchmarks/model_speed.py) instead of staying flat. torch has no caching
allocator on the CPU, so this is left to the C library: `keep_freed_memory_in_heap` turns mmap off for
malloc and stops the heap from being trimmed, so freed blocks are reused by the next tensors.

The cost is that the resident memory stays at its peak until `release_freed_memory` (malloc_trim) is
called. It is a process-wide setting, applied once, by PolCalculator and training on CPU; the environment
variable POLMODEL_KEEP_HEAP=0 leaves glibc's defaults alone. On a C library other than glibc it does nothing.
"""
import ctypes
import os

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 * 2 ** 20

_applied = None


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory_in_heap():
    """Apply the heap setting once per process; True when it is in effect (glibc, not opted out)."""
    global _applied
    if _applied is None:
        libc = _libc()
        if libc is None or os.environ.get("POLMODEL_KEEP_HEAP", "1").strip() == "0":
            _applied = False
        else:
            # a trim threshold of -1 means the top of the heap is never given back on free
            _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)
                            and libc.mallopt(_M_TRIM_THRESHOLD, -1)
                            and libc.mallopt(_M_TOP_PAD, _TOP_PAD_BYTES))
    return _applied


def release_freed_memory():
    """Give free heap pages back to the operating system (e.g. after a large cell, before small ones)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
