"""The real loop: AlAs (2 atoms, tiny cutoff and k-points), real pw.x labels, real training, real ensemble MD,
submitted to a running daemon that is stopped and started again mid-iteration, then the provenance questions answered
on the graph it left. It runs on both kinds of profile: the embedded one (core.sqlite_dos + core.zeromq, the default
of `make setup`) and the production one (core.psql_dos + core.rabbitmq, setup_profiles/profile_production.yaml)."""
import dataclasses
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiida import orm
from aiida.common.links import LinkType

from fixtures_al import TINY_TRAINING
from test_setup_profiles import throwaway_postgres_database  # noqa: F401  (fixture, requested by `loop_profile`)

pytestmark = [pytest.mark.aiida, pytest.mark.dft, pytest.mark.daemon, pytest.mark.slow]

#: RabbitMQ of the production profile: aiida's defaults (guest/guest on localhost), as profile_production.yaml.
RABBITMQ_ADDRESS = ("127.0.0.1", 5672)


@dataclasses.dataclass
class LoopProfile:
    """A loaded profile and the client of its running daemon."""
    profile: object
    daemon_client: object


@pytest.fixture(params=["embedded", pytest.param("production", marks=pytest.mark.postgres)])
def loop_profile(request, aiida_profile, aiida_config, aiida_profile_factory, tmp_path):
    """The profile the loop runs on, loaded, with its daemon running.

    `embedded`: the session's profile (core.sqlite_dos + core.zeromq). `production`: a profile of its own on a
    throw-away PostgreSQL database and RabbitMQ on localhost (trust authentication, guest/guest), loaded for this test
    only; the nodes, computer and codes the test makes live there. Request it before any fixture that stores nodes.
    """
    if request.param == "embedded":
        yield LoopProfile(aiida_profile, request.getfixturevalue("started_daemon_client"))
        return

    from aiida.engine.daemon.client import DaemonNotRunningException, get_daemon_client

    try:
        socket.create_connection(RABBITMQ_ADDRESS, timeout=5).close()
    except OSError as exception:
        pytest.skip(f"no RabbitMQ on {RABBITMQ_ADDRESS[0]}:{RABBITMQ_ADDRESS[1]}: {exception}")
    database = request.getfixturevalue("throwaway_postgres_database")
    storage = {"database_engine": "postgresql_psycopg", "database_hostname": "localhost", "database_port": 5432,
               "database_name": database["name"], "database_username": database["username"],
               "database_password": database["password"], "repository_uri": (tmp_path / "repository").as_uri()}
    with aiida_profile_factory(aiida_config, storage_backend="core.psql_dos", storage_config=storage,
                               broker_backend="core.rabbitmq") as profile:
        # as the session profile: two busy cores make circus' 2 s default too short to start and stop the daemon
        aiida_config.set_option("daemon.timeout", 30, scope=profile.name)
        # the factory made this profile the default; a `verdi` without `-p` in a later test must not find it gone
        aiida_config.set_default_profile(aiida_profile.name, overwrite=True)
        aiida_config.store()
        daemon_client = get_daemon_client(profile.name)
        daemon_client.start_daemon()
        try:
            yield LoopProfile(profile, daemon_client)
        finally:
            try:
                daemon_client.stop_daemon(wait=True)
            except DaemonNotRunningException:
                pass


def await_terminated(node, daemon_client, timeout):
    """Wait until the process of `node` is terminated; on timeout fail with the daemon's log."""
    deadline = time.monotonic() + timeout
    while not node.is_terminated:
        if time.monotonic() > deadline:
            log = Path(daemon_client.daemon_log_file).read_text(encoding="utf-8") if Path(
                daemon_client.daemon_log_file).is_file() else "(no daemon log)"
            pytest.fail(f"{node.process_label}<{node.pk}> still {node.process_state} after {timeout} s; daemon log:\n"
                        f"{log[-20000:]}")
        time.sleep(1.0)
    return node


@pytest.fixture(scope="module")
def pseudopotential_files(tmp_path_factory):
    """Only Al and As: the loop here needs no others, and ld1.x for the rest would only cost time."""
    from polmodel.plugins.pseudos import generate_pseudopotentials

    return generate_pseudopotentials(tmp_path_factory.mktemp("pseudos_alas"), elements=["Al", "As"])


