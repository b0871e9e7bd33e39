"""Where training numbers go: a JSON-lines log, the trackers (TensorBoard, wandb), and summary.json."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from atelier.config.schema import AtelierConfig
from atelier.loop.trackers import TENSORBOARD, open_trackers
from atelier.sampling.manifest import SAMPLES_DIR, drop_records_after
from atelier.utils.atomic import naming_a_full_disk, write_text

METRICS = "metrics.jsonl"
__all__ = ["METRICS", "TENSORBOARD", "MetricsLog", "NullMetrics", "peak_memory_mb"]


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    peak = {"ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class MetricsLog:
    """Per-step scalars to metrics.jsonl (read by sweep reports) and the trackers of
    output.log_with (TensorBoard by default; atelier.loop.trackers)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, cfg: AtelierConfig | None = None):
        """`resume_step`: continuing a run from that step; None: starting it (again) from 0.
        What a killed run logged after the state it continues from is dropped (metrics.jsonl,
        TensorBoard, the samples manifest), so no step is ever recorded twice. `cfg`: the run's
        config, whose output.log_with / logging_dir choose the trackers (None: TensorBoard in
        <run_dir>/tensorboard)."""
        self.run_dir = run_dir
        kept = resume_step if resume_step is not None else -1  # a fresh start keeps nothing
        self.trackers = open_trackers(cfg, run_dir, resume_step)
        _truncate_after(run_dir / METRICS, kept)
        drop_records_after(run_dir / SAMPLES_DIR, kept)
        self._jsonl = open(run_dir / METRICS, "a", encoding="utf-8", buffering=1)

    def log(self, step: int, scalars: dict[str, float], **fields: Any) -> None:
        for tracker in self.trackers:
            tracker.log(step, scalars, fields)
        record = {"step": step, "time": round(time.time(), 3), **fields, **scalars}
        with naming_a_full_disk(self.run_dir / METRICS):
            self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self._jsonl.close()


class NullMetrics:
    """Where the processes of a data-parallel run other than the main one log: nowhere."""

    def log(self, step: int, scalars: dict[str, float], **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to `step`; a line cut short by a kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(line + "\n" for line in kept))


