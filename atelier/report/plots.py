"""loss_curves.png: every run's training loss on one chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on training machines without a display

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from atelier.report.collect import RunRecord  # noqa: E402
from atelier.utils.atomic import atomic_path  # noqa: E402

# Beyond this max/min ratio a linear axis squashes the later, interesting part of the curves.
LOG_SCALE_RATIO = 10.0


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points; the first points average what there is so far."""
    data = np.asarray(values, dtype=float)
    if window <= 1 or len(data) == 0:
        return data
    cumulative = np.concatenate([[0.0], np.cumsum(data)])
    ends = np.arange(1, len(data) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def smoothing_window(n_points: int) -> int:
    return max(1, n_points // 20)


def plot_loss_curves(runs: Sequence[RunRecord], path: Path, title: str = "Training loss") -> Path:
    """One coloured line per run (smoothed, raw values faint behind), labelled by its swept values."""
    plotted = [run for run in runs if run.loss_curve or run.val_curve]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_losses: list[float] = []
    for i, run in enumerate(plotted):
        color = colors[i % len(colors)]
        label = run.label if run.status == "completed" else f"{run.label} ({run.status})"
        if run.loss_curve:
            steps, losses = zip(*run.loss_curve)
            all_losses += losses
            window = smoothing_window(len(losses))
            if window > 1:
                ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, moving_average(losses, window), color=color, linewidth=1.8, label=label,
                    marker="o" if len(losses) < 10 else None, markersize=3)
        if run.val_curve:
            steps, losses = zip(*run.val_curve)
            all_losses += losses
            ax.plot(steps, losses, color=color, linestyle="--", marker="s", markersize=4,
                    label=f"{label} validation")

    if not plotted:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    elif _wants_log_scale(all_losses):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss" + (" (moving average; raw values faint)" if _any_smoothed(plotted) else ""))
    ax.grid(True, alpha=0.3)
    if plotted:
        # Below the axes, so long "key=value, ..." labels never cover the curves.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(plotted) > 4 else 1,
                  frameon=False, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _wants_log_scale(losses: Sequence[float]) -> bool:
    positive = [loss for loss in losses if loss > 0 and math.isfinite(loss)]
    return bool(positive) and len(positive) == len(losses) and max(positive) / min(positive) > LOG_SCALE_RATIO


def _any_smoothed(runs: Sequence[RunRecord]) -> bool:
    return any(smoothing_window(len(run.loss_curve)) > 1 for run in runs)
