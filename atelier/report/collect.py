"""Read a Hydra sweep folder into one `RunRecord` per job.

A job is any folder holding ``.hydra/overrides.yaml``; folder names are only used as
labels, never parsed. Everything here tolerates jobs that are still being written.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from atelier.outputs.summary import read_summary
from atelier.sampling.manifest import read_manifest

logger = logging.getLogger(__name__)

# File names written by training; atelier.train.metrics/samples define them too, but
# importing those pulls in torch, which a report does not need.
METRICS = "metrics.jsonl"
SAMPLES_DIR = "samples"
RESOLVED_CONFIG = "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
HYDRA_CONFIG = Path(".hydra") / "hydra.yaml"
MULTIRUN = "multirun.yaml"

# train.py checks the config and records config.yaml within a second of Hydra writing
# .hydra/; a job that has not done so after this long was rejected before training.
START_GRACE_SECONDS = 120

NOT_A_SWEEP_HINT = "is this a sweep dir? it should contain one folder per job with .hydra/overrides.yaml"


class NotASweepError(ValueError):
    """The folder does not exist or holds no Hydra job folders."""


@dataclass(frozen=True)
class RunRecord:
    """What one job of a sweep did (or has done so far)."""

    name: str  # the job folder, relative to the sweep folder
    path: Path
    job_num: int | None  # Hydra's launch order
    overrides: dict[str, str]
    swept: dict[str, str] = field(default_factory=dict)  # this job's values of the keys that vary
    status: str = "pending"  # completed | failed | interrupted | running | pending
    reason: str | None = None
    steps: int | None = None
    epochs: int | None = None
    final_loss: float | None = None
    best_loss: float | None = None
    val_loss_best: float | None = None
    val_loss_last: float | None = None
    wall_seconds: float | None = None
    seconds_per_step: float | None = None
    peak_ram_mb: float | None = None
    peak_vram_mb: float | None = None
    output_file: Path | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # manifest records whose image exists

    @property
    def label(self) -> str:
        """The swept values, e.g. "optimizer=prodigy, network.dim=8" (the folder name if none vary)."""
        if not self.swept:
            return self.name
        return ", ".join(f"{key}={value}" for key, value in self.swept.items())

    def sample_path(self, record: dict[str, Any]) -> Path:
        return self.path / SAMPLES_DIR / record["file"]


@dataclass(frozen=True)
class Sweep:
    path: Path
    runs: list[RunRecord]
    swept_keys: list[str]  # override keys whose value differs between jobs, in command-line order
    constant: dict[str, str]  # overrides shared by every job, e.g. debug=smoke


def collect_sweep(sweep_dir: str | Path) -> Sweep:
    """Every job folder under `sweep_dir`, in launch order, with the keys that vary."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotASweepError(f"{sweep_dir}: no such directory")
    job_dirs = find_job_dirs(sweep_dir)
    if not job_dirs:
        raise NotASweepError(f"{sweep_dir}: no job folders found; {NOT_A_SWEEP_HINT}")

    runs = [read_run(job_dir, sweep_dir) for job_dir in job_dirs]
    runs.sort(key=lambda run: (run.job_num is None, run.job_num or 0, run.name))
    swept_keys, constant = split_overrides([run.overrides for run in runs])
    runs = [replace(run, swept={key: run.overrides.get(key, "(default)") for key in swept_keys}) for run in runs]
    runs = _settle_unstarted(runs, sequential=_launcher_is_sequential(sweep_dir))
    return Sweep(sweep_dir, runs, swept_keys, constant)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders directly in `sweep_dir`, or at any depth below a Hydra sweep root.

    Depth is only searched under multirun.yaml (hydra.sweep.subdir may nest, e.g.
    ${optimizer}/${network.dim}); otherwise a folder holding several sweeps would be
    taken for one sweep.
    """
    if (sweep_dir / MULTIRUN).is_file():
        candidates = sweep_dir.rglob(OVERRIDES.as_posix())
    else:
        candidates = sweep_dir.glob(f"*/{OVERRIDES.as_posix()}")
    return sorted(overrides.parent.parent for overrides in candidates)


def split_overrides(per_job: Sequence[dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, {key: value} shared by all)."""
    keys: list[str] = []
    for overrides in per_job:
        keys += [key for key in overrides if key not in keys]
    swept = [key for key in keys if len({overrides.get(key) for overrides in per_job}) > 1]
    constant = {key: per_job[0][key] for key in keys if key not in swept}
    return swept, constant


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """["optimizer=prodigy", "+x.y=1", "~z"] -> {"optimizer": "prodigy", "x.y": "1", "z": "(deleted)"}."""
    overrides: dict[str, str] = {}
    for line in lines:
        line = str(line)
        if line.startswith("~"):
            overrides[line[1:].split("=", 1)[0]] = "(deleted)"
            continue
        key, _, value = line.partition("=")
        overrides[key.lstrip("+")] = value
    return overrides


