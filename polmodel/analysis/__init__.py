"""From trajectories and models to observables: spectra and static response — ε∞ from α, the IR absorption from a
dipole time series or from harmonic modes, ε0 from fluctuations, a small field or the modes (spectra.py) —,
Γ-point phonons and their coupling to light from any force constants, ph.x's or the model's Hessian (phonons.py),
and what kind of run a trajectory is, P–E hysteresis, spectrum peaks and plots (observables.py). `polmodel analyze`
(polmodel.cli.analyze) and the DFPT workchain use them."""
