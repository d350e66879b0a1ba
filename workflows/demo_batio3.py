"""The second demo (`make demo-batio3`): active learning of cubic BaTiO3 from scratch, then a report folder.

    python -m polmodel.workflows.demo_batio3 [--profile polmodel] [--report report-batio3] [--new]

On the profile made by `make setup` (core.sqlite_dos + ZeroMQ broker, `pw@localhost`, `polmodel@localhost`, the
ld1.x pseudopotential family) it starts the daemon if needed, submits the `polmodel.active_learning` loop (or
finds the one a previous run submitted: interrupting this script never stops the loop, and re-running it follows
the same loop again), prints the loop's progress, and finally writes ./report-batio3: the learning curve, the parity
plots of the last training (E, F, P, Z*), the model's Born charges against DFT, and a P–E loop of the final
model under a cyclic field (one more MdCalculation, so the loop is in the provenance graph too).

The parameters below are sized for about 40 minutes on 2 cores (benchmarks/README.md "Demos"), DFT being most of it:
5-atom cells, 'fast' DFT with a 3x3x3 k-point grid and 75 % cutoffs (Born charges to a few tenths of e,
docs/conventions.md). The two given cells (ideal and randomly displaced) get the full field response (zero-field
SCF, Berry-phase and finite-field runs: 10 pw.x runs each), so that the first model already has Born charges and
polarizability to learn; their 12 strained and displaced copies get one SCF each (DP-GEN's start). Each iteration
trains an ensemble of 3 small models, explores with 150-step MD under 2 field protocols at 2 temperatures from
both cells, and labels at most 2 candidates within 20 pw.x runs (the most uncertain polarization gets the full
response, the other the cheap tier at its field). Iteration 3 trains, explores and ends the loop (max_iterations).
"""
import json
import pathlib
import sys
import time

import numpy as np

from polmodel.workflows.demo_runner import (copy_parity_plots, find_marked_loop, follow, load_demo_profile,
                                            parse_demo_arguments, plot_validation_maes, pyplot, run_demo_loop,
                                            say)

DEMO_EXTRA = "polmodel_demo"          # node extra that marks the demo's loop (value: DEMO_VERSION)
DEMO_VERSION = 4                       # 4: full labels of the given cells (a loop of an older version is not followed)
PE_LOOP_EXTRA = "polmodel_demo_pe_loop"
LATTICE = 4.00                        # Å, cubic BaTiO3 (the cell of docs/design.md "DFT labels")

DEMO = {
    "displacements": [0.0, 0.04],     # Å: the ideal cell and one randomly displaced copy
    # 'fast' with a 3x3x3 grid and 75 % of the recommended cutoffs: ph.x puts Born charges within a few tenths
    # of e at this k density, and they depend far less on the cutoff.
    "label": {"protocol": "fast", "overrides": {"scf": {"kpoints_distance": 0.6},
                                                "meta_parameters": {"cutoff_factor": 0.75}}},
    # Born charges from the start: the MD frames that get full labels may be ones DFT cannot label
    "given_tier": "full",
    "ensemble_size": 3,
    # Patience 100 epochs: members can sit on a plateau for tens of epochs before they find the Born charges.
    # Training stops on epochs and patience only, never on wall time, which would make the dataset depend on the
    # machine's load; MD is 150 steps to fit the demo's time (benchmarks/README.md "Demos").
    "train": {"epochs": 300, "validation_fraction": 0.15,
              "hyperparameters": {"num_features": 8, "lmax": 2, "num_layers": 1, "num_radial": 6, "radial_hidden": 16,
                                  "readout_hidden": 8, "cutoff": 4.5, "batch_size": 4, "patience": 100}},
    "md": {"steps": 150, "timestep": 2.0, "thermostat": "langevin", "interval": 10, "born_spread": True,
           "friction": 0.02},
    "fields": [{"kind": "static", "vector": [0.0, 0.0, 0.05]},
               {"kind": "cosine", "amplitude": 0.1, "period_fs": 200.0, "axis": [0, 0, 1]}],
    "temperatures": [100.0, 300.0],
    # min_distance: the shortest bond of BaTiO3 is Ti–O at 2.0 Å. The untrained first ensembles agree (force spread
    # below the upper level) on MD frames with O–Ti or O–O at 1.3–1.4 Å, which DFT finds metallic (gaps of −0.13
    # and −0.38 eV, against 1.6–2.0 eV for the copies): a label refused after its first SCF, so never labelled.
    "selection": {"force_lower": 0.05, "force_upper": 0.6, "polarization_threshold": 0.002,
                  "born_charge_threshold": 0.3, "max_candidates": 2, "similarity_tolerance": 0.02,
                  "min_distance": 1.6},
    "candidate_fraction_threshold": 0.1,
    "max_iterations": 3,
    "pe_loop": {"steps": 1000, "timestep": 2.0, "thermostat": "langevin", "interval": 5, "temperature": 50.0,
                "friction": 0.02, "field": {"kind": "cosine", "amplitude": 0.2, "period_fs": 1000.0,
                                            "axis": [0, 0, 1]}},
}


