"""The package layout: every subpackage installs, the documents name only files that exist, and the ML core
(polmodel/, all of it) imports without AiiDA."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "polmodel"


def _core_packages():
    return sorted(".".join(path.parent.relative_to(ROOT).parts) for path in CORE.rglob("__init__.py"))


def test_setuptools_lists_every_subpackage():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(name for name in listed if name not in ("polmodel.plugins", "polmodel.workflows")) \
        == _core_packages()


def test_documents_name_existing_files():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"\b(?:polmodel|plugins|workflows|tests|benchmarks|docs)(?:/[\w.]+)+\.(?:py|md|yaml)\b")
    missing = {f"{document.name}: {name}" for document in documents
               for name in pattern.findall(document.read_text()) if not (ROOT / name).exists()}
    assert not missing, sorted(missing)


def test_core_modules_import_without_aiida():
    modules = sorted(".".join(path.with_suffix("").relative_to(ROOT).parts).removesuffix(".__init__")
                     for path in CORE.rglob("*.py") if path.name != "__main__.py")
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n    importlib.import_module(name)\n"
             "print(sorted(name for name in sys.modules if name.split('.')[0] == 'aiida'))")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
