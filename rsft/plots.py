"""Figures written as PNG artifacts (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rsft.runtime import atomic_path  # noqa: E402

# PNG metadata without a software version or date keeps files byte-identical.
_PNG_METADATA = {"Software": None}


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    """Write a figure as PNG atomically and close it."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata=_PNG_METADATA)
    plt.close(figure)


def p_histogram(
    p_fakes: np.ndarray, p_reals: np.ndarray, threshold: float | None, label: str
) -> plt.Figure:
    """Histogram of p for scored fakes and held-out reals, with the threshold marked."""
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.0, 1.0, 51)
    axis.hist(p_fakes, bins=bins, alpha=0.6, density=True, label="fakes (scored)")
    axis.hist(p_reals, bins=bins, alpha=0.6, density=True, label="reals (held out)")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    axis.set_xlabel(label)
    axis.set_ylabel("density")
    axis.legend()
    figure.tight_layout()
    return figure