def batio3_structures():
    from aiida import orm
    from ase import Atoms

    structures = {}
    rng = np.random.default_rng(1)
    for index, displacement in enumerate(DEMO["displacements"]):
        atoms = Atoms("BaTiO3", cell=np.eye(3) * LATTICE, pbc=True,
                      scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        atoms.positions += rng.normal(scale=displacement, size=atoms.positions.shape)
        structures[f"batio3_{index}"] = orm.StructureData(ase=atoms)
    return structures


def demo_inputs():
    """Inputs of the demo's ActiveLearningWorkChain (codes and family as `make setup` registers them)."""
    from aiida import orm

    from polmodel.plugins.pseudos import DEFAULT_PSEUDO_FAMILY

    polmodel_code = orm.load_code("polmodel@localhost")
    return {
        "structures": batio3_structures(),
        "initial_data": {"given_tier": orm.Str(DEMO["given_tier"])},
        "label": {
            "code": orm.load_code("pw@localhost"),
            "protocol": orm.Str(DEMO["label"]["protocol"]),
            "overrides": orm.Dict(DEMO["label"]["overrides"]),
            "pseudo_family": orm.Str(DEFAULT_PSEUDO_FAMILY),
        },
        "train": {"train": {"code": polmodel_code, "parameters": orm.Dict(DEMO["train"])},
                  "ensemble_size": orm.Int(DEMO["ensemble_size"])},
        "explore": {"md": {"code": polmodel_code}, "parameters": orm.Dict(DEMO["md"]),
                    "fields": orm.List(DEMO["fields"]), "temperatures": orm.List(DEMO["temperatures"]),
                    "selection": orm.Dict(DEMO["selection"])},
        "candidate_fraction_threshold": orm.Float(DEMO["candidate_fraction_threshold"]),
        "max_iterations": orm.Int(DEMO["max_iterations"]),
        "metadata": {"label": "polmodel demo: BaTiO3 active learning"},
    }


def find_demo_loop():
    """The most recent loop this demo submitted, or None."""
    return find_marked_loop(DEMO_EXTRA, DEMO_VERSION)


def submit_pe_loop(model, structure):
    """The P–E loop MdCalculation of the final model (found again through its extra)."""
    from aiida import orm
    from aiida.engine import submit

    from polmodel.plugins.calculations import MdCalculation

    builder = orm.QueryBuilder().append(orm.CalcJobNode, filters={f"extras.{PE_LOOP_EXTRA}": model.uuid})
    existing = builder.first(flat=True)
    if existing is not None and not (existing.is_terminated and not existing.is_finished_ok):
        return existing
    node = submit(MdCalculation, model=model, structure=structure, parameters=orm.Dict(DEMO["pe_loop"]),
                  code=orm.load_code("polmodel@localhost"), metadata={"label": "P-E loop of the final model"})
    node.base.extras.set(PE_LOOP_EXTRA, model.uuid)
    return node


# ----------------------------------------------------------------------------------------------- report
def write_learning_curve(loop, directory):
    from polmodel.workflows.provenance import format_learning_curve, learning_curve

    records = learning_curve(loop)
    (directory / "learning_curve.txt").write_text(format_learning_curve(records) + "\n")
    (directory / "learning_curve.json").write_text(json.dumps(records, indent=2))
    if not records:
        return
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    iterations = [record["iteration"] for record in records]
    plot_validation_maes(left, iterations, records)
    left.set_xlabel("iteration")
    right.plot(iterations, [record["candidate_fraction"] for record in records], "o-", label="candidates")
    right.plot(iterations, [record["failed_fraction"] for record in records], "s-", label="failed")
    right.axhline(records[-1]["threshold"], color="grey", ls=":", label="threshold")
    right.set_xlabel("iteration")
    right.set_ylabel("fraction of explored frames")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "learning_curve.png", dpi=120)
    plt.close(figure)


