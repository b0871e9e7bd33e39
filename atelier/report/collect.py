"""Read a Hydra sweep folder into one `RunRecord` per job.

A job is any folder holding ``.hydra/overrides.yaml``; folder names are only used as
labels, never parsed. Everything here tolerates jobs that are still being written.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from atelier.outputs.summary import read_summary
from atelier.sampling.manifest import read_manifest
from atelier.outputs.sweep_plan import SweepPlan, is_bookkeeping, read_plan

logger = logging.getLogger(__name__)

# File names written by training; atelier.loop.metrics/samples define them too, but
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

# Intermediate checkpoints are <output_name>-<epoch, 6 digits>.safetensors (atelier.loop.adapter).
CHECKPOINT_EPOCH = re.compile(r"-(\d{6})\.safetensors$")
# The training loss of a run is summarised over its last steps: their mean ranks runs
# when there is no validation loss, their spread says how much of a difference is noise.
RECENT_STEPS = 50

NOT_A_SWEEP_HINT = "is this a sweep dir? it should contain one folder per job with .hydra/overrides.yaml"


class NotASweepError(ValueError):
    """The folder does not exist or holds no Hydra job folders."""


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run: its losses and the LoRA file saved at its end, if any."""

    epoch: int
    step: int | None = None
    train_loss: float | None = None  # mean step loss over the epoch (loss/epoch)
    val_loss: float | None = None
    checkpoint: Path | None = None


@dataclass(frozen=True)
class RunRecord:
    """What one job of a sweep did (or has done so far)."""

    name: str  # the job folder, relative to the sweep folder
    path: Path
    job_num: int | None  # Hydra's launch order
    overrides: dict[str, str]
    swept: dict[str, str] = field(default_factory=dict)  # this job's values of the keys that vary
    status: str = "pending"  # completed | pruned (by its search trial) | failed | interrupted | running | pending
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
    planned_output: str | None = None  # the output_name the sweeper gave the job (sweep.json)
    recent_loss: float | None = None  # mean step loss over the last `recent_steps` steps
    recent_std: float | None = None  # their standard deviation
    recent_steps: int = 0
    epoch_records: list[EpochRecord] = field(default_factory=list)
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

    @property
    def saved_epochs(self) -> list[EpochRecord]:
        return [e for e in self.epoch_records if e.checkpoint is not None]

    @property
    def best_epoch(self) -> EpochRecord | None:
        """The saved epoch to use: lowest validation loss when logged, else lowest epoch training loss."""
        saved = self.saved_epochs
        for key in ("val_loss", "train_loss"):
            scored = [e for e in saved if _is_number(getattr(e, key))]
            if scored:
                return min(scored, key=lambda e: getattr(e, key))
        return saved[-1] if saved else None


@dataclass(frozen=True)
class Sweep:
    path: Path
    runs: list[RunRecord]
    swept_keys: list[str]  # override keys whose value differs between jobs, in command-line order
    constant: dict[str, str]  # overrides shared by every job, e.g. debug=smoke
    state: str | None = None  # sweep.json's "running" | "finished" | "interrupted"; None without a plan


def collect_sweep(sweep_dir: str | Path) -> Sweep:
    """Every job folder under `sweep_dir`, in launch order, with the keys that vary."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotASweepError(f"{sweep_dir}: no such directory")
    job_dirs = find_job_dirs(sweep_dir)

    plan = read_plan(sweep_dir)
    if not job_dirs and plan is None:
        raise NotASweepError(f"{sweep_dir}: no job folders found; {NOT_A_SWEEP_HINT}")

    runs = [read_run(job_dir, sweep_dir) for job_dir in job_dirs]
    runs.sort(key=lambda run: (run.job_num is None, run.job_num or 0, run.name))
    runs = _settle_unstarted(runs, sequential=_launcher_is_sequential(sweep_dir))
    if plan is None:
        swept_keys, constant = split_overrides([run.overrides for run in runs])
    else:
        runs = _with_plan(runs, plan, sweep_dir)
        swept_keys, constant = plan.swept_keys, plan.constant
    runs = [replace(run, swept={key: run.overrides.get(key, "(default)") for key in swept_keys}) for run in runs]
    return Sweep(sweep_dir, runs, swept_keys, constant, plan.state if plan else None)


def _with_plan(runs: list[RunRecord], plan: SweepPlan, sweep_dir: Path) -> list[RunRecord]:
    """Runs in the plan's order, a record for each planned job without a folder yet, then any others.

    A planned job with no folder is pending while the sweep runs, "not started" once it stopped.
    """
    by_name = {run.name: run for run in runs}
    ordered = []
    for number, job in enumerate(plan.jobs):
        run = by_name.pop(job.name, None)
        if run is None:
            stopped = plan.state != "running"
            run = RunRecord(
                name=job.name,
                path=sweep_dir / job.name,
                job_num=None,
                overrides=parse_overrides(job.overrides),
                status="not started" if stopped else "pending",
                reason="the sweep stopped before this job" if stopped else None,
            )
        ordered.append(replace(run, planned_output=job.output_name))
    return ordered + list(by_name.values())


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
    """["optimizer=prodigy", "+x.y=1", "~z"] -> {"optimizer": "prodigy", "x.y": "1", "z": "(deleted)"}.

    Bookkeeping (`resume`, `hydra.*`) is left out: it says how a job ran, not what it trained.
    """
    overrides: dict[str, str] = {}
    for line in lines:
        line = str(line)
        if is_bookkeeping(line.split("=", 1)[0]):
            continue
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
    rows = read_metrics(job_dir / METRICS)
    run = _with_metrics(run, rows)
    run = replace(run, samples=_existing_samples(job_dir))
    summary = read_summary(job_dir)
    if summary is not None:
        run = _with_summary(run, summary)
    elif run.loss_curve or (job_dir / RESOLVED_CONFIG).is_file():
        run = replace(run, status="running")
    return replace(run, epoch_records=_epoch_records(run, rows))


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
    recent = [loss for _, loss in loss_curve[-RECENT_STEPS:]]
    return replace(
        run,
        recent_loss=statistics.fmean(recent) if recent else None,
        recent_std=statistics.stdev(recent) if len(recent) > 1 else None,
        recent_steps=len(recent),
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


def _epoch_records(run: RunRecord, rows: list[dict[str, Any]]) -> list[EpochRecord]:
    """Every epoch that logged a loss or saved a file, with its checkpoint.

    The final LoRA file belongs to the last epoch (summary.json's `epochs`); the others are
    found by their `-NNNNNN.safetensors` suffix, so a running job shows its saved epochs too.
    """
    epochs: dict[int, dict[str, Any]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if not isinstance(epoch, int):
            continue
        entry = epochs.setdefault(epoch, {})
        if "step" in row:
            entry["step"] = max(int(row["step"]), entry.get("step", 0))
        if _is_number(row.get("loss/epoch")):
            entry["train_loss"] = float(row["loss/epoch"])
        if _is_number(row.get("loss/validation")):
            entry["val_loss"] = float(row["loss/validation"])
    for path in run.path.glob("*.safetensors"):
        match = CHECKPOINT_EPOCH.search(path.name)
        if match and path != run.output_file:
            epochs.setdefault(int(match.group(1)), {})["checkpoint"] = path
    if run.output_file is not None:
        last = run.epochs or max(epochs, default=1)
        epochs.setdefault(last, {})["checkpoint"] = run.output_file
    return [EpochRecord(epoch, **epochs[epoch]) for epoch in sorted(epochs)]


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
        if run.status == "pending" and (run.path / OVERRIDES).is_file():
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
