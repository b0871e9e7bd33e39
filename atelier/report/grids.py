"""samples_prompt<NN>.png: for each sample prompt, runs (rows) by saved epoch (columns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from atelier.report.collect import RunRecord
from atelier.sampling.grid import (
    ColKey,
    GridLayout,
    RowKey,
    default_cell_size,
    grid_image,
    grid_layout,
    latest_cells,
    save_image,
)

logger = logging.getLogger(__name__)

GRID_PREFIX = "samples_prompt"
# The frame around each run's best saved epoch (the report's star colour).
BEST_FRAME = (247, 144, 9)


@dataclass(frozen=True)
class PromptGrid:
    path: Path
    prompt_index: int
    prompt: str
    runs: list[str]  # row labels, top to bottom
    columns: list[str]
    best_cells: list[tuple[int, int]]  # (row, column) framed as that run's best epoch


def grid_name(number: int) -> str:
    return f"{GRID_PREFIX}{number:02d}.png"


def grid_title(prompt_index: int, prompt: str) -> str:
    return f"prompt {prompt_index}: {prompt or '(empty prompt)'}"


def write_prompt_grids(runs: Sequence[RunRecord], out_dir: Path) -> list[PromptGrid]:
    """One grid per distinct prompt; grids left from an earlier report with more prompts are removed."""
    prompts = sorted({row for run in runs for row in latest_cells(run.samples)[0]})
    grids = [_write_grid(runs, prompt, out_dir / grid_name(number)) for number, prompt in enumerate(prompts)]
    written = {grid.path.name for grid in grids}
    for stale in out_dir.glob(f"{GRID_PREFIX}*.png"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)
    return grids


def _write_grid(runs: Sequence[RunRecord], prompt: RowKey, path: Path) -> PromptGrid:
    index, text = prompt
    cells_by_run = {}
    for run in runs:
        records = [r for r in run.samples if (int(r["index"]), str(r["prompt"])) == prompt]
        if records:
            cells_by_run[run.name] = (run, latest_cells(records)[2])
    # Column order from every run's samples together: training order (by step) across the sweep.
    all_records = [cell for _, cells in cells_by_run.values() for cell in cells.values()]
    col_keys = latest_cells(all_records)[1]
    cell_size = default_cell_size([(int(r["width"]), int(r["height"])) for r in all_records if "width" in r])

    rows, labels, best_cells = [], [], []
    for row, (run, cells) in enumerate(cells_by_run.values()):
        rows.append([_load(run, cells.get((prompt, col)), cell_size) for col in col_keys])
        label = run.label if run.status == "completed" else f"{run.label} ({run.status})"
        best = run.best_epoch
        if best is not None and ("epoch", best.epoch) in col_keys:
            best_cells.append((row, col_keys.index(("epoch", best.epoch))))
            label += f" (best: epoch {best.epoch})"
        labels.append(label)
    col_labels = [_column_label(col) for col in col_keys]
    title = grid_title(index, text)
    image = grid_image(rows, labels, col_labels, title=title, cell_size=cell_size)
    _frame_best(image, grid_layout(len(rows), len(col_labels), cell_size, title), best_cells)
    save_image(image, path)
    return PromptGrid(path, index, text, labels, col_labels, best_cells)


def _frame_best(image: Image.Image, layout: GridLayout, cells: Sequence[tuple[int, int]]) -> None:
    # Drawn in the gap around the cell, so the sample itself is not covered.
    draw = ImageDraw.Draw(image)
    width = max(2, layout.gap // 2)
    for row, col in cells:
        x0, y0, x1, y1 = layout.cell_box(row, col)
        draw.rectangle((x0 - width, y0 - width, x1 + width - 1, y1 + width - 1), outline=BEST_FRAME, width=width)


def _load(run: RunRecord, record: dict | None, cell_size: tuple[int, int]) -> Image.Image | None:
    if record is None:
        return None
    # Fitted on load, so a sweep of many runs and epochs never holds full-size images.
    try:
        with Image.open(run.sample_path(record)) as image:
            return ImageOps.contain(image.convert("RGB"), cell_size, Image.Resampling.LANCZOS)
    except OSError as error:  # a running job may be writing it right now
        logger.warning("%s: unreadable sample (%s); shown as missing", run.sample_path(record), error)
        return None


def _column_label(col: ColKey) -> str:
    kind, number = col
    return f"{kind} {number}"
