"""Fitting models to labelled frames: the training loop with reference energies, train/validation split, early
stopping, metrics and ensembles of differently seeded members (train.py), the targets and the weighted loss on every
labelled quantity, each compared in one unit (losses.py), and the parity plots of a trained model against its labels
(parity_plots.py). `polmodel train` (polmodel.cli.train) and the AiiDA TrainCalculation drive it."""
