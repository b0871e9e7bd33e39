"""Where training numbers go: TensorBoard, a JSON-lines log, and summary.json."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from atelier.sampling.manifest import SAMPLES_DIR, drop_records_after
from atelier.utils.atomic import naming_a_full_disk, write_text

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    peak = {"ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class MetricsLog:
    """Per-step scalars to TensorBoard and metrics.jsonl (read by sweep reports)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        """`resume_step`: continuing a run from that step; None: starting it (again) from 0.
        What a killed run logged after the state it continues from is dropped (metrics.jsonl,
        TensorBoard, the samples manifest), so no step is ever recorded twice."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        kept = resume_step if resume_step is not None else -1  # a fresh start keeps nothing
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=kept + 1)
        _truncate_after(run_dir / METRICS, kept)
        drop_records_after(run_dir / SAMPLES_DIR, kept)
        self._jsonl = open(run_dir / METRICS, "a", encoding="utf-8", buffering=1)

    def log(self, step: int, scalars: dict[str, float], **fields: Any) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        record = {"step": step, "time": round(time.time(), 3), **fields, **scalars}
        with naming_a_full_disk(self.run_dir / METRICS):
            self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.writer.close()
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


