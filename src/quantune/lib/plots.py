"""Plots the stages share (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import math
from pathlib import Path

from .common import atomic_savefig


def plot_losses(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, title: str) -> None:
    """Raw loss and an exponentially smoothed line per series (LLaMA-Factory's --plot_loss style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, pts) in enumerate(series.items()):
        if not pts:
            continue
        xs, ys = zip(*pts)
        color = f"C{i}"
        ax.plot(xs, ys, color=color, alpha=0.35, linewidth=1)
        w = 1.8 * (1 / (1 + math.exp(-0.05 * len(ys))) - 0.5)  # more points -> more smoothing
        sm, last = [], ys[0]
        for y in ys:
            last = last * w + (1 - w) * y
            sm.append(last)
        ax.plot(xs, sm, color=color, linewidth=2, label=f"{label} (smoothed)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
