"""Learning-rate schedules (diffusers' implementations, sd-scripts' names)."""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler

from atelier.config.schema import SchedulerType


def warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    if warmup_ratio is not None and warmup_steps:
        raise ValueError("scheduler: set warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        return math.ceil(warmup_ratio * total_steps)
    return warmup_steps


def build_lr_scheduler(
    scheduler_type: SchedulerType | str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    num_warmup_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    name = SchedulerType(scheduler_type).value
    if name == "constant" and num_warmup_steps:
        name = "constant_with_warmup"  # sd-scripts does the same
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )
