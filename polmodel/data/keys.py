"""Named keys of the data dictionaries that flow through the model, with shapes and units.

N atoms in a batch, E edges, G graphs (frames) in a batch. One search for a key finds every place it is used.
"""
# --- inputs -----------------------------------------------------------------------------------------------
POSITIONS = "positions"            # (N, 3) Å
CELL = "cell"                      # (G, 3, 3) Å, rows are lattice vectors; zeros for open boundaries
PBC = "pbc"                        # (G, 3) bool
SPECIES_INDEX = "species_index"    # (N,) long, index into the model's species list
BATCH = "batch"                    # (N,) long, graph index of each atom
EDGE_INDEX = "edge_index"          # (2, E) long, [receiver i, sender j]: j is a neighbour of i
EDGE_CELL_SHIFT = "edge_cell_shift"  # (E, 3) float, integer lattice shifts: r_ij = r_j - r_i + shift @ cell
EFIELD = "efield"                  # (G, 3) V/Å, homogeneous field

# --- outputs ----------------------------------------------------------------------------------------------
ATOMIC_ENERGY = "atomic_energy"    # (N,) eV
ENERGY = "energy"                  # (G,) eV, electric enthalpy at the frame's field
FORCES = "forces"                  # (N, 3) eV/Å
STRESS = "stress"                  # (G, 3, 3) eV/Å^3, ASE sign
VIRIAL = "virial"                  # (G, 3, 3) eV
DIPOLE = "dipole"                  # (G, 3) e·Å, cell dipole ΩP = -∂E/∂ε
POLARIZATION = "polarization"      # (G, 3) e/Å², P = ΩP/Ω
BORN_CHARGES = "born_effective_charges"  # (N, 3, 3) e, [i, a, b] = ∂F_ib/∂ε_a
POLARIZABILITY = "polarizability"  # (G, 3, 3) e·Å²/V, -∂²E/∂ε_a∂ε_b
DIELECTRIC = "dielectric_tensor"   # (G, 3, 3) 1, ε∞

# --- labels that only exist on DFT frames -------------------------------------------------------------------
POLARIZATION_QUANTUM = "polarization_quantum"  # (G, 3, 3) e·Å, rows are quantum vectors f·e·R_i
NUM_ATOMS = "num_atoms"            # (G,) long
