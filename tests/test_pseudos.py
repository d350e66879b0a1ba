"""The project's ld1.x pseudopotentials: generation, transferability, aiida-pseudo family, and solids with pw.x."""
import pathlib

import numpy as np
import pytest

from polmodel.plugins import pseudos
from polmodel.plugins.pseudos import (
    DEFAULT_PSEUDO_FAMILY,
    RECIPES,
    Ld1Error,
    generate_pseudopotential,
    read_transferability_report,
    recipe_for,
    recommended_cutoffs,
)

#: Valence charge each recipe must produce (semicore states included where the recipe says so).
EXPECTED_VALENCE = {"Al": 3, "As": 5, "Si": 4, "O": 6, "Ba": 10, "Ti": 12}
#: ld1.x transferability thresholds (Ry): |ΔE_AE - ΔE_PS| across configurations, and |e_AE - e_PS|.
MAX_ENERGY_ERROR_RY = 0.005
MAX_EIGENVALUE_ERROR_RY = 0.010
#: At the recommended ecutwfc a pseudo-atom eigenvalue (Bessel basis) must be within this of its converged value.
MAX_BESSEL_ERROR_RY = 0.002


def test_every_recipe_has_an_input_and_a_valence_expectation():
    assert set(RECIPES) == set(EXPECTED_VALENCE)
    for element, recipe in RECIPES.items():
        assert recipe.generation_input.is_file(), element
        assert recipe.ecutrho >= 4 * recipe.ecutwfc
        if recipe.kind == "ultrasoft":
            assert recipe.ecutrho >= 8 * recipe.ecutwfc


def test_unknown_element_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no ld1.x recipe for element `Xe`"):
        generate_pseudopotential("Xe", tmp_path)
    with pytest.raises(ValueError, match="Xe"):
        recommended_cutoffs(["Si", "Xe"])


def test_recommended_cutoffs_take_the_hardest_species():
    assert recommended_cutoffs(["Ba", "Ti", "O", "O", "O"]) == (
        max(recipe_for(e).ecutwfc for e in "Ba Ti O".split()),
        max(recipe_for(e).ecutrho for e in "Ba Ti O".split()),
    )


@pytest.mark.dft
def test_broken_ld1_input_raises_ld1_error(tmp_path, monkeypatch):
    broken = tmp_path / "inputs"
    broken.mkdir()
    text = RECIPES["Si"].generation_input.read_text().replace("zed = 14.0", "zed = -3.0")
    (broken / "Si.in").write_text(text)
    monkeypatch.setattr(pseudos, "LD1_INPUTS_DIRECTORY", broken)
    with pytest.raises(Ld1Error, match="ld1.x failed in `generate`"):
        generate_pseudopotential("Si", tmp_path / "work")


def test_missing_ld1_executable_raises_ld1_error(tmp_path):
    with pytest.raises(Ld1Error, match="not found"):
        generate_pseudopotential("Si", tmp_path, executable=str(tmp_path / "no-such-ld1.x"))


@pytest.mark.dft
def test_generated_upf_files_parse_with_aiida_pseudo(aiida_profile, pseudopotential_files):
    from aiida_pseudo.data.pseudo import UpfData

    assert set(pseudopotential_files) == set(RECIPES)
    for element, path in pseudopotential_files.items():
        assert path.is_file()
        with path.open("rb") as handle:
            upf = UpfData(handle, filename=path.name)
        assert upf.element == element
        assert upf.z_valence == pytest.approx(EXPECTED_VALENCE[element])
        header = path.read_text()
        ultrasoft = 'is_ultrasoft="true"' if RECIPES[element].kind == "ultrasoft" else 'is_ultrasoft="false"'
        assert ultrasoft in header, f"{element}: expected {ultrasoft}"
        assert 'functional="' in header and "PBE" in header.split('functional="')[1].split('"')[0]


@pytest.mark.dft
def test_ld1_transferability_errors_are_small(pseudopotential_directory):
    report = read_transferability_report(pseudopotential_directory)
    for element, entry in report.items():
        configurations = [test["configuration"] for test in entry["tests"]]
        assert configurations == list(RECIPES[element].test_configurations)
        # The test configurations really change the atom: all-electron excitation energies are not zero.
        assert max(abs(test["delta_etot_ae_ry"]) for test in entry["tests"]) > 0.05, element
        assert entry["max_energy_error_ry"] < MAX_ENERGY_ERROR_RY, element
        assert entry["max_eigenvalue_error_ry"] < MAX_EIGENVALUE_ERROR_RY, element


@pytest.mark.dft
def test_recommended_wavefunction_cutoff_converges_the_pseudo_atom(pseudopotential_directory):
    report = read_transferability_report(pseudopotential_directory)
    for element, entry in report.items():
        generated = pseudos.GeneratedPseudopotential(
            element=element,
            path=pathlib.Path(entry["path"]),
            tests=[],
            bessel_eigenvalues={float(cutoff): values for cutoff, values in entry["bessel_eigenvalues"].items()},
        )
        assert generated.bessel_convergence_ry(recipe_for(element).ecutwfc) < MAX_BESSEL_ERROR_RY, element
        # and the scan is sensitive: far below the recommendation the eigenvalues are visibly off
        assert generated.bessel_convergence_ry(10.0) > generated.bessel_convergence_ry(recipe_for(element).ecutwfc)


