"""What the speed benchmarks share: the BaTiO3 supercells, the size ladder, and timing with peak memory.

Imports neither e3nn nor the model, so that benchmarks/mace_speed.py can use it in the MACE environment.
"""
import statistics
import threading
import time

import numpy as np
import torch

from polmodel.runtime.allocator import release_freed_memory

SPECIES = ["Ba", "Ti", "O"]


def batio3_supercell(repeat, lattice=4.0):
    """Cubic perovskite BaTiO3 (5 atoms) repeated repeat³ times, atoms rattled so forces are non-zero."""
    from ase import Atoms
    unit = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                            (0, 0.5, 0.5)], cell=np.eye(3) * lattice, pbc=True)
    atoms = unit.repeat((repeat,) * 3)
    atoms.rattle(0.03, seed=repeat)
    return atoms


def supercell_repeats(max_atoms, device):
    """Supercell repeats n (5n³ atoms): 40, 135, 320, 1080, 2560, 8640, 20480 atoms, and on GPU on to ~10^6."""
    ladder = [2, 3, 4, 6, 8, 12, 16] + ([24, 32, 40, 50, 59] if device.type == "cuda" else [24, 32])
    return [n for n in ladder if 5 * n ** 3 <= max_atoms]


class PeakMemory:
    """Peak of (CPU resident memory | CUDA allocated memory) above the value at entry, in MiB."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        import psutil
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.baseline) / 2 ** 20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.mib = (self.peak - self.baseline) / 2 ** 20


def release_freed_memory_to_os():
    """Return freed heap pages to the OS so that a call's resident-memory peak is measured from a clean baseline."""
    import gc
    gc.collect()
    release_freed_memory()


def cpu_clock():
    # With one torch thread all work (autograd included) runs on the calling thread; its CPU time excludes the
    # memory sampler thread and other processes. With more threads, the process's CPU time is the best proxy.
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def timed(function, repeats, device):
    """Medians (wall seconds, CPU seconds of this process) of `repeats` calls, and the peak MiB of one call.

    The memory call comes first, after freed memory went back to the OS; it and one more untimed call are the
    warm-up. The timed calls follow without handing memory back: an MD loop reuses the memory of its previous
    step, and a call on memory handed back to the OS pays a page fault per fresh page. The heap needs two calls
    to settle (E+F at 20,480 atoms, one thread: 25.2 s, 8.0 s, then 3.66 and 3.64 s).
    CPU time is what the table reports: on a shared machine it is far less sensitive to other processes
    than wall time (with one torch thread the two agree on an idle machine)."""
    release_freed_memory_to_os()
    with PeakMemory(device) as meter:
        function()
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_clock()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_clock() - cpu)
    return statistics.median(walls), statistics.median(cpus), meter.mib