@pytest.fixture
def pseudo_family(aiida_profile, pseudopotential_files):
    """A family of its own label: the session's full family must not be pre-empted by this two-element one."""
    from polmodel.plugins.pseudos import DEFAULT_PSEUDO_FAMILY, install_pseudo_family

    return install_pseudo_family(pseudopotential_files, label=f"{DEFAULT_PSEUDO_FAMILY}/AlAs-only")


@pytest.fixture
def al_loop_inputs(loop_profile, alas_structure, pw_code, polmodel_code, pseudo_family):
    """Inputs of a one-iteration loop, stored in the profile of `loop_profile` (listed first, so it is loaded before
    the computer, codes and pseudopotentials are made)."""
    def factory(max_iterations=1):
        return {
            "structures": {"alas": alas_structure},
            # the structure alone, fully labelled: one FieldResponseWorkChain, seven frames (as before the tiers)
            "initial_data": {"count": orm.Int(0), "tier": orm.Str("full")},
            "label": {
                "code": pw_code,
                "protocol": orm.Str("fast"),
                "overrides": orm.Dict({"scf": {"kpoints_distance": 0.5}}),
                "pseudo_family": orm.Str(pseudo_family.label),
            },
            "train": {
                "train": {"code": polmodel_code, "parameters": orm.Dict({"epochs": 4, "hyperparameters": TINY_TRAINING})},
                "ensemble_size": orm.Int(2),
            },
            "explore": {
                "md": {"code": polmodel_code},
                "parameters": orm.Dict({"steps": 8, "timestep": 1.0, "thermostat": "langevin", "interval": 2,
                                        "born_spread": True}),
                "fields": orm.List([{"kind": "static", "vector": [0.0, 0.0, 0.02]}]),
                "temperatures": orm.List([300.0]),
                "selection": orm.Dict({"force_lower": 1e-4, "force_upper": 50.0, "max_candidates": 1}),
            },
            "candidate_fraction_threshold": orm.Float(0.05),
            "max_iterations": orm.Int(max_iterations),
        }

    return factory


def interrupt_daemon_mid_loop(loop, daemon_client, timeout=300):
    """Stop the daemon while a pw.x job of the loop is running (or after `timeout` s), wait, then start it again."""
    from aiida.engine import ProcessState

    deadline = time.time() + timeout
    while time.time() < deadline:
        running_jobs = [node for node in orm.load_node(loop.pk).called_descendants
                        if isinstance(node, orm.CalcJobNode) and node.process_state == ProcessState.WAITING
                        and node.get_scheduler_state() is not None and node.get_scheduler_state().value == "running"]
        if running_jobs:
            break
        time.sleep(1.0)
    daemon_client.stop_daemon(wait=True)
    stop_deadline = time.time() + 60
    while daemon_client.is_daemon_running and time.time() < stop_deadline:  # the pid file can lag under load
        time.sleep(1.0)
    assert not daemon_client.is_daemon_running
    time.sleep(3.0)
    assert not orm.load_node(loop.pk).is_terminated, "the loop finished before the daemon could be interrupted"
    daemon_client.start_daemon()
    return len(running_jobs) if time.time() < deadline else 0


