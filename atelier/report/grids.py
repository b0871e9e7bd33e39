"""samples_prompt<NN>.png: for each sample prompt, runs (rows) by saved epoch (columns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from atelier.report.collect import RunRecord
from atelier.sampling.grid import ColKey, RowKey, default_cell_size, grid_image, latest_cells, save_image

logger = logging.getLogger(__name__)

GRID_PREFIX = "samples_prompt"


@dataclass(frozen=True)
class PromptGrid:
    path: Path
    prompt_index: int
    prompt: str
    runs: list[str]  # row labels, top to bottom
    columns: list[str]


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

    rows, labels = [], []
    for run, cells in cells_by_run.values():
        rows.append([_load(run, cells.get((prompt, col)), cell_size) for col in col_keys])
        labels.append(run.label if run.status == "completed" else f"{run.label} ({run.status})")
    col_labels = [_column_label(col) for col in col_keys]
    image = grid_image(rows, labels, col_labels, title=grid_title(index, text), cell_size=cell_size)
    save_image(image, path)
    return PromptGrid(path, index, text, labels, col_labels)


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
