"""Plots for run directories (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def heatmap(matrix: Sequence[Sequence[float]], *, title: str, xlabel: str = "evaluated on task",
            ylabel: str = "after training task", vmin: float = 0.0, vmax: float = 1.0):
    """An accuracy-matrix heatmap with each cell annotated."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 0.8 + 0.55 * m.shape[0]))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 * vmax else "k", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=range(m.shape[1]), yticks=range(m.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def curves(series: Mapping[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
           x: Sequence[float] | None = None, band: Mapping[str, Sequence[float]] | None = None):
    """Line plot of named series (optionally with a ± band per series); integer x values get integer ticks."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        xs = np.arange(len(ys)) if x is None else np.asarray(x)
        ax.plot(xs, ys, marker="o" if len(ys) <= 30 else None, ms=3, label=name)
        if band and name in band:
            lo = np.asarray(ys) - np.asarray(band[name])
            hi = np.asarray(ys) + np.asarray(band[name])
            ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if x is None or all(float(v).is_integer() for v in x):  # task, round, step indices: no 0.5 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def grid_of(n: int, *, ncols: int = 3, size: float = 3.2):
    """A figure with ``n`` axes in rows of ``ncols`` (unused axes hidden)."""
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 0.85 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])
