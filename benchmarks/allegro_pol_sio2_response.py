"""α-quartz's dielectric response from the ensemble trained on Allegro-pol's frames, beside Allegro-pol's figures.

On Allegro-pol's relaxed 72-atom cell (`data/allegro_pol/SiO2-72-ortho-phrelax.xyz`; x, y ⊥ and z ∥ to the
optical axis) as published, and after relaxing its positions with the model (fixed cell, largest force below
`--fmax`), `polmodel analyze modes` gives ε∞ (the model's α), the Γ modes, their IR intensities and the harmonic ε0.
Printed: ε∞ and the harmonic ε0 (⊥ the mean of xx and yy, ∥ zz), the strongest IR-active modes, and Allegro-pol's
published ε∞ 2.41 / 2.37, ε0 4.73 / 4.51, MD IR peaks 420, 765, 1041 cm⁻¹ (PBE; experiment 2.42 / 2.39,
4.64 / 4.43, 450, 797, 1072).

    python benchmarks/allegro_pol_sio2_response.py data/allegro_pol/SiO2.pt --output build/sio2_response
"""
import argparse
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
STRUCTURE = ROOT / "data" / "allegro_pol" / "SiO2-72-ortho-phrelax.xyz"
ALLEGRO_POL = {"epsilon_inf": (2.41, 2.37), "epsilon_static": (4.73, 4.51), "ir_peaks_cm-1": (420, 765, 1041)}


def relax_with_model(model_path, structure, fmax, output):
    """The structure with its positions relaxed by the model at fixed cell (ASE BFGS), written to `output`."""
    import ase.io
    from ase.optimize import BFGS

    from polmodel import PolCalculator

    atoms = ase.io.read(structure)
    atoms.calc = PolCalculator(model_path)
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=2000)
    moved = np.sqrt(((atoms.positions - ase.io.read(structure).positions) ** 2).sum(axis=1).mean())
    ase.io.write(output, atoms, format="extxyz")
    return float(moved)


def analyze_modes(model_path, structure, prefix):
    """`polmodel analyze modes` on the structure; its JSON report."""
    from polmodel.cli import main

    status = main(["analyze", "modes", str(structure), "--model", str(model_path), "--output", str(prefix)])
    if status:
        raise RuntimeError(f"polmodel analyze modes ended with status {status}")
    return json.loads(pathlib.Path(prefix).with_suffix(".json").read_text())


def perpendicular_parallel(tensor):
    tensor = np.asarray(tensor)
    return 0.5 * (tensor[0, 0] + tensor[1, 1]), tensor[2, 2]


def strongest_modes(report, count=8):
    """(wavenumber, km/mol) of the `count` strongest IR-active optical modes, by wavenumber."""
    wavenumbers = np.array(report["wavenumbers_cm-1"])
    intensities = np.array(report["ir_intensity_km_per_mol"])
    optical = ~np.array(report["acoustic"])
    order = np.argsort(intensities * optical)[::-1][:count]
    return sorted((float(wavenumbers[i]), float(intensities[i])) for i in order)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the SiO2 ensemble (data/allegro_pol/SiO2.pt)")
    parser.add_argument("--output", default="build/sio2_response", help="folder for the reports")
    parser.add_argument("--fmax", type=float, default=1e-3, help="relaxation's largest force, eV/Å")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    folder = pathlib.Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    relaxed = folder / "SiO2-72-relaxed-by-model.xyz"
    moved = relax_with_model(args.model, STRUCTURE, args.fmax, relaxed)
    summary = {"allegro_pol": ALLEGRO_POL, "rms_relaxation_A": moved}
    for name, structure in (("published", STRUCTURE), ("relaxed_by_model", relaxed)):
        report = analyze_modes(args.model, structure, folder / f"modes_{name}")
        epsilon_static = report["epsilon_static_harmonic"]
        summary[name] = {"max_force_eV_per_A": report["max_force_eV_per_A"],
                         "epsilon_inf": perpendicular_parallel(report["epsilon_inf"]),
                         "epsilon_static_harmonic": (None if epsilon_static is None
                                                     else perpendicular_parallel(epsilon_static)),
                         "strongest_ir_modes": strongest_modes(report), "notes": report["notes"]}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"relaxation moved the atoms by {moved:.4f} Å rms")
    for name in ("published", "relaxed_by_model"):
        entry = summary[name]
        static = entry["epsilon_static_harmonic"]
        print(f"{name}: largest force {entry['max_force_eV_per_A']:.3g} eV/Å; "
              f"ε∞ {entry['epsilon_inf'][0]:.3f} ⊥ / {entry['epsilon_inf'][1]:.3f} ∥; harmonic ε0 "
              + (f"{static[0]:.2f} ⊥ / {static[1]:.2f} ∥" if static else "undefined (unstable modes)"))
        print("    strongest IR modes (cm⁻¹, km/mol): "
              + ", ".join(f"{w:.0f} ({i:.0f})" for w, i in entry["strongest_ir_modes"]))
    print(f"Allegro-pol: ε∞ {ALLEGRO_POL['epsilon_inf'][0]} ⊥ / {ALLEGRO_POL['epsilon_inf'][1]} ∥; ε0 "
          f"{ALLEGRO_POL['epsilon_static'][0]} ⊥ / {ALLEGRO_POL['epsilon_static'][1]} ∥; MD IR peaks "
          f"{', '.join(map(str, ALLEGRO_POL['ir_peaks_cm-1']))} cm⁻¹")


if __name__ == "__main__":
    main()
