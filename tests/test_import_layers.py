"""The import order of docs/design.md "Rooms and imports", as import-linter checks it (the contracts are
[tool.importlinter] in pyproject.toml): kept by the package as it is, and broken by a planted upward import."""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "polmodel"


def _lint_imports(cwd):
    """`lint-imports` on the package that `cwd` holds (it puts `cwd` first on its path), with the repository's
    contracts; (exit status, output)."""
    executable = Path(sys.executable).with_name("lint-imports")
    executable = str(executable) if executable.exists() else shutil.which("lint-imports")
    assert executable, "lint-imports is missing: pip install -e '.[dev]' (import-linter)"
    completed = subprocess.run([executable, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=cwd,
                               capture_output=True, text=True, timeout=300)
    return completed.returncode, completed.stdout + completed.stderr


def test_the_checked_graph_holds_plugins_and_workflows():
    """import-linter reads polmodel's folder; the links polmodel/plugins and polmodel/workflows put the two rooms
    that pyproject.toml's package-dir installs from plugins/ and workflows/ into it."""
    modules = grimp.build_graph("polmodel", cache_dir=None).modules
    assert {"polmodel.plugins.data", "polmodel.workflows.demo", "polmodel.cli.launch"} <= modules


def test_the_package_keeps_its_import_contracts():
    status, output = _lint_imports(ROOT)
    assert status == 0, output
    assert "0 broken" in output, output


def test_a_planted_upward_import_breaks_the_contracts(tmp_path):
    """A copy of the package (links to the real files) whose polmodel.data gains a module that imports the model
    and AiiDA: the layers, AiiDA and cycle contracts fail, and the report names the module."""
    view = tmp_path / "polmodel"
    view.mkdir()
    for entry in CORE.iterdir():
        if entry.name not in ("data", "__pycache__"):
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (view / "data").mkdir()
    for entry in (CORE / "data").glob("*.py"):
        (view / "data" / entry.name).symlink_to(entry)
    (view / "data" / "planted.py").write_text("import aiida\n\nfrom polmodel.nn import model\n")
    status, output = _lint_imports(tmp_path)
    assert status != 0, output
    assert "polmodel.data is not allowed to import polmodel.nn" in output, output
    assert "polmodel.data.planted -> polmodel.nn.model" in output, output
    assert "polmodel.data is not allowed to import aiida" in output, output
    broken = [line for line in output.splitlines() if " BROKEN" in line]
    for contract in ("Each layer imports only the layers below it", "never imports AiiDA",
                     "No import cycles between sibling modules"):
        assert any(contract in line for line in broken), (contract, output)
