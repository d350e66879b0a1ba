"""Our models against Allegro-pol's on the same frames no member of ours trained on.

The frames are the validation part of the split the training made (the source card's `validation_fraction` and
`seed`, `polmodel.training.data.split_frames`), read again from the card's published file. Allegro-pol's numbers
are its own predictions on the same frames (`*.train.allegro-pol.xyz.gz`, its parity file); those frames may have
been in *its* training set, so its column is an upper bound of its accuracy, not a test error.

Errors, each computed the same way for both codes: energy per atom with the mean offset over the frames removed
(meV/atom, MAE; two codes' energies differ by a constant), forces (meV/Å, MAE per component), stress (meV/Å³),
Z* (e, MAE per component), α (e·Å²/V per cell, MAE per component), and the cell dipole folded on the quantum lattice
e·R (e·Å per cell, mean norm of the folded difference). With `--md-structure`, MD steps/s of each model (one
member, and the whole ensemble) on that structure: velocity Verlet at a static field, forces only.

    python benchmarks/allegro_pol_validation.py data/allegro_pol/BaTiO3.yaml data/allegro_pol/BaTiO3.pt \
        --allegro-pol data/allegro_pol/BaTiO3.train.allegro-pol.xyz.gz --md-structure data/allegro_pol/BaTiO3-1080-pbe.xyz
"""
import argparse
import io
import json
import pathlib
import time

import numpy as np


def read_card(path):
    """The source card (without AiiDA: only its file, mapping and training split)."""
    import yaml

    card = yaml.safe_load(pathlib.Path(path).read_text())
    card["file"] = pathlib.Path(path).parent / card["file"]
    return card


def validation_frames(card):
    from polmodel.data.external import LabelMapping, read_external_frames
    from polmodel.training.data import split_frames

    mapping = LabelMapping.from_convention(card.get("convention", "polmodel"), card.get("mapping"))
    frames = read_external_frames(card["file"], mapping)
    training = card.get("training", {})
    train, valid = split_frames(frames, training.get("validation_fraction", 0.1), training.get("seed", 0))
    return train, valid


def allegro_pol_predictions(path, label_frames):
    """Allegro-pol's predictions as polmodel frames, in the order of `label_frames` (matched by the file's index).

    Its parity file marks the frames non-periodic (pbc F F F) although they are the periodic label frames; they get
    the label frame's cell and periodicity before conversion."""
    import ase.io

    from polmodel.data.external import ALLEGRO_POL, convert_frame, read_file_bytes
    from polmodel.data.frames import normalize_frame

    predictions = ase.io.read(io.StringIO(read_file_bytes(path).decode()), index=":", format="extxyz")
    mapping = type(ALLEGRO_POL)(**{**ALLEGRO_POL.as_dict(), "energy": "energy"})
    frames = []
    for label in label_frames:
        index = int(label.info["external_source"].rsplit("#", 1)[1])
        prediction = predictions[index]
        if not np.allclose(prediction.positions, label.positions, atol=1e-4):
            raise ValueError(f"Allegro-pol's frame {index} is not the labelled frame {index}")
        prediction.set_pbc(label.pbc)
        prediction.set_cell(label.cell)
        frames.append(normalize_frame(convert_frame(prediction, mapping, index), index))
    return frames


def model_predictions(model, label_frames):
    """The model's E, F, stress, dipole, Z*, α on each frame, as polmodel frames."""
    from ase.stress import voigt_6_to_full_3x3_stress

    from polmodel.dynamics.calculator import PolCalculator

    calculator = PolCalculator(model)
    frames = []
    for label in label_frames:
        atoms = label.copy()
        atoms.calc = calculator
        calculator.calculate(atoms, properties=["energy", "forces", "stress", "dipole", "born_effective_charges",
                                                "polarizability"])
        results = calculator.results
        prediction = label.copy()
        prediction.info.update(energy=float(results["energy"]), stress=voigt_6_to_full_3x3_stress(results["stress"]),
                               dipole=np.asarray(results["dipole"]),
                               polarizability=np.asarray(results["polarizability"]).reshape(3, 3))
        prediction.arrays["forces"] = np.asarray(results["forces"])
        prediction.arrays["born_effective_charges"] = np.asarray(results["born_effective_charges"]).reshape(-1, 9)
        frames.append(prediction)
    return frames


