"""benchmarks/al_efficiency.py at its smallest: the loop-against-random comparison on the toy oracle (THE TOY
POTENTIAL STANDS IN FOR DFT, tests/toy_labelling.py) runs, spends no more labels on random sampling than on the
loop, and prints the line the issue asks for, with the ratio of the table's means."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import al_efficiency  # noqa: E402

pytestmark = pytest.mark.slow


def test_benchmark_compares_the_loop_with_random_sampling_at_equal_label_cost(tmp_path, capsys):
    curves_path = tmp_path / "curves.json"
    al_efficiency.main(["--seeds", "1", "--workers", "1", "--iterations", "2", "--epochs", "3", "--warm-epochs", "2",
                        "--initial", "3", "--test-frames", "3", "--force-lower-factor", "0.1",
                        "--curves-json", str(curves_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"labels to target: loop (\d+), random (\d+), ratio ([0-9.]+)", lines[-1])
    assert match, lines[-1]
    loop, random, ratio = int(match[1]), int(match[2]), float(match[3])
    assert ratio == pytest.approx(loop / random, abs=0.01)

    curves = json.loads(curves_path.read_text())["curves"][0]
    assert len(curves["loop"]) == len(curves["random"]) == 2
    assert curves["loop"][0] == curves["random"][0]  # one initial set, one first model
    assert curves["loop"][0][0] == 1 + 3  # the ideal crystal and 3 perturbed copies, one SCF each
    for (loop_runs, *_), (random_runs, *_) in zip(curves["loop"], curves["random"]):
        assert random_runs <= loop_runs
