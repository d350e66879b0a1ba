"""What flows into and out of the model, in ASE units: the named keys of the input and output dictionaries
(keys.py), neighbour lists in the model's edge convention (neighbors.py), ase.Atoms to input graphs and their
batching (graphs.py), labelled frames and their checks (frames.py, docs/conventions.md's format), the minimum-image
arithmetic of the multivalued polarization (polarization.py), the conversions at the Quantum ESPRESSO boundary
(units.py), ε∞ from the polarizability (dielectric.py) and what a model was trained on (domain.py). Nothing here
depends on the model."""
