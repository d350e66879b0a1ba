"""Unit conversions at the Quantum ESPRESSO boundary, and nowhere else.

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


def field_ry_to_v_per_angstrom(field_ry):
    return field_ry * RY_FIELD_V_PER_ANGSTROM


def field_v_per_angstrom_to_ry(field_v_per_angstrom):
    return field_v_per_angstrom / RY_FIELD_V_PER_ANGSTROM


def dipole_ry_to_e_angstrom(dipole_ry):
    return dipole_ry * RY_DIPOLE_E_ANGSTROM
