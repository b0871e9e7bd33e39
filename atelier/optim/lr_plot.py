"""lr_schedule.png: the learning-rate schedule a run is about to follow, drawn at its start."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from atelier.utils.atomic import atomic_path  # noqa: E402

LR_SCHEDULE_PNG = "lr_schedule.png"


def plot_lr_schedule(curves: dict[str, Sequence[float]], path: Path, title: str, note: str | None = None) -> Path:
    """One line per param group (lr at steps 1..N); written atomically as a PNG."""
    key = tuple((label, tuple(float(lr) for lr in curve)) for label, curve in curves.items())
    png = _render_png(key, title, note)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


# The jobs of an in-process sweep often plan the same schedule (only the seed or the rank
# differs): it is drawn once (~0.08 s on a small CPU) and the same PNG written again.
@functools.lru_cache(maxsize=8)
def _render_png(curves: tuple[tuple[str, tuple[float, ...]], ...], title: str, note: str | None) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    try:
        for i, (label, curve) in enumerate(curves):
            steps = range(1, len(curve) + 1)
            # Dashed after the first line: equal schedules would otherwise hide each other.
            ax.plot(steps, curve, label=label, linewidth=1.6, linestyle="-" if i == 0 else "--",
                    marker="o" if len(curve) < 20 else None, markersize=3)  # fmt: skip
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        if note:
            fig.text(0.01, 0.01, note, fontsize=8, color="dimgray")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    return png.getvalue()