def test_one_real_iteration_on_the_daemon(al_loop_inputs, loop_profile, tmp_path, capsys):
    """Submit, stop the daemon mid-loop and start it again, then check the loop and ask the provenance questions."""
    from aiida.engine import submit
    from aiida.manage import get_manager

    from polmodel.workflows.active_learning import ActiveLearningWorkChain
    from polmodel.workflows.provenance import learning_curve, models_trained_by, pw_runs_for_model

    profile, daemon_client = loop_profile.profile, loop_profile.daemon_client
    storage = profile.storage_backend
    assert get_manager().get_profile().name == profile.name  # the loop is stored where its daemon looks
    started = time.time()
    loop = submit(ActiveLearningWorkChain, **al_loop_inputs())
    interrupted_jobs = interrupt_daemon_mid_loop(loop, daemon_client)
    with capsys.disabled():
        print(f"[{storage} + {profile.process_control_backend}] daemon stopped and restarted while "
              f"{interrupted_jobs} pw.x/polmodel job(s) were running")
    node = await_terminated(loop, daemon_client, timeout=900)
    durations = sorted(((child.mtime - child.ctime).total_seconds(), child.process_label, child.pk)
                       for child in node.called_descendants)
    with capsys.disabled():
        print(f"[{storage}] loop took {time.time() - started:.0f} s; slowest children: {durations[-5:]}")
    assert node.is_finished_ok, (node.exit_status, node.exit_message,
                                 [log.message for log in orm.Log.collection.get_logs_for(node)])

    # nothing lost, nothing duplicated by the interruption
    descendants = node.called_descendants
    assert all(child.is_terminated for child in descendants)
    assert not [child.pk for child in descendants if child.is_excepted or child.is_killed]
    labels = [child.process_label for child in node.called]
    assert labels.count("TrainEnsembleWorkChain") == 1 and labels.count("ExploreWorkChain") == 1
    assert labels.count("FieldResponseWorkChain") == 1
    for parent in [node, *[child for child in descendants if isinstance(child, orm.WorkflowNode)]]:
        call_labels = [link.link_label for link in parent.base.links.get_outgoing(
            link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()]
        duplicated = {label for label in call_labels if call_labels.count(label) > 1 and label != "CALL"}
        assert not duplicated, f"{parent.process_label}<{parent.pk}> called {duplicated} twice"

    model = node.outputs.model
    dataset = node.outputs.dataset
    assert model.kind == "ensemble" and model.ensemble_size == 2
    assert sorted(model.species) == ["Al", "As"]
    assert model.verify() == model.sha256
    assert dataset.count == 7  # one zero-field and six finite-field frames

    # the iteration record
    (record,) = learning_curve(node)
    assert record["iteration"] == 1 and record["dataset_size"] == 7
    assert record["num_explored_frames"] == 4  # steps 2, 4, 6, 8 (step 0 is the labelled start)
    assert 0.0 <= record["candidate_fraction"] <= 1.0
    assert "energy" in record["validation"] and "forces" in record["validation"]

    # which pw.x runs fed the model: every one of them is a finished pw.x calculation of the labelling
    pw_runs = pw_runs_for_model(model)
    assert len(pw_runs) >= 7  # zero field + six fields (+ Berry-phase runs)
    assert all(run.is_finished_ok for run in pw_runs)
    assert {source for source in dataset.sources} <= {run.uuid for run in pw_runs} | {
        out.uuid for run in pw_runs for out in run.base.links.get_outgoing().all_nodes()}
    # which models the labels trained
    assert [m.pk for m in models_trained_by(dataset)] == [model.pk]

    # the same questions through the command line
    from polmodel.cli import main

    assert main(["provenance", "--profile", profile.name, "pw-runs", str(model.pk)]) == 0
    assert main(["provenance", "--profile", profile.name, "models", "--source", sorted(dataset.sources)[0]]) == 0
    assert main(["provenance", "--profile", profile.name, "learning-curve", str(node.pk)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(pw_runs)} pw.x calculation(s)" in printed and "1 model(s)" in printed
    assert printed.strip().splitlines()[-1].split()[:2] == ["1", "7"]

    # `verdi node graph generate` on the model draws the chain back to the pw.x runs
    output = tmp_path / "model.dot"
    verdi = Path(sys.executable).parent / "verdi"
    subprocess.run([str(verdi), "-p", profile.name, "node", "graph", "generate", "-l", "data", "-f", "dot",
                    "-d", "0", "-O", str(output), str(model.pk)], check=True, capture_output=True, timeout=300)
    drawn = {int(pk) for pk in re.findall(r"\bN(\d+)\s*\[", output.read_text())}
    assert model.pk in drawn and {run.pk for run in pw_runs} <= drawn

    # the demo's report writers on this loop (the demo itself runs BaTiO3 on the `polmodel` profile)
    from polmodel.workflows import demo_batio3 as demo

    report = tmp_path / "report"
    report.mkdir()
    demo.write_learning_curve(node, report)
    assert (report / "learning_curve.png").is_file()
    assert "frames" in (report / "learning_curve.txt").read_text()
    assert demo.copy_parity_plots(model, report)
    demo.write_born_charges_against_dft(model, dataset, report)
    table = (report / "born_charges_vs_dft.txt").read_text()
    assert "Al" in table and "As" in table and "MAE over all components" in table
    md_node = next(child for child in node.called_descendants if child.process_label == "MdCalculation")
    demo.write_pe_loop(md_node, report)
    # a one-iteration model need not switch: then the report says so instead of drawing a loop
    # (polmodel/analysis/observables.py)
    assert (report / "pe_loop.png").is_file() != (report / "pe_loop.txt").is_file()
    if (report / "pe_loop.txt").is_file():
        assert "no hysteresis" in (report / "pe_loop.txt").read_text()
