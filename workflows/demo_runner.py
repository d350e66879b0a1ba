"""What both demos do around their loop: the command line, the AiiDA profile, the daemon, submitting the loop or
finding the one a previous run submitted (through a node extra), and following it until it ends."""
import argparse
import os
import pathlib
import sys
import time

# aiida finds `verdi` (which starts the daemon) on PATH when it is first imported; it lives next to this
# interpreter in the project's venv, which need not be activated.
_VENV_BIN = str(pathlib.Path(sys.executable).parent)
if _VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


def say(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_demo_arguments(argv, *, prog, description, report):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--profile", default="polmodel", help="AiiDA profile (default: polmodel, made by make setup)")
    parser.add_argument("--report", default=report, help=f"report folder (default: ./{report})")
    parser.add_argument("--new", action="store_true", help="submit a new loop even if one exists")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between progress checks")
    return parser.parse_args(argv)


def load_demo_profile(name):
    """Load the profile; False (and a line on stderr) when it does not exist."""
    from aiida import load_profile
    from aiida.common.exceptions import ProfileConfigurationError

    try:
        load_profile(name)
    except ProfileConfigurationError as error:
        print(f"demo: profile `{name}` not found ({error}); run `make setup` first", file=sys.stderr)
        return False
    return True


def ensure_daemon():
    from aiida.engine.daemon.client import get_daemon_client

    client = get_daemon_client()
    if not client.is_daemon_running:
        say("starting the AiiDA daemon (1 worker)")
        client.start_daemon(number_workers=1)
    return client


def follow(node, poll_seconds):
    """Print the node's new report lines (its own and its children's) until it terminates."""
    from aiida import orm

    seen = set()
    started = time.time()
    while True:
        node = orm.load_node(node.pk)
        pks = [node.pk] + [child.pk for child in node.called_descendants]
        builder = orm.QueryBuilder().append(orm.Log, filters={"dbnode_id": {"in": pks}, "levelname": "REPORT"},
                                            project=["id", "time", "message", "dbnode_id"], tag="log")
        builder.order_by({"log": {"id": "asc"}})
        for log_id, logged_at, message, dbnode in builder.all():
            if log_id not in seen:
                seen.add(log_id)
                print(f"  {logged_at:%H:%M:%S} <{dbnode}> {message}", flush=True)
        if node.is_terminated:
            say(f"{node.process_label}<{node.pk}> {node.process_state.value} (exit status {node.exit_status}) after "
                f"{(time.time() - started) / 60:.1f} min of following")
            return node
        time.sleep(poll_seconds)


def find_marked_loop(extra, version):
    """The most recent workchain marked with the extra `extra` = `version`, or None."""
    from aiida import orm

    builder = orm.QueryBuilder()
    builder.append(orm.WorkChainNode, filters={f"extras.{extra}": version}, tag="loop")
    builder.order_by({"loop": {"ctime": "desc"}})
    return builder.first(flat=True)


def run_demo_loop(submit_new, *, extra, version, new, poll):
    """Follow the demo's loop to its end: the one a previous run submitted (unless `new`, or it failed), else
    `submit_new()`'s, marked with the extra. Returns the finished node, or None (and a line on stderr) if it
    failed. Interrupting this never stops the loop: the daemon runs it."""
    ensure_daemon()
    loop = None if new else find_marked_loop(extra, version)
    if loop is not None and loop.is_terminated and not loop.is_finished_ok:
        say(f"the previous demo loop {loop.pk} ended with exit status {loop.exit_status}: {loop.exit_message}; "
            f"submitting a new one (see `verdi process report {loop.pk}`)")
        loop = None
    if loop is None:
        loop = submit_new()
        loop.base.extras.set(extra, version)
        say(f"submitted the loop: {loop.process_label}<{loop.pk}>")
    else:
        say(f"continuing the demo loop {loop.process_label}<{loop.pk}> ({loop.process_state.value})")
    say("progress below; Ctrl-C stops following only (the daemon keeps working; re-run to follow again)")
    loop = follow(loop, poll)
    if not loop.is_finished_ok:
        print(f"demo: the loop failed: {loop.exit_message}; see `verdi process report {loop.pk}`", file=sys.stderr)
        return None
    return loop


# --- report pieces both demos write ---
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def copy_parity_plots(model, directory):
    """The parity plots of the training that made `model` (ModelData), copied into `directory`; their names."""
    training = model.creator
    if training is None or "plots" not in training.outputs:
        return []
    plots = training.outputs.plots
    names = plots.base.repository.list_object_names()
    for name in names:
        (directory / f"parity_{name}").write_bytes(plots.base.repository.get_object_content(name, mode="rb"))
    return names


def plot_validation_maes(axes, steps, records):
    """Each iteration's validation MAE per learning-curve quantity (log scale) against `steps`."""
    import numpy as np

    from polmodel.workflows.provenance import LEARNING_CURVE_QUANTITIES

    for quantity in LEARNING_CURVE_QUANTITIES:
        values = [record["validation"].get(quantity, {}).get("mae", np.nan) for record in records]
        if np.any(np.isfinite(values)):
            axes.semilogy(steps, values, "o-", label=quantity)
    axes.set_ylabel("validation MAE (eV/atom, eV/Å, e·Å/atom, e)")
    axes.legend(fontsize=7)