@pytest.mark.aiida
@pytest.mark.dft
def test_pseudo_family_holds_every_element_with_cutoffs(pseudo_family, pseudopotential_files):
    from polmodel.plugins.pseudos import install_pseudo_family

    assert pseudo_family.label == DEFAULT_PSEUDO_FAMILY
    assert set(pseudo_family.elements) == set(RECIPES)
    assert pseudo_family.get_recommended_cutoffs(elements=("Ba", "Ti", "O"), unit="Ry") == pytest.approx(
        recommended_cutoffs(["Ba", "Ti", "O"])
    )
    assert install_pseudo_family(pseudopotential_files).pk == pseudo_family.pk  # idempotent
    with pytest.raises(ValueError, match="lacks"):
        install_pseudo_family({**pseudopotential_files, "Xe": pseudopotential_files["Si"]})


# ---------------------------------------------------------------------------------------------------------------
# Solids with pw.x: the lattice constant from an E(V) fit must land within 2 % of the PBE literature value.
# ---------------------------------------------------------------------------------------------------------------

def pw_total_energy(atoms, pseudopotential_files, ecutwfc, ecutrho, kpoints, directory):
    """Total energy (eV) of ``atoms`` from one serial pw.x SCF run (insulators: fixed occupations)."""
    from ase.calculators.espresso import Espresso, EspressoProfile

    directory.mkdir(parents=True, exist_ok=True)
    species = sorted(set(atoms.get_chemical_symbols()))
    for element in species:
        link = directory / pseudopotential_files[element].name
        if not link.exists():
            link.symlink_to(pseudopotential_files[element])
    calculator = Espresso(
        profile=EspressoProfile(command="pw.x", pseudo_dir=str(directory)),
        directory=str(directory),
        pseudopotentials={element: pseudopotential_files[element].name for element in species},
        input_data={
            "control": {"calculation": "scf", "disk_io": "none"},
            "system": {"ecutwfc": ecutwfc, "ecutrho": ecutrho, "occupations": "fixed"},
            # Gentle mixing: the 5-atom oxide on a single k-point sloshes with the default 0.7.
            "electrons": {"conv_thr": 1e-8, "mixing_beta": 0.3},
        },
        kpts=kpoints,
        koffset=(1, 1, 1),
    )
    atoms = atoms.copy()
    atoms.calc = calculator
    return atoms.get_potential_energy()


def fitted_lattice_constant(build, a_guess, pseudopotential_files, tmp_path, *, points, span, kpoints, cutoffs=None):
    """Equilibrium lattice constant from a Birch–Murnaghan fit of E(V) over ``points`` cells around ``a_guess``.

    ``cutoffs`` (ecutwfc, ecutrho) in Ry default to the recipes' recommendation for the structure's species.
    """
    from ase.eos import EquationOfState

    ecutwfc, ecutrho = cutoffs or recommended_cutoffs(build(a_guess).get_chemical_symbols())
    volumes, energies = [], []
    for index, a in enumerate(np.linspace(a_guess * (1 - span), a_guess * (1 + span), points)):
        atoms = build(a)
        volumes.append(atoms.get_volume())
        energies.append(pw_total_energy(atoms, pseudopotential_files, ecutwfc, ecutrho, kpoints, tmp_path / f"a{index}"))
    v0, _, _ = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    assert min(volumes) < v0 < max(volumes), "E(V) minimum outside the sampled range"
    return a_guess * (v0 / build(a_guess).get_volume()) ** (1 / 3)


@pytest.mark.dft
@pytest.mark.parametrize(
    ("formula", "structure", "a_pbe"),
    [("Si", "diamond", 5.47), ("AlAs", "zincblende", 5.73)],
)
def test_lattice_constant_of_semiconductors(formula, structure, a_pbe, pseudopotential_files, tmp_path):
    from ase.build import bulk

    a0 = fitted_lattice_constant(
        lambda a: bulk(formula, structure, a=a), a_pbe, pseudopotential_files, tmp_path,
        points=5, span=0.03, kpoints=(4, 4, 4),
    )
    print(f"{formula} {structure}: a0 = {a0:.4f} Å (PBE literature {a_pbe} Å, {100 * (a0 / a_pbe - 1):+.2f} %)")
    assert a0 == pytest.approx(a_pbe, rel=0.02)


@pytest.mark.dft
def test_lattice_constant_of_cubic_batio3(pseudopotential_files, tmp_path):
    from ase import Atoms

    def cubic_batio3(a):
        positions = [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
        return Atoms("BaTiO3", scaled_positions=positions, cell=np.eye(3) * a, pbc=True)

    # Budget settings (about a minute of CPU): one shifted 2x2x2 k-point set and 60/480 Ry. Measured on this
    # pseudopotential set: 60/480 Ry, k 2x2x2 -> 4.036 Å; 45/360 Ry, k 3x3x3 -> 4.027 Å; at 40/320 Ry the
    # under-converged O drags a0 to 3.94 Å (k 2x2x2), so the cutoff cannot go lower.
    a_pbe = 4.03
    a0 = fitted_lattice_constant(
        cubic_batio3, a_pbe, pseudopotential_files, tmp_path, points=4, span=0.02, kpoints=(2, 2, 2), cutoffs=(60.0, 480.0),
    )
    print(f"cubic BaTiO3: a0 = {a0:.4f} Å (PBE literature {a_pbe} Å, {100 * (a0 / a_pbe - 1):+.2f} %)")
    assert a0 == pytest.approx(a_pbe, rel=0.02)
