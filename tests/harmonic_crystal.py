"""A charged harmonic toy crystal with known dielectric and IR answers, runnable by `polmodel.dynamics.md.run_md`.

Analytic stand-in for a model (the analysis under test does not care where the dipoles come from): each atom i
(charge q_i, mass m_i) sits in an isotropic spring k to its own site, with no coupling between atoms, so

    E(R, ε) = ½ k Σ_i |u_i|² − ε · D,   D = Σ_i q_i u_i   (u_i = R_i − site_i)

Every atom carries three modes at ω_i = √(k/m_i), mode charge |Z̃| = |q_i|/√m_i along each axis, so:
    ε0 − ε∞ = Σ_i q_i² / (ε_vac V k)           (ε∞ = 1: no electrons)
    ∫ α n dω = π Σ_modes |Z̃|² / (6 ε_vac c V)  per line, i.e. π q_i² / (2 ε_vac c V m_i) for atom i's three modes.
"""
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes


class HarmonicCrystalCalculator(Calculator):
    """Energy, forces, dipole and polarization of the harmonic toy; speaks the field interface run_md uses."""

    implemented_properties = ["energy", "free_energy", "forces", "dipole", "polarization"]
    is_ensemble = False

    def __init__(self, sites, charges, spring, efield=(0.0, 0.0, 0.0)):
        super().__init__()
        self.sites = np.asarray(sites, dtype=float)
        self.charges = np.asarray(charges, dtype=float)
        self.spring = float(spring)
        self.efield = np.asarray(efield, dtype=float)
        self.results_efield = None

    def set(self, **kwargs):
        if "efield" in kwargs:
            self.efield = np.asarray(kwargs.pop("efield"), dtype=float)
            self.reset()
        return super().set(**kwargs)

    def set_field_for_next_positions(self, efield):
        self.efield = np.asarray(efield, dtype=float)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        displacement = self.atoms.get_positions() - self.sites
        dipole = self.charges @ displacement
        energy = 0.5 * self.spring * np.sum(displacement ** 2) - self.efield @ dipole
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": -self.spring * displacement + np.outer(self.charges, self.efield),
                        "dipole": dipole, "polarization": dipole / self.atoms.get_volume()}
        self.results_efield = self.efield.copy()


def harmonic_crystal(masses=(4.5, 27.0), charges=(1.5, -1.5), spring=20.0, cell=6.0):
    """(atoms, calculator): one atom per (mass, charge) on a line of sites in a cubic cell (Å, amu, e, eV/Å²)."""
    count = len(masses)
    sites = np.array([[cell * (index + 0.5) / count, 0.5 * cell, 0.5 * cell] for index in range(count)])
    atoms = Atoms(["H"] * count, positions=sites, cell=np.eye(3) * cell, pbc=True)
    atoms.set_masses(masses)
    return atoms, HarmonicCrystalCalculator(sites, charges, spring)


def equipartition_momenta(atoms, temperature_K, seed=0):
    """Momenta that give every Cartesian oscillator exactly k_B T of energy, started at its site with random
    signs: then the run's mean kinetic temperature is T and each line's strength is the canonical average."""
    from ase import units

    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(len(atoms), 3))
    speed = np.sqrt(2.0 * units.kB * temperature_K / atoms.get_masses())
    return signs * (atoms.get_masses() * speed)[:, None]
