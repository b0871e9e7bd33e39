"""The runs table: one row per job, written as runs.csv and runs.json."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from atelier.report.collect import RunRecord, Sweep
from atelier.report.ranking import rank
from atelier.report.search import SearchReport
from atelier.utils.atomic import write_text

# Columns after the swept keys, in order.
FIXED_COLUMNS = [
    "status",
    "trial",  # the sweep's study (a search, or a grid with pruning): the run's trial number,
    "trial_state",  # how it ended (complete | pruned | failed | running),
    "objective",  # and its objective when complete; blank for a sweep without a study
    "steps",
    "final_loss",
    "best_loss",
    "recent_loss",
    "recent_loss_std",
    "val_loss_best",
    "val_loss_last",
    "wall_seconds",
    "seconds_per_step",
    "peak_ram_mb",
    "peak_vram_mb",
    "output_file",
    "lora_name",
    "best_epoch",
    "best_epoch_file",
    "reason",
    "best",
]


def columns(sweep: Sweep) -> list[str]:
    return ["job", *sweep.swept_keys, *FIXED_COLUMNS]


def run_rows(sweep: Sweep, search: SearchReport | None = None) -> list[dict[str, Any]]:
    best = rank(sweep).best
    return [_row(sweep, run, run is best, search) for run in sweep.runs]


def write_runs_csv(sweep: Sweep, path: Path, search: SearchReport | None = None) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(sweep), lineterminator="\n")
    writer.writeheader()
    for row in run_rows(sweep, search):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    write_text(path, buffer.getvalue())
    return path


def write_runs_json(sweep: Sweep, path: Path, search: SearchReport | None = None) -> Path:
    # Strict JSON (browsers reject NaN): a non-finite loss becomes null here, "nan" in the CSV.
    rows = [{key: _json_safe(value) for key, value in row.items()} for row in run_rows(sweep, search)]
    write_text(path, json.dumps(rows, indent=2, allow_nan=False) + "\n")
    return path


def lora_name(run: RunRecord) -> str | None:
    """The LoRA file's name: the one written, else the one the sweeper planned (while it trains)."""
    if run.output_file is not None:
        return run.output_file.name
    if run.planned_output and "${" not in run.planned_output:
        return f"{run.planned_output}.safetensors"
    return None


def _row(sweep: Sweep, run: RunRecord, is_best: bool, search: SearchReport | None) -> dict[str, Any]:
    best = run.best_epoch
    trial = search.trial_of(run.name) if search else None
    return {
        "job": run.name,
        **{key: run.swept.get(key) for key in sweep.swept_keys},
        "status": run.status,
        "trial": trial.number if trial else None,
        "trial_state": trial.state if trial else None,
        "objective": trial.value if trial else None,
        "steps": run.steps,
        "final_loss": run.final_loss,
        "best_loss": run.best_loss,
        "recent_loss": run.recent_loss,
        "recent_loss_std": run.recent_std,
        "val_loss_best": run.val_loss_best,
        "val_loss_last": run.val_loss_last,
        "wall_seconds": run.wall_seconds,
        "seconds_per_step": run.seconds_per_step,
        "peak_ram_mb": _round(run.peak_ram_mb, 1),
        "peak_vram_mb": _round(run.peak_vram_mb, 1),
        "output_file": run.output_file.relative_to(sweep.path).as_posix() if run.output_file else None,
        "lora_name": lora_name(run),
        "best_epoch": best.epoch if best else None,
        "best_epoch_file": best.checkpoint.relative_to(sweep.path).as_posix() if best and best.checkpoint else None,
        "reason": run.reason,
        "best": is_best,
    }


def _round(value: float | None, digits: int) -> float | None:
    return round(value, digits) if value is not None else None


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
