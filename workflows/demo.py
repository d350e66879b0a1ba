"""The demo (`make demo`): α-quartz, going on from the shipped campaign, then a report folder.

    python -m polmodel.workflows.demo [--profile polmodel] [--report report] [--new]

On the profile made by `make setup` (core.sqlite_dos + ZeroMQ broker, `pw@localhost`, `polmodel@localhost`, the
ld1.x pseudopotential family) it
1. imports `data/quartz/campaign.aiida` (seven active-learning loops with every pw.x run, held-out labels, the
   ph.x reference) unless the profile has it;
2. submits one more loop that goes on from the campaign's converged loop 3 (`get_builder_continuing`: its
   dataset, its ensemble as the warm start) at a new exploration stage, 600 K: loop 3 was converged at 300 K,
   so its ensemble disagrees on some hotter frames, and those are labelled with real pw.x, trained on, and
   explored again (two iterations, DEMO below); interrupting this script never stops the loop, and re-running it
   follows the same loop again;
3. writes ./report: the learning curve of all four loops, the parity plots of the last training, the errors on
   held-out quartz labels (frames no loop labelled), the model against ph.x (Z*, ε∞, harmonic ε0, the IR-active
   Γ modes), and the IR spectrum of a short NVE run of the new model at 300 K beside the harmonic ph.x spectrum.

Sized for about 25 minutes on 2 cores (README: measured time). BaTiO3 from scratch is the second demo,
`make demo-batio3` (workflows/demo_batio3.py).
"""
import json
import pathlib
import sys
import time

import numpy as np

from polmodel.workflows.demo_runner import (copy_parity_plots, find_marked_loop, load_demo_profile,
                                            parse_demo_arguments, plot_validation_maes, pyplot, run_demo_loop,
                                            say)

QUARTZ_DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "quartz"
CAMPAIGN_ARCHIVE = QUARTZ_DATA / "campaign.aiida"
# P(t) of 20 ps NVE at 300 K of loop 3's ensemble (data/quartz/loop3_ensemble.pt) on 5x5x5 cells
# (benchmarks/quartz_md_ir.py)
SHIPPED_MD = QUARTZ_DATA / "md_nve_1125_atoms.polarization.csv.gz"
CAMPAIGN_LOOP = "0a57ec92-bed2-4340-9943-26b15a2a87f3"   # loop 3, converged at 300 K (data/quartz/README.md)
DEMO_EXTRA = "polmodel_quartz_demo"   # node extra that marks the demo's loop (value: DEMO_VERSION)
DEMO_VERSION = 2

DEMO = {
    # appended to the campaign's schedule (300 K at zero field, 300 K under static fields up to 0.03 V/Å)
    "stage": {"temperatures": [600.0], "field_amplitude": 0.03, "steps": 400},
    # two trainings: the warm-started ensemble explores 600 K and its candidates are labelled; the second
    # training includes them and explores again (the last iteration labels nothing)
    "max_iterations": 2,
    # warm start from the campaign's ensemble: 60 epochs fit the demo's time (benchmarks/README.md "Demos")
    "epochs": 60,
    # pw.x runs per labelling: at most one full response (10 runs) beside the cheap tiers
    "label_budget": 14,
    # the protocols' lower-level factor: a level in spread units is factor × the ensemble's mean spread on its
    # validation frames (docs/design.md "Trust window"); the campaign's 2.0 was chosen when the level was 2 × the
    # per-component force RMSE, 2–4× lower, and at 2.0 now the loop takes 4 of 80 frames at 600 K and stops
    "force_lower_factor": 1.0,
    "md_ir": {"repeat": 2, "equilibration_steps": 250, "nve_steps": 2000, "timestep_fs": 2.0, "temperature": 300.0},
}


