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


def make_slots(
    gpus: Sequence[int | str] | None, jobs_per_gpu: int, cpu_slots: int, gpus_per_job: int = 1
) -> list[Slot]:
    """`jobs_per_gpu` slots per GPU (or per group of `gpus_per_job` GPUs, for data-parallel
    jobs); `cpu_slots` CPU slots when there is no GPU."""
    if jobs_per_gpu < 1 or cpu_slots < 1 or gpus_per_job < 1:
        raise ValueError(
            "hydra.launcher.jobs_per_gpu, hydra.launcher.gpus_per_job and hydra.launcher.cpu_slots must be at least 1"
        )
    devices = [str(g) for g in gpus] if gpus is not None else visible_gpus()
    if not devices:
        return [Slot(i, None) for i in range(cpu_slots)]
    if len(devices) < gpus_per_job:
        raise ValueError(
            f"hydra.launcher.gpus_per_job={gpus_per_job}, but only {len(devices)} GPU(s) are available: {devices}"
        )
    # Left-over GPUs (fewer than gpus_per_job) stay idle rather than run a job short of devices.
    groups = [",".join(devices[i : i + gpus_per_job]) for i in range(0, len(devices) - gpus_per_job + 1, gpus_per_job)]
    return [Slot(i, d) for i, d in enumerate(d for d in groups for _ in range(jobs_per_gpu))]
