"""Atom-steps/s of the switching runs (`polmodel switch`: 1,080-atom BaTiO3, Nosé–Hoover NVT, 2 fs, the field at
its +0.3636 V/Å hold) for each field coupling on one device, and where a step's time goes.

For each coupling, a PolCalculator of one member of the BaTiO3 ensemble runs `run_md` exactly as
polmodel/dynamics/switching.py does (same intervals of P(t) rows, frames and checkpoints): first --warmup steps
(kernels compiled, caches filled), then a fresh run of --steps steps that is timed. The step's time is split into
the model call (PolCalculator.calculate, without its neighbour search), the neighbour search (vesin) and the rest
(integrator, thermostat, P(t) rows, checkpoints). Prints a table, then one JSON line per coupling.

    python benchmarks/switching_speed.py --device cpu --threads 2 --steps 40
    python benchmarks/switching_speed.py --device cuda --steps 400

Measured figures: data/allegro_pol/README.md ("Switching runs").
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from md_scale import _Timer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_run(atoms, calculator, protocol, steps, directory, timers):
    from dataclasses import replace

    from polmodel.dynamics.md import run_md

    for timer in timers:
        timer.seconds, timer.calls = 0.0, 0
    start = time.perf_counter()
    settings = replace(protocol.md_settings(seed=0), steps=steps)   # a switching run's settings, `steps` long
    run_md(atoms.copy(), calculator, protocol.field, settings, trajectory_path=Path(directory) / "run.xyz",
           progress=False)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "data/allegro_pol/BaTiO3.pt"))
    parser.add_argument("--member", type=int, default=0)
    parser.add_argument("--structure", default=str(ROOT / "data/allegro_pol/BaTiO3-1080-pbe.xyz"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per coupling")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--couplings", nargs="+", default=["network", "first-order"])
    args = parser.parse_args()

    import ase.io
    import torch

    from polmodel import load
    from polmodel.data import graphs
    from polmodel.dynamics import calculator as calculator_module
    from polmodel.dynamics.calculator import PolCalculator
    from polmodel.dynamics.switching import SwitchingProtocol
    from polmodel.runtime.devices import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    atoms = ase.io.read(args.structure, index=-1)
    member = load(args.model).members[args.member]
    protocol = SwitchingProtocol()
    searches, model_calls = _Timer(), _Timer()
    searches.wrap(graphs, "neighbor_list")
    model_calls.wrap(calculator_module.PolCalculator, "calculate")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{len(atoms)} atoms, member {args.member} of {args.model}, {name}")
    print(f"{'coupling':12s} {'s/step':>8s} {'atom-steps/s':>13s} {'model':>7s} {'neighbours':>11s} {'rest':>6s}")
    results = []
    for coupling in args.couplings:
        calculator = PolCalculator(member, efield=protocol.field(0.0), coupling=coupling, device=device)
        with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as timed:
            timed_run(atoms, calculator, protocol, args.warmup, warm, (searches, model_calls))
            wall = timed_run(atoms, calculator, protocol, args.steps, timed, (searches, model_calls))
        # per step, counting the run's first call (forces before the first step) with the others
        model_s = (model_calls.seconds - searches.seconds) / args.steps
        search_s = searches.seconds / args.steps
        step_s = wall / args.steps
        record = {"coupling": coupling, "device": str(device), "device_name": name, "atoms": len(atoms),
                  "steps": args.steps, "s_per_step": round(step_s, 5),
                  "atom_steps_per_s": round(len(atoms) / step_s, 1), "model_s": round(model_s, 5),
                  "neighbour_search_s": round(search_s, 5), "rest_s": round(step_s - model_s - search_s, 5),
                  "model_calls": model_calls.calls}
        results.append(record)
        print(f"{coupling:12s} {step_s:8.4f} {len(atoms) / step_s:13.0f} {model_s:7.4f} {search_s:11.4f} "
              f"{step_s - model_s - search_s:6.4f}")
    for record in results:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
