"""The README's Python examples that need no AiiDA run as written, on the files the repository ships."""
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
