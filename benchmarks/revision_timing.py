"""Time the default PolModel of one checkout of this project (run by `model_speed.py --against`, one process per
revision and round).

    python benchmarks/revision_timing.py ROOT [--repeat 4] [--calls 9] [--field 0.01]

ROOT is the checkout whose `polmodel` is imported (put first on sys.path); both the flat layout of older revisions
(polmodel.model, polmodel.calculator) and today's (polmodel.nn.model, polmodel.dynamics.calculator) are found.
Prints one JSON line: the polmodel file imported and, per call kind, the CPU time of each call (one thread, after
two untimed calls): ef (E+F at zero field) and efp (E+F+P at a finite field), in seconds.
Imports nothing of the project at module level, so that the old checkout's package is the one loaded.
"""
import argparse
import importlib
import json
import sys
import time


def _first(*names):
    for name in names:
        module_name, attribute = name.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except ImportError:
            continue
    raise ImportError(f"none of {names} can be imported")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--repeat", type=int, default=4, help="BaTiO3 supercell n (5n³ atoms; default 320)")
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--field", type=float, default=0.01)
    args = parser.parse_args(argv)
    sys.path.insert(0, args.root)
    import numpy as np
    import torch
    from ase import Atoms

    torch.set_num_threads(1)
    import polmodel
    model_class = _first("polmodel.nn.model.PolModel", "polmodel.model.PolModel")
    calculator_class = _first("polmodel.dynamics.calculator.PolCalculator", "polmodel.calculator.PolCalculator")
    torch.manual_seed(0)
    model = model_class(["Ba", "Ti", "O"], 5.0)
    unit = Atoms("BaTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                            (0, 0.5, 0.5)], cell=np.eye(3) * 4.0, pbc=True)
    atoms = unit.repeat((args.repeat,) * 3)
    atoms.rattle(0.03, seed=args.repeat)
    kinds = {"ef": (calculator_class(model), ["energy", "forces"]),
             "efp": (calculator_class(model, efield=(0.0, 0.0, args.field)),
                     ["energy", "forces", "dipole", "polarization"])}
    times = {}
    for name, (calculator, properties) in kinds.items():
        times[name] = []
        for call in range(args.calls + 2):
            calculator.reset()
            start = time.thread_time()
            calculator.calculate(atoms, properties)
            if call >= 2:
                times[name].append(time.thread_time() - start)
    print(json.dumps({"polmodel": polmodel.__file__, "atoms": len(atoms), "times_s": times}))


if __name__ == "__main__":
    main()
