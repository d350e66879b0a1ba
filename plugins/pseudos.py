"""The project's own pseudopotentials: generated with ld1.x (PBE) from the inputs in ``ld1_inputs/``.

Every element has a generation input ``ld1_inputs/<El>.in`` (``iswitch=3``) and a recipe below: the atomic
configurations of its transferability test and its recommended plane-wave cutoffs. ``generate_pseudopotentials``
runs the generation, then ld1.x's own transferability test (``iswitch=2``, ``&test`` namelist: all-electron versus
pseudo-atom total-energy differences and eigenvalues across configurations, plus the Bessel-basis cutoff scan),
and records the errors next to the UPF files. ``install_pseudo_family`` stores the files as an aiida-pseudo family
with the recommended cutoffs, so workflows only need the family label. Any other installed family (SSSP,
PseudoDojo) can be named instead.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import tempfile

#: Label of the aiida-pseudo family that ``make setup-aiida`` installs.
DEFAULT_PSEUDO_FAMILY = "polmodel/ld1/PBE/v1"
#: Directory of the ld1.x generation inputs shipped with the package.
LD1_INPUTS_DIRECTORY = pathlib.Path(__file__).parent / "ld1_inputs"
#: Name of the JSON report that ``generate_pseudopotentials`` writes into its work directory.
TRANSFERABILITY_REPORT = "transferability.json"
#: Cutoff scan of the Bessel-basis test (Ry): ``(first, last, step)``.
BESSEL_SCAN_RY = (10.0, 120.0, 10.0)


class Ld1Error(RuntimeError):
    """ld1.x failed or produced no usable pseudopotential."""


@dataclasses.dataclass(frozen=True)
class PseudopotentialRecipe:
    """What the project knows about one element's pseudopotential besides its ld1.x input."""

    element: str
    kind: str  # "norm-conserving" or "ultrasoft"
    ecutwfc: float  # recommended wave-function cutoff, Ry
    ecutrho: float  # recommended charge-density cutoff, Ry
    #: Valence configurations of the transferability test; the first is the generation configuration.
    test_configurations: tuple[str, ...]

    @property
    def generation_input(self) -> pathlib.Path:
        return LD1_INPUTS_DIRECTORY / f"{self.element}.in"


RECIPES = {
    recipe.element: recipe
    for recipe in (
        PseudopotentialRecipe("Al", "norm-conserving", 30.0, 120.0, ("3s2 3p1", "3s1 3p2", "3s2 3p0", "3s1 3p1")),
        PseudopotentialRecipe("As", "norm-conserving", 40.0, 160.0, ("4s2 4p3", "4s1 4p4", "4s2 4p2", "4s2 4p1")),
        PseudopotentialRecipe("Si", "norm-conserving", 30.0, 120.0, ("3s2 3p2", "3s1 3p3", "3s2 3p1", "3s1 3p2")),
        PseudopotentialRecipe(
            "Ba", "ultrasoft", 35.0, 280.0, ("5s2 5p6 5d0 6s2", "5s2 5p6 5d1 6s1", "5s2 5p6 5d0 6s1", "5s2 5p6 5d0 6s0")
        ),
        PseudopotentialRecipe(
            "Ti", "ultrasoft", 40.0, 320.0, ("3s2 3p6 3d2 4s2", "3s2 3p6 3d3 4s1", "3s2 3p6 3d2 4s1", "3s2 3p6 3d1 4s1")
        ),
        PseudopotentialRecipe("O", "norm-conserving", 70.0, 280.0, ("2s2 2p4", "2s1 2p5", "2s2 2p3", "2s2 2p3.5")),
    )
}


@dataclasses.dataclass
class ConfigurationTest:
    """ld1.x's comparison of the all-electron and the pseudo atom in one configuration."""

    configuration: str
    delta_etot_ae_ry: float  # total-energy change from the first configuration, all-electron
    delta_etot_ps_ry: float  # the same with the pseudopotential
    max_eigenvalue_error_ry: float  # largest |e_AE - e_PS| over the valence states

    @property
    def energy_error_ry(self) -> float:
        """Transferability error: how far the pseudo atom's excitation energy is from the all-electron one."""
        return abs(self.delta_etot_ae_ry - self.delta_etot_ps_ry)


