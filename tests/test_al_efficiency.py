"""benchmarks/al_efficiency.py at its smallest: the loop-against-random comparison on the toy oracle (THE TOY
POTENTIAL STANDS IN FOR DFT, tests/toy_labelling.py) runs, spends no more labels on random sampling than on the
loop or the budget allows, and prints the line the issue asks for, with the ratio of the table's means."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


BUDGET = 16


def run_benchmark(tmp_path, random_budget):
    """The curves of the benchmark's one seed (its printed table goes to stdout)."""
    import al_efficiency

    curves_path = tmp_path / f"curves_{random_budget}.json"
    al_efficiency.main(["--seeds", "1", "--workers", "1", "--iterations", "2", "--epochs", "3", "--warm-epochs", "2",
                        "--initial", "3", "--test-frames", "3", "--force-lower-factor", "0.1",
                        "--budget", str(BUDGET), "--random-budget", random_budget, "--curves-json", str(curves_path)])
    return json.loads(curves_path.read_text())["curves"][0]


@pytest.mark.parametrize("random_budget", ["full", "loop"])
def test_benchmark_compares_the_loop_with_random_sampling_within_the_budget(tmp_path, capsys, random_budget):
    curves = run_benchmark(tmp_path, random_budget)
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"labels to target: loop (\d+), random (\d+), ratio ([0-9.]+)", lines[-1])
    assert match, lines[-1]
    assert float(match[3]) == pytest.approx(int(match[1]) / int(match[2]), abs=0.01)

    assert len(curves["loop"]) == len(curves["random"]) == 2
    assert curves["loop"][0] == curves["random"][0]  # one initial set, one first model
    # the ideal crystal's full response (10 runs) and 3 perturbed copies, one SCF each
    assert curves["loop"][0][0] == 10 + 3
    loop_spent = curves["loop"][1][0] - curves["loop"][0][0]
    random_spent = curves["random"][1][0] - curves["random"][0][0]
    assert 0 <= loop_spent <= BUDGET
    if random_budget == "full":  # the whole budget, but for a field_frames label (2 runs) that does not fit
        assert BUDGET - 1 <= random_spent <= BUDGET
    else:
        assert random_spent <= loop_spent
