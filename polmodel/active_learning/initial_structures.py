"""Initial structures for a first training set, the way DP-GEN makes them (its `init_bulk` step).

From each given structure: `count` copies whose cell is strained by a random symmetric strain with components up
to `max_strain` (a fraction, e.g. 0.03 for 3 %; atoms move with the cell), and whose atoms are then displaced by
random vectors with components up to `max_displacement` Å. The ideal structure of a high-symmetry cell has zero
forces by symmetry, so a first model trained on it alone has never seen a force; these copies give it forces,
stresses and a range of bond lengths from the cheapest DFT label (one zero-field SCF each).
Pure numpy + ASE, seeded: the same inputs give the same structures.
"""
import numpy as np


def perturbed_structures(atoms, count, max_strain, max_displacement, seed=0):
    """`count` strained and displaced copies of `atoms` (ase.Atoms; the input is not modified).

    Strain components are drawn uniformly from [-max_strain, max_strain] and symmetrized (a rotation-free
    deformation), displacement components uniformly from [-max_displacement, max_displacement] Å.
    """
    if int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count}")
    if not 0.0 <= max_strain < 0.5:
        raise ValueError(f"max_strain is a fraction in [0, 0.5), got {max_strain}")
    if max_displacement < 0.0:
        raise ValueError(f"max_displacement must be >= 0 Å, got {max_displacement}")
    if not np.all(atoms.pbc):
        raise ValueError("perturbed cells need a structure periodic in all three directions")
    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(int(count)):
        strain = rng.uniform(-max_strain, max_strain, (3, 3))
        strain = 0.5 * (strain + strain.T)
        perturbed = atoms.copy()
        perturbed.calc = None
        perturbed.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain), scale_atoms=True)
        perturbed.positions += rng.uniform(-max_displacement, max_displacement, perturbed.positions.shape)
        perturbed.wrap()
        structures.append(perturbed)
    return structures
