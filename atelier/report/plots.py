"""loss_curves.png: every run's training loss on one chart; <job>/report_loss.png: each run's;
search_history.png: a search's optimisation history."""

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
from atelier.report.search import SearchReport  # noqa: E402
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


# One small chart per run, all on the same axes, so 16 runs stay readable side by side.
RUN_PLOT = "report_loss.png"


def plot_run_losses(runs: Sequence[RunRecord]) -> dict[str, Path]:
    """<job>/report_loss.png for every run that logged a loss; {run name: path}.

    Every chart has the same step and loss ranges as the others, so they compare at a glance.
    """
    plotted = [run for run in runs if (run.loss_curve or run.val_curve) and run.path.is_dir()]
    losses = [loss for run in plotted for _, loss in run.loss_curve + run.val_curve if math.isfinite(loss)]
    steps = [step for run in plotted for step, _ in run.loss_curve + run.val_curve]
    log_scale = _wants_log_scale(losses)
    paths = {}
    for run in plotted:
        fig, ax = plt.subplots(figsize=(3.2, 2.0), dpi=100)
        if run.loss_curve:
            xs, ys = zip(*run.loss_curve)
            window = smoothing_window(len(ys))
            if window > 1:
                ax.plot(xs, ys, color="#175cd3", alpha=0.2, linewidth=0.7)
            ax.plot(xs, moving_average(ys, window), color="#175cd3", linewidth=1.5,
                    marker="o" if len(ys) < 10 else None, markersize=3)
        if run.val_curve:
            xs, ys = zip(*run.val_curve)
            ax.plot(xs, ys, color="#b54708", linestyle="--", marker="s", markersize=3)
        best = run.best_epoch
        if best is not None and best.step is not None:
            ax.axvline(best.step, color="#f79009", linewidth=1, linestyle=":")
        if log_scale:
            ax.set_yscale("log")
        elif losses:
            low, high = min(losses), max(losses)
            pad = (high - low) * 0.05 or abs(high) * 0.05 or 0.05
            ax.set_ylim(low - pad, high + pad)
        if steps:
            ax.set_xlim(min(steps), max(max(steps), min(steps) + 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        path = run.path / RUN_PLOT
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(fig)
        paths[run.name] = path
    return paths


# The search's optimisation history (a sweep with a study).
SEARCH_PLOT = "search_history.png"


def plot_search_history(search: SearchReport, path: Path) -> Path:
    """Each complete trial's objective by trial number, the best so far as a step line, and each
    pruned trial at the last validation loss it reported (grey x)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    complete = [t for t in search.trials if t.state == "complete" and t.value is not None and math.isfinite(t.value)]
    pruned = [t for t in search.trials if t.state == "pruned" and t.last_report is not None]
    if complete:
        xs, ys = [t.number for t in complete], [t.value for t in complete]
        ax.plot(xs, ys, "o", color="#175cd3", label=f"complete: {search.objective}")
        pick = np.minimum if search.direction == "minimize" else np.maximum
        ax.step(xs, pick.accumulate(ys), where="post", color="#f79009", linewidth=1.6, label="best so far")
    if pruned:
        ax.plot([t.number for t in pruned], [t.last_report[1] for t in pruned], "x", color="#667085",
                markersize=7, label="pruned: last validation loss")
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no trial has ended yet", ha="center", va="center", transform=ax.transAxes, fontsize=13)
    else:
        ax.legend(loc="best", fontsize=8, frameon=False)
    ax.set_title("Optimisation history")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(search.objective)
    ax.grid(True, alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
