"""The README's Python examples that need no AiiDA run as written, on the files the repository ships; the README
points only to files that exist; and every comment, docstring or document that cites docs/ names a file and a
section heading that exist."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_calculator_example_runs(monkeypatch):
    """As written, on the shipped files (run from the repository root, as the example says)."""
    blocks = [block for block in _python_blocks(README.read_text()) if "PolCalculator(\"data/" in block]
    assert len(blocks) == 1, "the README's PolCalculator example is gone"
    monkeypatch.chdir(README.parent)
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert np.shape(namespace["born_charges"]) == (135, 3, 3)
    assert np.shape(namespace["eps_inf"]) == (3, 3) and namespace["force_spread"] >= 0.0
    assert namespace["atoms"].calc.results == {}        # the last line changed the field
    np.testing.assert_array_equal(namespace["atoms"].calc.efield, [0.0, 0.0, 0.02])


def test_the_readme_points_only_to_files_in_the_repository():
    text = README.read_text()
    assert "../shared" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (README.parent / link).exists(), link


def test_the_readme_lists_the_generated_pseudopotentials():
    from polmodel.plugins.pseudos import RECIPES
    covered = re.search(r"It covers \*\*(.*?)\*\*", README.read_text(), flags=re.S).group(1)
    assert set(re.findall(r"[A-Z][a-z]?", covered)) == set(RECIPES)


def test_the_loop_example_builds_valid_inputs(pw_code, polmodel_code, monkeypatch):
    """The README's own-material example, with the test profile's codes, a BaTiO3 file and `submit` replaced by
    a check of the inputs against the workchain's spec (what `submit` would refuse)."""
    import aiida
    import aiida.engine
    import ase.io
    from aiida import orm
    from ase import Atoms

    from polmodel.workflows.active_learning import ActiveLearningWorkChain

    block = next(block for block in _python_blocks(README.read_text())
                 if "ActiveLearningWorkChain.get_builder()" in block)
    codes = {"pw@localhost": pw_code, "polmodel@localhost": polmodel_code}
    monkeypatch.setattr(aiida, "load_profile", lambda *args, **kwargs: None)
    monkeypatch.setattr(orm, "load_code", codes.__getitem__)
    cubic = Atoms("BaTiO3", cell=np.eye(3) * 4.0, pbc=True,
                  scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    monkeypatch.setattr(ase.io, "read", lambda path, index=None: [cubic, cubic.copy()])
    submitted = []
    monkeypatch.setattr(aiida.engine, "submit", submitted.append)
    exec(compile(block, str(README), "exec"), {})
    builder = submitted[0]
    assert ActiveLearningWorkChain.spec().inputs.validate(builder._inputs(prune=True)) is None
    assert sorted(builder.structures) == ["start_0", "start_1"]


# --- citations of the documentation ----------------------------------------------------------------------------
ROOT = README.parent
#: where comments, docstrings and documents live (build outputs, the venv and data files are not scanned)
CITING_FOLDERS = ("polmodel", "plugins", "workflows", "tests", "benchmarks", "setup_profiles", "docs", "data")
CITING_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg")
#: a path under docs/ (not part of a longer path or a URL)
DOCS_PATH = re.compile(r"(?<![\w./:-])docs/[\w./-]*[\w/]")
#: a section citation: a docs/ markdown file, then (after a backtick, comma, bracket or spaces) its heading in quotes,
#: e.g. docs/design.md "Label tiers" or `docs/conventions.md`, "Model files"
SECTION_CITATION = re.compile(r"(?<![\w./:-])(docs/[\w./-]+\.md)`?[\s,(]*[\"“]([\w`][^\"”]{0,120}?)[\"”]")
#: a bare design-style document name (DESIGN.md, NOTES.md): it must exist at the root or beside the citing file
BARE_DOCUMENT = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_]*\.md)\b")
#: comment leaders that continue a comment on the next line (joined so that a wrapped citation is read whole)
COMMENT_CONTINUATION = re.compile(r"\n[ \t]*#+:?[ \t]*")


