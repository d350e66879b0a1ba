"""Parity plots (label vs prediction) of trained models, written as PNG with matplotlib's Agg backend."""
import os

import numpy as np

from polmodel.training.losses import QUANTITY_UNITS

TITLES = {
    "energy": "Energy",
    "forces": "Forces",
    "stress": "Stress",
    "dipole": "Cell dipole (folded onto the prediction's branch)",
    "born_effective_charges": "Born effective charges",
    "polarizability": "Polarizability",
}


def parity_plot(label, predicted, path, title, unit):
    """One parity plot with the y = x line, MAE and RMSE in the legend; returns `path`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    label = np.asarray(label, dtype=float).ravel()
    predicted = np.asarray(predicted, dtype=float).ravel()
    error = predicted - label
    figure = Figure(figsize=(4.2, 4.0), dpi=110)
    axes = figure.add_subplot()
    low = float(min(label.min(), predicted.min()))
    high = float(max(label.max(), predicted.max()))
    margin = 0.05 * (high - low or 1.0)
    axes.plot([low - margin, high + margin], [low - margin, high + margin], color="0.6", lw=1)
    axes.scatter(label, predicted, s=8, alpha=0.7,
                 label=f"MAE {np.mean(np.abs(error)):.3g}\nRMSE {np.sqrt(np.mean(error ** 2)):.3g}")
    axes.set_xlim(low - margin, high + margin)
    axes.set_ylim(low - margin, high + margin)
    axes.set_xlabel(f"label ({unit})")
    axes.set_ylabel(f"prediction ({unit})")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_parity_plots(pairs, directory):
    """One `<quantity>_parity.png` per quantity in `pairs` ({quantity: (labels, predictions)}); returns paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for quantity, (label, predicted) in pairs.items():
        if len(label) == 0:
            continue
        path = os.path.join(directory, f"{quantity}_parity.png")
        paths.append(parity_plot(label, predicted, path, TITLES.get(quantity, quantity), QUANTITY_UNITS[quantity]))
    return paths