@dataclasses.dataclass
class GeneratedPseudopotential:
    """One generated UPF file and its transferability test."""

    element: str
    path: pathlib.Path
    tests: list[ConfigurationTest]
    #: Bessel-basis scan: ``{cutoff_Ry: lowest pseudo-atom eigenvalue per angular momentum (Ry)}``.
    bessel_eigenvalues: dict[float, list[float]]

    @property
    def max_energy_error_ry(self) -> float:
        return max(test.energy_error_ry for test in self.tests)

    @property
    def max_eigenvalue_error_ry(self) -> float:
        return max(test.max_eigenvalue_error_ry for test in self.tests)

    def bessel_convergence_ry(self, ecutwfc: float) -> float:
        """Largest change of a pseudo-atom eigenvalue between ``ecutwfc`` and the largest scanned cutoff."""
        cutoffs = sorted(self.bessel_eigenvalues)
        reference = self.bessel_eigenvalues[cutoffs[-1]]
        below = [cutoff for cutoff in cutoffs if cutoff <= ecutwfc + 1e-9]
        if not below:
            raise ValueError(f"cutoff {ecutwfc} Ry is below the Bessel scan (starts at {cutoffs[0]} Ry)")
        values = self.bessel_eigenvalues[below[-1]]
        return max(abs(a - b) for a, b in zip(values, reference))

    def as_dict(self) -> dict:
        return {
            "element": self.element,
            "path": str(self.path),
            "max_energy_error_ry": self.max_energy_error_ry,
            "max_eigenvalue_error_ry": self.max_eigenvalue_error_ry,
            "tests": [dataclasses.asdict(test) for test in self.tests],
            "bessel_eigenvalues": {str(cutoff): values for cutoff, values in self.bessel_eigenvalues.items()},
        }


def recipe_for(element: str) -> PseudopotentialRecipe:
    """The recipe of ``element``; a clear error for elements the project has no input for."""
    try:
        return RECIPES[element]
    except KeyError:
        raise ValueError(
            f"no ld1.x recipe for element `{element}`; the project generates {sorted(RECIPES)}. "
            "Name an installed family (e.g. SSSP or PseudoDojo) for other elements."
        ) from None


def recommended_cutoffs(elements) -> tuple[float, float]:
    """``(ecutwfc, ecutrho)`` in Ry for a structure made of ``elements``: the largest over its species."""
    recipes = [recipe_for(element) for element in set(elements)]
    return max(r.ecutwfc for r in recipes), max(r.ecutrho for r in recipes)


def _upf_filename(generation_input: str) -> str:
    match = re.search(r"file_pseudopw\s*=\s*'([^']+)'", generation_input)
    if match is None:
        raise Ld1Error("the ld1.x input names no `file_pseudopw`")
    return match.group(1)


def _run_ld1(input_text: str, directory: pathlib.Path, name: str, executable: str) -> str:
    """Run ld1.x on ``input_text`` inside ``directory``; return its output or raise ``Ld1Error``."""
    (directory / f"{name}.in").write_text(input_text)
    try:
        completed = subprocess.run(
            [executable], input=input_text, capture_output=True, text=True, cwd=directory, timeout=300
        )
    except FileNotFoundError:
        raise Ld1Error(f"ld1.x executable `{executable}` not found; install Quantum ESPRESSO (make setup-system)") from None
    output = completed.stdout
    (directory / f"{name}.out").write_text(output + completed.stderr)
    error = re.search(r"Error in routine\s+(\S+)\s*\((\d+)\):\s*\n\s*(.+)", output)
    if error is not None:
        raise Ld1Error(f"ld1.x failed in `{name}`: routine {error.group(1)}: {error.group(3).strip()} (see {directory})")
    if completed.returncode != 0:
        raise Ld1Error(f"ld1.x exited with status {completed.returncode} in `{name}` (see {directory}/{name}.out)")
    return output


def _test_input(generation_input: str, upf_filename: str, configurations) -> str:
    """The ``iswitch=2`` input that tests ``upf_filename`` on ``configurations`` with the generation's atom."""
    atom = re.search(r"&input\b.*?\n\s*/", generation_input, flags=re.S | re.I)
    if atom is None:
        raise Ld1Error("the ld1.x input has no `&input` namelist")
    atom_namelist = re.sub(r"iswitch\s*=\s*3", "iswitch = 2", atom.group(0))
    first, last, step = BESSEL_SCAN_RY
    lines = [atom_namelist, " &test", f"    file_pseudo = '{upf_filename}',", f"    nconf = {len(configurations)},"]
    lines += [f"    configts({index}) = '{config}'," for index, config in enumerate(configurations, start=1)]
    lines += [f"    ecutmin = {first}, ecutmax = {last}, decut = {step}", " /", ""]
    return "\n".join(lines)


def parse_transferability(output: str, configurations) -> list[ConfigurationTest]:
    """Per-configuration AE/PS comparison from the output of an ``iswitch=2`` ld1.x run."""
    blocks = output.split("Testing the pseudopotential")[1:]
    if len(blocks) != len(configurations):
        raise Ld1Error(f"ld1.x tested {len(blocks)} configurations, expected {len(configurations)}")
    tests = []
    for configuration, block in zip(configurations, blocks):
        block = block.split("End of pseudopotential test")[0]
        eigenvalue_errors = [
            abs(float(value))
            for value in re.findall(r"^\s*\d+\s+\d+\s+\w+\s+\d+\(\s*[\d.]+\)\s+\S+\s+\S+\s+(\S+)\s*!?\s*$", block, flags=re.M)
        ]
        if not eigenvalue_errors:
            raise Ld1Error(f"no eigenvalue comparison found for configuration `{configuration}`")
        ae = re.search(r"dEtot_ae\s*=\s*(\S+)\s*Ry", block)
        ps = re.search(r"dEtot_ps\s*=\s*(\S+)\s*Ry", block)
        tests.append(
            ConfigurationTest(
                configuration=configuration,
                delta_etot_ae_ry=float(ae.group(1)) if ae else 0.0,  # the first configuration is the reference
                delta_etot_ps_ry=float(ps.group(1)) if ps else 0.0,
                max_eigenvalue_error_ry=max(eigenvalue_errors),
            )
        )
    return tests