def _citing_files(root):
    files = [root / "README.md", root / "Makefile", root / "pyproject.toml"]
    for folder in CITING_FOLDERS:
        files += sorted(path for path in (root / folder).rglob("*")
                        if path.suffix in CITING_SUFFIXES and path.is_file() and "__pycache__" not in path.parts)
    # this file is left out: its examples of bad citations are bad on purpose
    return [path for path in files if path.is_file() and path.resolve() != Path(__file__).resolve()]


def markdown_headings(path):
    """The headings (any level) of a markdown file, outside code fences, as written after the #s."""
    headings, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            headings.add(line.lstrip("#").strip())
    return headings


def citation_problems(root, files):
    """One line per citation in `files` of a docs/ file that does not exist, of a section that is not a heading of
    its file, or of a bare document name (DESIGN.md) that is neither at `root` nor beside the citing file."""
    problems, headings = [], {}
    for path in files:
        name = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix != ".md":
            text = COMMENT_CONTINUATION.sub(" ", text)
        for cited in DOCS_PATH.findall(text):
            if not (root / cited).exists():
                problems.append(f"{name}: cites {cited}, which does not exist")
        for cited, heading in SECTION_CITATION.findall(text):
            heading = " ".join(heading.split())
            if (root / cited).is_file():
                headings.setdefault(cited, markdown_headings(root / cited))
                if heading not in headings[cited]:
                    problems.append(f'{name}: cites {cited} "{heading}", which is not a heading of {cited}')
        for cited in set(BARE_DOCUMENT.findall(text)):
            if not (root / cited).exists() and not (path.parent / cited).exists():
                problems.append(f"{name}: cites {cited}, which is not in the repository")
    return sorted(set(problems))


def test_citations_of_the_documentation_exist():
    """Every `docs/...` path, `docs/design.md "Heading"` / `docs/conventions.md "Heading"` section and bare document
    name cited in a comment, docstring or document of the repository exists."""
    problems = citation_problems(ROOT, _citing_files(ROOT))
    assert not problems, "\n".join(problems)


def test_the_citation_check_finds_bad_citations(tmp_path):
    """The check itself fails on each kind of bad citation, and passes the good ones, wrapped or not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## Label tiers\n\n```\n## not a heading\n```\n")
    good = tmp_path / "good.py"
    good.write_text('"""Tiers (docs/design.md "Label\n    tiers"), see `docs/design.md`, "Label tiers"."""\n'
                    '# the tiers, cheapest first (docs/design.md\n# "Label tiers"); the page: docs/design.md.\n')
    bad = tmp_path / "bad.py"
    bad.write_text('# docs/design.md "Label tier" and docs/design.md "not a heading"\n'
                   '"""docs/missing.md and docs/design.md/x, and DESIGN.md "Label tiers"."""\n')
    assert citation_problems(tmp_path, [good]) == []
    assert citation_problems(tmp_path, [bad]) == [
        "bad.py: cites DESIGN.md, which is not in the repository",
        'bad.py: cites docs/design.md "Label tier", which is not a heading of docs/design.md',
        'bad.py: cites docs/design.md "not a heading", which is not a heading of docs/design.md',
        "bad.py: cites docs/design.md/x, which does not exist",
        "bad.py: cites docs/missing.md, which does not exist",
    ]


def test_the_core_cites_no_issue_numbers():
    """Comments in the installed code say what they need themselves: an issue number means nothing to a reader of a
    clone."""
    pattern = re.compile(r"\bissues? #?\d+|\(#\d+\)", flags=re.I)
    hits = [f"{path.relative_to(ROOT).as_posix()}: {match.group(0)}"
            for folder in ("polmodel", "plugins", "workflows") for path in sorted((ROOT / folder).rglob("*"))
            if path.suffix in CITING_SUFFIXES and path.is_file()
            for match in pattern.finditer(path.read_text(encoding="utf-8"))]
    assert not hits, hits
