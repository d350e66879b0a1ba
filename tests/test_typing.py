"""The typed public API: mypy checks the modules [tool.mypy] in pyproject.toml lists (what polmodel/__init__.py
exports and the modules that define it, training, MD, the derivatives, the frame files and the workchains' builders)
and finds them clean; a snippet that calls the API with wrong types, or adds an unannotated function, fails it."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def _mypy(*arguments):
    """`python -m mypy` from the repository root with pyproject.toml's settings; (exit status, output). Its cache
    (.mypy_cache) makes a second run take seconds instead of about half a minute."""
    completed = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                                *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return completed.returncode, completed.stdout + completed.stderr


def test_the_config_checks_the_public_api_in_full():
    """The modules that define what `import polmodel` exports are checked, with every function annotated."""
    for module in ("polmodel/__init__.py", "polmodel/nn/model.py", "polmodel/nn/ensemble.py",
                   "polmodel/nn/serialization.py", "polmodel/dynamics/calculator.py", "polmodel/training/train.py",
                   "polmodel/workflows/field_response.py", "polmodel/workflows/active_learning.py"):
        assert module in CONFIG["files"], module
        assert (ROOT / module).is_file(), module
    assert CONFIG["disallow_untyped_defs"] and CONFIG["disallow_incomplete_defs"] and CONFIG["check_untyped_defs"]


def test_the_public_modules_type_check():
    status, output = _mypy()
    assert status == 0, output
    assert f"Success: no issues found in {len(CONFIG['files'])} source files" in output, output


PLANTED = '''\
import polmodel
from ase import Atoms
from polmodel.dynamics.fields import StaticField
from polmodel.dynamics.md import MDSettings, run_md
from polmodel.training.config import TrainingConfig
from polmodel.training.evaluation import evaluate
from polmodel.training.train import train_model


def typed_use(path: str, frames: list[Atoms]) -> None:
    model = polmodel.load(path)
    calculator = polmodel.PolCalculator(model, efield=(0.0, 0.0, 0.01), dtype="float64")
    run_md(frames[0], calculator, StaticField((0.0, 0.0, 0.01)), MDSettings(steps=10, timestep_fs=1.0))
    trained, history = train_model(frames, None, TrainingConfig(epochs=1))
    trained.save(path)
    print(evaluate(trained, frames)["forces"]["rmse"], history["best_epoch"])


polmodel.load(3.5)  # planted: arg-type
polmodel.PolModel(["Ba", "Ti", "O"], cutoff="5 Å")  # planted: arg-type
MDSettings(steps="10", timestep_fs=1.0)  # planted: arg-type
TrainingConfig(epochs=1).species.append("Ba")  # planted: union-attr


def untyped(value):  # planted: no-untyped-def
    return value
'''


def test_planted_type_errors_fail(tmp_path):
    """Each planted line is reported, under its error code, and nothing else: the API's annotations reach a caller
    through `import polmodel`, and the completeness rule holds for any checked module."""
    snippet = tmp_path / "planted.py"
    snippet.write_text(PLANTED)
    status, output = _mypy(str(snippet))
    expected = {(number, line.split("# planted: ")[1]) for number, line in enumerate(PLANTED.splitlines(), start=1)
                if "# planted: " in line}
    reported = {(int(number), code) for number, code in
                re.findall(r"planted\.py:(\d+): error: .*\[([\w-]+)\]$", output, flags=re.MULTILINE)}
    assert status == 1, output
    assert reported == expected, output