def parse_bessel_scan(output: str) -> dict[float, list[float]]:
    """``{cutoff: [lowest eigenvalue for l=0, 1, ...]}`` from ld1.x's Bessel-function basis test."""
    section = output.split("Test with a basis set of Bessel functions")
    if len(section) < 2:
        return {}
    section = section[1].split("End of Bessel function test")[0]
    scan = {}
    for cutoff, body in re.findall(r"Cutoff \(Ry\)\s*:\s*(\S+)(.*?)(?=Cutoff \(Ry\)|\Z)", section, flags=re.S):
        scan[float(cutoff)] = [float(value) for value in re.findall(r"E\(L=\d\)\s*=\s*(\S+)\s*Ry", body)]
    return scan


def generate_pseudopotential(element: str, workdir, executable: str = "ld1.x") -> GeneratedPseudopotential:
    """Generate ``element``'s UPF in ``workdir/<element>/`` and run its transferability test."""
    recipe = recipe_for(element)
    directory = pathlib.Path(workdir) / element
    directory.mkdir(parents=True, exist_ok=True)
    generation_input = recipe.generation_input.read_text()
    upf_filename = _upf_filename(generation_input)

    _run_ld1(generation_input, directory, "generate", executable)
    upf = directory / upf_filename
    if not upf.is_file() or "</UPF>" not in upf.read_text():
        raise Ld1Error(f"ld1.x reported success but wrote no complete UPF file `{upf}`")

    output = _run_ld1(_test_input(generation_input, upf_filename, recipe.test_configurations), directory, "test", executable)
    return GeneratedPseudopotential(
        element=element,
        path=upf,
        tests=parse_transferability(output, recipe.test_configurations),
        bessel_eigenvalues=parse_bessel_scan(output),
    )


def generate_pseudopotentials(workdir, elements=None, executable: str = "ld1.x") -> dict[str, pathlib.Path]:
    """Generate the project's pseudopotentials into ``workdir``; returns ``{element: UPF path}``.

    The transferability errors of every element are written to ``workdir/transferability.json``
    (read them back with ``read_transferability_report``).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    generated = [generate_pseudopotential(element, workdir, executable) for element in (elements or sorted(RECIPES))]
    report = {pseudo.element: pseudo.as_dict() for pseudo in generated}
    (workdir / TRANSFERABILITY_REPORT).write_text(json.dumps(report, indent=2))
    return {pseudo.element: pseudo.path for pseudo in generated}


def read_transferability_report(workdir) -> dict:
    """The report written by ``generate_pseudopotentials``: ``{element: {max_energy_error_ry, tests, ...}}``."""
    return json.loads((pathlib.Path(workdir) / TRANSFERABILITY_REPORT).read_text())


def install_pseudo_family(files: dict, label: str = DEFAULT_PSEUDO_FAMILY, description: str | None = None):
    """Store ``{element: UPF path}`` as an aiida-pseudo ``CutoffsPseudoPotentialFamily`` with recommended cutoffs.

    Returns the existing family unchanged when one with ``label`` already exists (idempotent); a family under the
    same label that lacks one of the elements is an error rather than a silent mismatch.
    """
    from aiida.plugins import DataFactory, GroupFactory

    family_class = GroupFactory("pseudo.family.cutoffs")
    existing = family_class.collection.find(filters={"label": label})
    if existing:
        family = existing[0]
        missing = set(files) - set(family.elements)
        if missing:
            raise ValueError(f"pseudopotential family `{label}` exists but lacks {sorted(missing)}")
        return family

    with tempfile.TemporaryDirectory() as staging:
        for element, path in files.items():
            shutil.copy(path, pathlib.Path(staging) / pathlib.Path(path).name)
        family = family_class.create_from_folder(
            pathlib.Path(staging),
            label,
            description=description or "polmodel's ld1.x pseudopotentials (PBE), generated from plugins/ld1_inputs",
            pseudo_type=DataFactory("pseudo.upf"),
        )
    cutoffs = {
        element: {"cutoff_wfc": recipe_for(element).ecutwfc, "cutoff_rho": recipe_for(element).ecutrho}
        for element in files
    }
    family.set_cutoffs(cutoffs, "normal", unit="Ry")
    return family