def cross_code_errors(predicted, labels):
    """The errors of the module docstring, the same for any code's predictions (polmodel frames)."""
    from polmodel.data.polarization import fold_dipole_difference

    per_atom = np.array([(p.info["energy"] - l.info["energy"]) / len(l) for p, l in zip(predicted, labels)])
    forces = np.concatenate([(p.arrays["forces"] - l.arrays["forces"]).ravel() for p, l in zip(predicted, labels)])
    stress = np.concatenate([(p.info["stress"] - l.info["stress"]).ravel() for p, l in zip(predicted, labels)])
    born = np.concatenate([(p.arrays["born_effective_charges"] - l.arrays["born_effective_charges"]).ravel()
                           for p, l in zip(predicted, labels)])
    alpha = np.concatenate([(p.info["polarizability"] - l.info["polarizability"]).ravel()
                            for p, l in zip(predicted, labels)])
    dipole = [np.linalg.norm(fold_dipole_difference(p.info["dipole"] - l.info["dipole"],
                                                    l.info["polarization_quantum"])) for p, l in zip(predicted, labels)]
    return {"energy_meV_per_atom": 1e3 * float(np.abs(per_atom - per_atom.mean()).mean()),
            "forces_meV_per_A": 1e3 * float(np.abs(forces).mean()),
            "stress_meV_per_A3": 1e3 * float(np.abs(stress).mean()),
            "born_charges_e": float(np.abs(born).mean()),
            "polarizability_e_A2_per_V": float(np.abs(alpha).mean()),
            "dipole_folded_e_A": float(np.mean(dipole))}


def md_steps_per_second(model, structure, steps, field=(0.0, 0.0, 0.01)):
    """Velocity-Verlet steps per second of `model` on `structure` (after two untimed steps)."""
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from polmodel.dynamics.calculator import PolCalculator

    atoms = ase.io.read(structure)
    atoms.calc = PolCalculator(model, efield=field)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=2 * units.fs)
    dynamics.run(2)
    start = time.perf_counter()
    dynamics.run(steps)
    return steps / (time.perf_counter() - start)


COLUMNS = ("energy_meV_per_atom", "forces_meV_per_A", "stress_meV_per_A3", "born_charges_e",
           "polarizability_e_A2_per_V", "dipole_folded_e_A")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("card", help="the source card the models were trained from")
    parser.add_argument("models", nargs="*", help="model or ensemble files trained on the card's split")
    parser.add_argument("--allegro-pol", default=None, help="Allegro-pol's predictions on the card's file")
    parser.add_argument("--md-structure", default=None, help="time MD of each model on this structure")
    parser.add_argument("--md-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)

    import torch

    from polmodel.nn.serialization import load

    torch.set_num_threads(args.threads)
    card = read_card(args.card)
    train, valid = validation_frames(card)
    print(f"{card['file'].name}: {len(train)} training, {len(valid)} validation frames "
          f"(indices {[int(f.info['external_source'].rsplit('#', 1)[1]) for f in valid]})")
    rows = {}
    if args.allegro_pol:
        rows["Allegro-pol (its own predictions)"] = cross_code_errors(allegro_pol_predictions(args.allegro_pol, valid),
                                                                     valid)
    for path in args.models:
        model = load(path)
        rows[path] = cross_code_errors(model_predictions(model, valid), valid)
        if args.md_structure:
            members = getattr(model, "members", [model])
            rows[path]["md_steps_per_s_one_member"] = md_steps_per_second(members[0], args.md_structure, args.md_steps)
            if len(members) > 1:
                rows[path]["md_steps_per_s_ensemble"] = md_steps_per_second(model, args.md_structure, args.md_steps)
    width = max(len(name) for name in rows)
    print(f"{'model':{width}}  " + "  ".join(f"{column:>14.14}" for column in COLUMNS))
    for name, row in rows.items():
        print(f"{name:{width}}  " + "  ".join(f"{row[column]:14.4g}" for column in COLUMNS)
              + "".join(f"  {key} {value:.2f}" for key, value in row.items() if key.startswith("md_")))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