def read_run(job_dir: Path, sweep_dir: Path) -> RunRecord:
    name = job_dir.relative_to(sweep_dir).as_posix()
    overrides = parse_overrides(_read_yaml(job_dir / OVERRIDES) or [])
    run = RunRecord(
        name=name if name != "." else job_dir.name,
        path=job_dir,
        job_num=_job_num(job_dir),
        overrides=overrides,
    )
    run = _with_metrics(run, read_metrics(job_dir / METRICS))
    run = replace(run, samples=_existing_samples(job_dir))
    summary = read_summary(job_dir)
    if summary is not None:
        return _with_summary(run, summary)
    if run.loss_curve or (job_dir / RESOLVED_CONFIG).is_file():
        return replace(run, status="running")
    return run


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a half-written last line (the job is running) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _with_metrics(run: RunRecord, rows: list[dict[str, Any]]) -> RunRecord:
    loss_curve = _curve(rows, "loss/step")
    val_curve = _curve(rows, "loss/validation")
    step_times = [row["time/step_seconds"] for row in rows if _is_number(row.get("time/step_seconds"))]
    return replace(
        run,
        loss_curve=loss_curve,
        val_curve=val_curve,
        steps=max((int(row["step"]) for row in rows if "step" in row), default=None),
        val_loss_best=min((loss for _, loss in val_curve), default=None),
        val_loss_last=val_curve[-1][1] if val_curve else None,
        # While running, the only speed there is; summary.json replaces it at the end.
        seconds_per_step=sum(step_times) / len(step_times) if step_times else None,
    )


def _with_summary(run: RunRecord, summary: dict[str, Any]) -> RunRecord:
    memory = summary.get("peak_memory_mb") or {}
    output = summary.get("output_file")
    output_path = run.path / output if output else None
    return replace(
        run,
        status=str(summary.get("status") or "failed"),
        reason=summary.get("reason"),
        steps=summary.get("steps", run.steps),
        epochs=summary.get("epochs"),
        final_loss=_number(summary.get("final_loss")),
        best_loss=_number(summary.get("best_loss")),
        wall_seconds=_number(summary.get("wall_seconds")),
        seconds_per_step=_number(summary.get("seconds_per_step")) or run.seconds_per_step,
        peak_ram_mb=_number(memory.get("ram_mb")),
        peak_vram_mb=_number(memory.get("vram_mb")),
        output_file=output_path if output_path and output_path.is_file() else None,
    )


def _settle_unstarted(runs: list[RunRecord], sequential: bool) -> list[RunRecord]:
    """A job that never recorded its config is "pending" only while it could still start.

    train.py rejects a bad config (e.g. network.dim=0) before writing anything but
    .hydra/, and the error only reaches the sweep's console. Such a job is over once a
    later job of a sequential launcher has begun, or once it has sat idle too long.
    """
    started = [run.job_num for run in runs if run.status != "pending" and run.job_num is not None]
    last_started = max(started, default=-1)
    now = time.time()
    settled = []
    for run in runs:
        if run.status == "pending":
            overtaken = sequential and run.job_num is not None and run.job_num < last_started
            stale = now - (run.path / OVERRIDES).stat().st_mtime > START_GRACE_SECONDS
            if overtaken or stale:
                run = replace(
                    run,
                    status="failed",
                    reason="stopped before training: it wrote no config.yaml, metrics or summary.json, "
                    "so its config was most likely rejected (the error is in the sweep's console output)",
                )
        settled.append(run)
    return settled


def _launcher_is_sequential(sweep_dir: Path) -> bool:
    multirun = _read_yaml(sweep_dir / MULTIRUN) or {}
    target = str(((multirun.get("hydra") or {}).get("launcher") or {}).get("_target_", ""))
    return target.endswith("BasicLauncher")


def _job_num(job_dir: Path) -> int | None:
    hydra_cfg = _read_yaml(job_dir / HYDRA_CONFIG) or {}
    num = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("num")
    return int(num) if isinstance(num, int) else None


def _existing_samples(job_dir: Path) -> list[dict[str, Any]]:
    samples_dir = job_dir / SAMPLES_DIR
    try:
        records = read_manifest(samples_dir)
    except ValueError as error:
        logger.warning("%s: unreadable samples manifest (%s); its samples are left out", job_dir, error)
        return []
    return [r for r in records if isinstance(r, dict) and "file" in r and (samples_dir / r["file"]).is_file()]


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        # CSafeLoader when available: hydra.yaml files are long.
        return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        logger.warning("%s: unreadable (%s)", path, error)
        return None


def _curve(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[key])) for row in rows if "step" in row and _is_number(row.get(key))]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    # NaN is kept: a diverged run should say so rather than look like it has no loss.
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
