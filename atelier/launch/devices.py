"""Which devices a local launcher hands out, one slot per concurrent job."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """A place for one running job: a GPU id, or a CPU slot (device None)."""

    index: int
    device: str | None

    @property
    def label(self) -> str:
        return f"gpu {self.device}" if self.device is not None else f"cpu {self.index}"

    @property
    def cuda_visible_devices(self) -> str:
        # An empty value hides every GPU from a CPU job.
        return self.device if self.device is not None else ""


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def make_slots(gpus: Sequence[int | str] | None, jobs_per_gpu: int, cpu_slots: int) -> list[Slot]:
    """`jobs_per_gpu` slots per GPU; `cpu_slots` CPU slots when there is no GPU."""
    if jobs_per_gpu < 1 or cpu_slots < 1:
        raise ValueError("hydra.launcher.jobs_per_gpu and hydra.launcher.cpu_slots must be at least 1")
    devices = [str(g) for g in gpus] if gpus is not None else visible_gpus()
    if not devices:
        return [Slot(i, None) for i in range(cpu_slots)]
    return [Slot(i, d) for i, d in enumerate(d for d in devices for _ in range(jobs_per_gpu))]
