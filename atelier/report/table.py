"""The runs table: one row per job, written as runs.csv and runs.json."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from atelier.report.collect import RunRecord, Sweep
from atelier.utils.atomic import write_text

# Columns after the swept keys, in order.
FIXED_COLUMNS = [
    "status",
    "steps",
    "final_loss",
    "best_loss",
    "val_loss_best",
    "val_loss_last",
    "wall_seconds",
    "seconds_per_step",
    "peak_ram_mb",
    "peak_vram_mb",
    "output_file",
    "reason",
    "best",
]


def columns(sweep: Sweep) -> list[str]:
    return ["job", *sweep.swept_keys, *FIXED_COLUMNS]


def ranking_metric(sweep: Sweep) -> str:
    """"val_loss_last" when any finished run logged validation loss, else "final_loss"."""
    if any(run.status == "completed" and _finite(run.val_loss_last) for run in sweep.runs):
        return "val_loss_last"
    return "final_loss"


def best_run(sweep: Sweep) -> RunRecord | None:
    """The completed run with the lowest ranking metric (validation loss when there is one)."""
    metric = ranking_metric(sweep)
    candidates = [run for run in sweep.runs if run.status == "completed" and _finite(getattr(run, metric))]
    return min(candidates, key=lambda run: getattr(run, metric), default=None)


def run_rows(sweep: Sweep) -> list[dict[str, Any]]:
    best = best_run(sweep)
    return [_row(sweep, run, run is best) for run in sweep.runs]


def write_runs_csv(sweep: Sweep, path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(sweep), lineterminator="\n")
    writer.writeheader()
    for row in run_rows(sweep):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    write_text(path, buffer.getvalue())
    return path


def write_runs_json(sweep: Sweep, path: Path) -> Path:
    # Strict JSON (browsers reject NaN): a non-finite loss becomes null here, "nan" in the CSV.
    rows = [{key: _json_safe(value) for key, value in row.items()} for row in run_rows(sweep)]
    write_text(path, json.dumps(rows, indent=2, allow_nan=False) + "\n")
    return path


def _row(sweep: Sweep, run: RunRecord, is_best: bool) -> dict[str, Any]:
    return {
        "job": run.name,
        **{key: run.swept.get(key) for key in sweep.swept_keys},
        "status": run.status,
        "steps": run.steps,
        "final_loss": run.final_loss,
        "best_loss": run.best_loss,
        "val_loss_best": run.val_loss_best,
        "val_loss_last": run.val_loss_last,
        "wall_seconds": run.wall_seconds,
        "seconds_per_step": run.seconds_per_step,
        "peak_ram_mb": _round(run.peak_ram_mb, 1),
        "peak_vram_mb": _round(run.peak_vram_mb, 1),
        "output_file": run.output_file.relative_to(sweep.path).as_posix() if run.output_file else None,
        "reason": run.reason,
        "best": is_best,
    }


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _round(value: float | None, digits: int) -> float | None:
    return round(value, digits) if value is not None else None


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
