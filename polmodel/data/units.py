"""Every unit constant of the project: the conversions at the Quantum ESPRESSO boundary (pw.x, ph.x), at the LAMMPS
boundary, for reports (µC/cm², MV/cm), and the SI constants that put spectra and phonons in absolute units.

Inside the project everything is in ASE units (eV, Å, fs, V/Å, e). pw.x speaks Rydberg atomic units, in which
the electron charge is sqrt(2): the unit of charge is e/sqrt(2), so the field unit is Ry/(bohr·e/sqrt(2))
(36.3609 V/Å, the number QE's INPUT_PW quotes for `efield_cart`) and the dipole unit is bohr·e/sqrt(2).
The product of the two is exactly one Rydberg, so E = -d·ε holds in either system.
"""
import math

from ase import units as _ase

RYDBERG_EV = _ase.Ry                                  # 1 Ry in eV
BOHR_ANGSTROM = _ase.Bohr                             # 1 bohr in Å
RY_CHARGE_E = 1.0 / math.sqrt(2.0)                    # Ry unit of charge in e
RY_FIELD_V_PER_ANGSTROM = RYDBERG_EV / (BOHR_ANGSTROM * RY_CHARGE_E)   # ≈ 36.3609 V/Å
RY_DIPOLE_E_ANGSTROM = BOHR_ANGSTROM * RY_CHARGE_E                     # ≈ 0.374177 e·Å
RY_FORCE_EV_PER_ANGSTROM = RYDBERG_EV / BOHR_ANGSTROM

# Vacuum permittivity in e/(V·Å): ε∞ = 1 + α/(ε0 Ω) with α in e·Å²/V and Ω in Å³.
EPSILON0_E_PER_V_ANGSTROM = 5.526349406e-3
# 1 e/Å² in µC/cm².
E_PER_ANGSTROM2_IN_UC_PER_CM2 = 1602.176634
# 1 V/Å in MV/cm.
V_PER_ANGSTROM_IN_MV_PER_CM = 100.0
# pw.x's XML is in Hartree atomic units.
HARTREE_EV = 2.0 * RYDBERG_EV
# ph.x writes masses in Rydberg atomic units (m_e = 1/2): amu_ry = 911.444243 per amu.
AMU_IN_RY_MASS = 911.44424310865645
# ph.x's force constants, Ry/bohr², in eV/Å².
FORCE_CONSTANT_RY_PER_BOHR2_IN_EV_PER_A2 = RYDBERG_EV / BOHR_ANGSTROM ** 2
# ASE velocities are Å per ASE time unit; LAMMPS metal units' are Å/ps.
ASE_VELOCITY_IN_ANGSTROM_PER_PS = _ase.fs * 1000.0

# SI constants (CODATA 2018), used only to put spectra and phonon frequencies in absolute units.
ELEMENTARY_CHARGE_C = 1.602176634e-19
AMU_KG = 1.66053906660e-27
HBAR_J_S = 1.054571817e-34
BOLTZMANN_J_PER_K = 1.380649e-23
BOLTZMANN_EV_PER_K = 8.617333262e-5
SPEED_OF_LIGHT_M_PER_S = 2.99792458e8
SPEED_OF_LIGHT_CM_PER_S = SPEED_OF_LIGHT_M_PER_S * 100.0
VACUUM_PERMITTIVITY_F_PER_M = 8.8541878128e-12
E_ANGSTROM_IN_C_M = ELEMENTARY_CHARGE_C * 1e-10
DEBYE_IN_C_M = 3.33564095198e-30
# 1/fs -> cm⁻¹: ν̃ = f / c.
INVERSE_FS_IN_WAVENUMBER = 1.0e15 / (100.0 * SPEED_OF_LIGHT_M_PER_S)
# ω² of the mass-weighted dynamical matrix is in eV/(Å²·amu); ω/(2πc) in cm⁻¹.
EIGENVALUE_TO_WAVENUMBER = math.sqrt(ELEMENTARY_CHARGE_C / (1e-20 * AMU_KG)) / (2.0 * math.pi * SPEED_OF_LIGHT_CM_PER_S)
# 1 e = 4.80320 D/Å: mode charges squared in e²/amu → (D/Å)²/amu, the unit dynmat.x prints IR activities in.
E_SQUARED_IN_DEBYE_PER_ANGSTROM_SQUARED = (E_ANGSTROM_IN_C_M / DEBYE_IN_C_M) ** 2
# 1 (D/Å)²/amu = 42.2561 km/mol (the integrated molar absorption coefficient of a harmonic mode).
DEBYE_PER_ANGSTROM_SQUARED_PER_AMU_IN_KM_PER_MOL = 42.2561


def field_ry_to_v_per_angstrom(field_ry):
    return field_ry * RY_FIELD_V_PER_ANGSTROM


def field_v_per_angstrom_to_ry(field_v_per_angstrom):
    return field_v_per_angstrom / RY_FIELD_V_PER_ANGSTROM


def dipole_ry_to_e_angstrom(dipole_ry):
    return dipole_ry * RY_DIPOLE_E_ANGSTROM