def import_campaign():
    """Import the shipped campaign unless this profile already has its loop; returns the loop node."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_node(CAMPAIGN_LOOP)
    except NotExistent:
        from aiida.tools.archive import import_archive

        say(f"importing {CAMPAIGN_ARCHIVE.name} ({CAMPAIGN_ARCHIVE.stat().st_size / 1e6:.1f} MB)")
        import_archive(CAMPAIGN_ARCHIVE)
        return orm.load_node(CAMPAIGN_LOOP)


def demo_builder(campaign):
    """The continuing loop: the campaign's loop, one stage hotter, with this machine's codes."""
    from aiida import orm

    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    builder = ActiveLearningWorkChain.get_builder_continuing(campaign, max_iterations=DEMO["max_iterations"],
                                                             pw_code="pw@localhost",
                                                             polmodel_code="polmodel@localhost")
    schedule = campaign.inputs.schedule.get_list() + [DEMO["stage"]]
    builder.schedule = orm.List(schedule)
    builder.initial_stage = orm.Int(len(schedule) - 1)
    builder.label_budget = orm.Int(DEMO["label_budget"])
    selection = campaign.inputs.explore.selection.get_dict()
    builder.explore.selection = orm.Dict({**selection, "force_lower_factor": DEMO["force_lower_factor"]})
    train = campaign.inputs.train.train.parameters.get_dict()
    builder.train.train.parameters = orm.Dict({**train, "epochs": DEMO["epochs"]})
    builder.metadata.label = "polmodel demo: α-quartz at 600 K, going on from the shipped campaign"
    return builder


def find_demo_loop():
    return find_marked_loop(DEMO_EXTRA, DEMO_VERSION)


def previous_loop(loop):
    """The loop `loop` went on from (its initial_frames came out of that loop), or None."""
    if "initial_frames" not in loop.inputs:
        return None
    creator = loop.inputs.initial_frames.creator
    caller = creator.caller if creator is not None else None
    return caller if caller is not None and caller.process_label == loop.process_label else None


# ----------------------------------------------------------------------------------------------- report
def write_learning_curve(loop, directory):
    """Every iteration of `loop` and the loops it went on from, oldest first, numbered across loops."""
    from polmodel.workflows.provenance import learning_curve

    chain = []
    while loop is not None:
        chain.insert(0, loop)
        loop = previous_loop(loop)
    records = []
    for number, node in enumerate(chain, start=1):
        for record in learning_curve(node):
            records.append({"loop": number, "loop_uuid": node.uuid, **record})
    (directory / "learning_curve.json").write_text(json.dumps(records, indent=2))
    lines = [f"{'#':>2} {'loop':>4} {'stage':>5} {'frames':>6} {'F MAE eV/Å':>10} {'Z* MAE e':>9} {'accurate':>8} "
             f"{'selected':>8}"]
    for number, record in enumerate(records, start=1):
        validation = record["validation"]
        lines.append(f"{number:>2} {record['loop']:>4} {record['stage']:>5} {record['dataset_size']:>6} "
                     f"{validation.get('forces', {}).get('mae', np.nan):10.4f} "
                     f"{validation.get('born_effective_charges', {}).get('mae', np.nan):9.4f} "
                     f"{record['accurate_fraction']:8.2f} {record['num_selected']:>8}")
    (directory / "learning_curve.txt").write_text(
        "validation MAEs of each iteration's training (its own validation split), the accurate fraction of its "
        "exploration, and how many frames it selected for labelling (the budget may label fewer)\n"
        + "\n".join(lines) + "\n")
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    steps = np.arange(1, len(records) + 1)
    plot_validation_maes(left, steps, records)
    left.set_xlabel("iteration (all loops)")
    right.plot(steps, [record["accurate_fraction"] for record in records], "o-", label="accurate")
    right.plot(steps, [record["dataset_size"] / max(r["dataset_size"] for r in records) for record in records],
               "s-", label="dataset size (of the last)")
    right.set_xlabel("iteration (all loops)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "learning_curve.png", dpi=120)
    plt.close(figure)
    return records


def write_heldout_errors(model_path, directory):
    from polmodel import load
    from polmodel.training.evaluation import evaluate_frames
    from polmodel.workflows.quartz import heldout_frames

    frames, labels = heldout_frames()
    result = {"structures": "quartz/heldout: 300 K MD frames no loop selected, strained cells (9 atoms each)",
              "labels": labels, **evaluate_frames(load(model_path), frames, directory / "heldout_parity")}
    (directory / "heldout_errors.json").write_text(json.dumps(result, indent=2))
    return result


def md_ir_spectrum(model_path, structure, directory):
    """Langevin equilibration, then NVE at zero field on a small supercell; the IR spectrum of its dipole series
    (harmonic quantum correction applied once)."""
    from dataclasses import replace

    from polmodel import PolCalculator, load
    from polmodel.dynamics.fields import StaticField
    from polmodel.dynamics.md import MDSettings, run_md
    from polmodel.dynamics.polarization_log import polarization_log_path

    settings = DEMO["md_ir"]
    calculator = PolCalculator(load(model_path))
    atoms = structure.get_ase().repeat((settings["repeat"],) * 3)
    equilibration = MDSettings(steps=settings["equilibration_steps"], timestep_fs=settings["timestep_fs"],
                               temperature_K=settings["temperature"], thermostat="langevin", friction=0.01,
                               interval=500, spread_threshold=None)
    atoms = run_md(atoms, calculator, StaticField(np.zeros(3)), equilibration,
                   trajectory_path=directory / "md_equilibration.xyz", progress=False)
    run_md(atoms, calculator, StaticField(np.zeros(3)),
           replace(equilibration, steps=settings["nve_steps"], thermostat="nve"),
           trajectory_path=directory / "md_nve.xyz", progress=False)
    return spectrum_of_polarization_log(polarization_log_path(directory / "md_nve.xyz"))


def spectrum_of_polarization_log(path, skip_fs=0.0):
    """The IR spectrum (ir_absorption_from_dipoles) of an NVE run's P(t) file, after `skip_fs` of it; a
    thermostatted or field-driven run is refused (DrivenTrajectoryError), as `polmodel analyze ir` refuses it."""
    from ase.formula import Formula

    from polmodel.analysis import observables
    from polmodel.analysis.spectra import ir_absorption_from_dipoles
    from polmodel.dynamics.polarization_log import polarization_frames

    frames = polarization_frames(path)
    observables.check_equilibrium_run(observables.trajectory_conditions(frames), allow_thermostat=False)
    times = observables.trajectory_series(frames, "time_fs")
    frames = [frame for frame, time in zip(frames, times) if time >= times[0] + skip_fs]
    times = times[times >= times[0] + skip_fs]
    temperature = float(np.mean(observables.trajectory_series(frames, "temperature")))
    result = ir_absorption_from_dipoles(observables.trajectory_series(frames, "dipole"),
                                        observables.uniform_timestep(times),
                                        float(np.mean([frame.get_volume() for frame in frames])), temperature)
    return {"atoms": len(Formula(frames[0].info["formula"])), "nve_ps": float(times[-1] - times[0]) / 1000,
            "temperature_K": temperature, **result}


def write_ir_comparison(spectrum, dfpt, directory, max_wavenumber=1400.0):
    """The demo's MD spectrum beside the harmonic one of ph.x (`dfpt`, a DfptWorkChain with Γ phonons) and, when
    shipped, the campaign ensemble's long run."""
    from polmodel.analysis.observables import spectrum_peaks
    from polmodel.workflows.quartz import harmonic_dfpt_spectrum

    keep = spectrum["wavenumber"] <= max_wavenumber
    wavenumber, absorption = spectrum["wavenumber"][keep], spectrum["absorption"][keep]
    harmonic = harmonic_dfpt_spectrum(dfpt, wavenumber, fwhm=spectrum["resolution_cm-1"])
    peaks = spectrum_peaks(wavenumber, absorption, prominence=0.05)
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(7, 3.6))
    shipped = spectrum_of_polarization_log(SHIPPED_MD, skip_fs=1000.0) if SHIPPED_MD.is_file() else None
    if shipped is not None:
        inside = shipped["wavenumber"] <= max_wavenumber
        shipped_wavenumber, shipped_absorption = shipped["wavenumber"][inside], shipped["absorption"][inside]
        ax.plot(shipped_wavenumber, shipped_absorption, color="0.6", lw=0.8,
                label=f"shipped ensemble, NVE MD, {shipped['atoms']} atoms, {shipped['nve_ps']:.0f} ps")
    ax.plot(wavenumber, absorption, label=f"new model NVE MD, {spectrum['atoms']} atoms, {spectrum['nve_ps']:g} ps, "
                                          f"{spectrum['temperature_K']:.0f} K")
    ax.plot(wavenumber, harmonic, "--", label="ph.x harmonic (Γ modes, same line width)")
    ax.set_xlabel("wavenumber (cm⁻¹)")
    ax.set_ylabel("absorption α n (cm⁻¹)")
    ax.set_xlim(0, max_wavenumber)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "ir_spectrum.png", dpi=120)
    plt.close(figure)
    summary = {key: spectrum[key] for key in ("atoms", "nve_ps", "temperature_K", "resolution_cm-1", "statement")}
    summary["peaks_cm-1"] = [round(float(peak), 1) for peak in peaks[:8]]
    summary["integrated_absorption_cm-2"] = {"model_md": float(np.trapezoid(absorption, wavenumber)),
                                             "ph.x_harmonic": float(np.trapezoid(harmonic, wavenumber))}
    if shipped is not None:
        shipped_peaks = spectrum_peaks(shipped_wavenumber, shipped_absorption, prominence=0.05)
        summary["shipped_run"] = {"file": str(SHIPPED_MD), "atoms": shipped["atoms"], "nve_ps": shipped["nve_ps"],
                                  "temperature_K": shipped["temperature_K"],
                                  "peaks_cm-1": [round(float(peak), 1) for peak in shipped_peaks[:8]]}
    (directory / "ir_spectrum.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_report(loop, directory):
    from polmodel.workflows.quartz import dfpt_reference, reference_dfpt

    directory.mkdir(parents=True, exist_ok=True)
    model = loop.outputs.model
    model_path = directory / "model.pt"
    model.write(model_path)
    write_learning_curve(loop, directory)
    plots = copy_parity_plots(model, directory)
    say("report: held-out errors and the ph.x comparison")
    heldout = write_heldout_errors(model_path, directory)
    dfpt = reference_dfpt()
    reference = dfpt_reference(model_path, dfpt)
    (directory / "dfpt_reference.json").write_text(json.dumps(reference, indent=2))
    say(f"report: NVE MD for the IR spectrum ({DEMO['md_ir']['nve_steps']} steps)")
    spectrum = write_ir_comparison(md_ir_spectrum(model_path, dfpt.inputs.structure, directory), dfpt, directory)
    errors = heldout["errors"]
    previous = previous_loop(loop)
    lines = [
        "polmodel demo report: α-quartz",
        f"loop: {loop.pk} ({loop.uuid}), exit status {loop.exit_status}; went on from {previous.uuid}",
        f"final model: ModelData {model.pk} ({model.ensemble_size} members, sha256 {model.sha256})",
        f"dataset: FramesData {loop.outputs.dataset.pk}, {loop.outputs.dataset.count} frames (the campaign's "
        f"loop ended with {previous.outputs.dataset.count})",
        "",
        f"held-out errors ({heldout['num_frames']} frames no loop labelled; MAE): "
        + ", ".join(f"{name} {value['mae']:.4g}" for name, value in errors.items()),
        f"ε∞ ⊥/∥: model {_pair(reference['epsilon_inf']['model'])}, ph.x {_pair(reference['epsilon_inf']['ph.x'])}",
        f"Z* MAE against ph.x: {reference['born_mae']:.3f} e",
    ]
    if "gamma" in reference:
        gamma = reference["gamma"]
        lines.append(f"harmonic ε0 ⊥/∥: model {_pair(gamma['epsilon_static_harmonic']['model'])}, "
                     f"ph.x {_pair(gamma['epsilon_static_harmonic']['ph.x'])}")
        pairs = dict.fromkeys(f"{mode['ph.x_cm-1']:.0f}→{mode['model_cm-1']:.0f}" for mode in gamma["ir_active_modes"])
        lines.append("IR-active Γ modes (cm⁻¹, ph.x → model; E pairs once): " + ", ".join(pairs))
    lines += [f"MD IR peaks (cm⁻¹, {spectrum['atoms']} atoms, {spectrum['nve_ps']:g} ps NVE): "
              + ", ".join(f"{peak:.0f}" for peak in spectrum["peaks_cm-1"]),
              f"parity plots: {', '.join(plots) or 'none'}",
              f"provenance: polmodel provenance pw-runs {model.pk};  polmodel provenance graph {model.pk}"]
    (directory / "README.txt").write_text("\n".join(lines) + "\n")
    return lines


def _pair(values):
    return "–" if values is None else "/".join(f"{value:.2f}" for value in values)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_demo_arguments(argv, prog="python -m polmodel.workflows.demo", description=__doc__.splitlines()[0],
                                report="report")
    if not load_demo_profile(args.profile):
        return 2
    from aiida.engine import submit

    started = time.time()
    campaign = import_campaign()
    loop = run_demo_loop(lambda: submit(demo_builder(campaign)), extra=DEMO_EXTRA, version=DEMO_VERSION,
                         new=args.new, poll=args.poll)
    if loop is None:
        return 1
    report = pathlib.Path(args.report).resolve()
    for line in write_report(loop, report):
        print(line)
    say(f"report written to {report} ({(time.time() - started) / 60:.1f} min in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