def write_born_charges_against_dft(model, dataset, directory):
    """Model Z* (ensemble mean) against the DFT Z* of every labelled frame that has them: frames the model trained on
    (the validation split aside), so this shows the fit, not an accuracy on unseen structures."""
    from polmodel.data.frames import frame_born_charges, frame_efield
    from polmodel.dynamics.calculator import PolCalculator

    calculator = PolCalculator(model.load())
    rows, dft_all, model_all = [], [], []
    for atoms in dataset.get_atoms():
        reference = frame_born_charges(atoms)
        efield = frame_efield(atoms)
        if reference is None or (efield is not None and np.any(np.asarray(efield) != 0)):
            continue
        probe = atoms.copy()
        probe.calc = calculator
        predicted = np.asarray(calculator.get_property("born_effective_charges", probe)).reshape(len(atoms), 3, 3)
        dft_all.append(reference.reshape(-1))
        model_all.append(predicted.reshape(-1))
        for index, symbol in enumerate(atoms.get_chemical_symbols()):
            rows.append((symbol, index, np.trace(reference[index]) / 3, np.trace(predicted[index]) / 3))
    lines = ["Born charges of the dataset's labelled frames (training set: the fit, not a held-out accuracy)",
             f"{'atom':>6} {'index':>5} {'Z*_DFT (trace/3)':>18} {'Z*_model':>10}"]
    lines += [f"{symbol:>6} {index:>5} {dft:18.3f} {pred:10.3f}" for symbol, index, dft, pred in rows]
    if dft_all:
        dft_all, model_all = np.concatenate(dft_all), np.concatenate(model_all)
        lines.append(f"MAE over all components: {np.mean(np.abs(dft_all - model_all)):.3f} e "
                     f"({len(dft_all)} components)")
        plt = pyplot()
        figure, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(dft_all, model_all, ".", ms=4)
        limits = [min(dft_all.min(), model_all.min()) - 0.5, max(dft_all.max(), model_all.max()) + 0.5]
        ax.plot(limits, limits, "k--", lw=0.7)
        ax.set_xlabel("Z* DFT (e)")
        ax.set_ylabel("Z* model (e)")
        ax.set_title("Born charges, zero-field frames")
        figure.tight_layout()
        figure.savefig(directory / "born_charges_vs_dft.png", dpi=120)
        plt.close(figure)
    (directory / "born_charges_vs_dft.txt").write_text("\n".join(lines) + "\n")


def write_pe_loop(md_node, directory):
    from polmodel.analysis.observables import NoSwitchingError, hysteresis_loop, plot_hysteresis

    if not md_node.is_finished_ok:
        (directory / "pe_loop.txt").write_text(f"P-E loop MD {md_node.pk} failed: exit {md_node.exit_status}\n")
        return
    trajectory = md_node.outputs.trajectory
    try:
        loop = hysteresis_loop(trajectory.get_array("efield"), trajectory.get_array("polarization"))
    except NoSwitchingError as error:   # a model that does not switch at the demo's field is a result to report
        (directory / "pe_loop.txt").write_text(f"P-E loop MD {md_node.pk}: no hysteresis: {error}\n")
        return
    plot_hysteresis(loop, directory / "pe_loop.png")
    summary = {key: value for key, value in loop.items() if key not in ("field", "polarization")}
    (directory / "pe_loop.json").write_text(json.dumps(summary, indent=2))


def write_report(loop, pe_node, directory):
    directory.mkdir(parents=True, exist_ok=True)
    model, dataset = loop.outputs.model, loop.outputs.dataset
    write_learning_curve(loop, directory)
    plots = copy_parity_plots(model, directory)
    write_born_charges_against_dft(model, dataset, directory)
    write_pe_loop(pe_node, directory)
    (directory / "README.txt").write_text(
        f"polmodel demo report\n"
        f"active-learning loop: {loop.pk} ({loop.uuid}), exit status {loop.exit_status}\n"
        f"final model: ModelData {model.pk} ({model.kind}, {model.ensemble_size} members, sha256 {model.sha256})\n"
        f"dataset: FramesData {dataset.pk}, {dataset.count} frames\n"
        f"P-E loop MD: {pe_node.pk}\n"
        f"parity plots: {', '.join(plots) or 'none'}\n"
        f"provenance: polmodel provenance pw-runs {model.pk};  polmodel provenance graph {model.pk}\n")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_demo_arguments(argv, prog="python -m polmodel.workflows.demo_batio3",
                                description=__doc__.splitlines()[0], report="report-batio3")
    if not load_demo_profile(args.profile):
        return 2
    from aiida.engine import submit

    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    started = time.time()
    loop = run_demo_loop(lambda: submit(ActiveLearningWorkChain, **demo_inputs()), extra=DEMO_EXTRA,
                         version=DEMO_VERSION, new=args.new, poll=args.poll)
    if loop is None:
        return 1
    structure = next(iter(sorted(loop.inputs.structures.items())))[1]
    pe_node = submit_pe_loop(loop.outputs.model, structure)
    say(f"P-E loop of the final model: MdCalculation<{pe_node.pk}>")
    pe_node = follow(pe_node, min(args.poll, 5.0))
    report = pathlib.Path(args.report).resolve()
    write_report(loop, pe_node, report)
    say(f"report written to {report} ({(time.time() - started) / 60:.1f} min in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
