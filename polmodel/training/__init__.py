"""Fitting models to labelled frames: one model's training (train.py) with its settings (config.py), the frames'
split, fits and batches (data.py), the epochs (loop.py), the weight average (average.py) and checkpoints
(checkpoints.py); ensembles of differently seeded members (ensembles.py); errors against labels (evaluation.py); the
targets and the weighted loss on every labelled quantity, each compared in one unit (losses.py), and the parity plots
of a trained model against its labels (parity_plots.py). `polmodel train` (polmodel.cli.train) and the AiiDA
TrainCalculation drive it."""
