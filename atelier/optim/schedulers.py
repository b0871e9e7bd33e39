"""Learning-rate schedules with sd-scripts' names.

diffusers' implementations where it has one; transformers' for cosine_with_min_lr,
inverse_sqrt and warmup_stable_decay (as sd-scripts does, num_cycles counts half-cosines there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from atelier.config.schema import SchedulerConfig, SchedulerType


def _steps(total_steps: int, steps: int, ratio: float | None) -> int:
    # An explicit step count wins over a ratio: the presets (conf/scheduler/) set a ratio, and
    # scheduler.warmup_steps=N on the command line (sd-scripts' --lr_warmup_steps) must just work.
    # The values were checked by SchedulerConfig.
    if ratio is not None and not steps:
        return math.ceil(ratio * total_steps)
    return steps


def warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    return _steps(total_steps, warmup_steps, warmup_ratio)


def decay_steps(total_steps: int, decay_steps: int, decay_ratio: float | None) -> int:
    return _steps(total_steps, decay_steps, decay_ratio)


@dataclass(frozen=True)
class ScheduleSteps:
    """A schedule's step counts, derived once from scheduler.* and the run's length; the
    trainer's optimizer, its schedule check and the lr_schedule.png plot all read these."""

    total: int
    warmup: int
    decay: int

    @classmethod
    def of(cls, cfg: SchedulerConfig, total_steps: int) -> "ScheduleSteps":
        """`cfg`: the scheduler config; `total_steps`: the run's optimizer steps."""
        return cls(
            total=total_steps,
            warmup=warmup_steps(total_steps, cfg.warmup_steps, cfg.warmup_ratio),
            decay=decay_steps(total_steps, cfg.decay_steps, cfg.decay_ratio),
        )


def build_lr_scheduler(
    scheduler_type: SchedulerType | str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    num_warmup_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    *,
    min_lr_ratio: float | None = None,
    num_decay_steps: int = 0,
    timescale: int | None = None,
    step_rules: str | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule over `total_steps` (the values are checked by SchedulerConfig)."""
    kind = SchedulerType(scheduler_type)
    if kind == SchedulerType.cosine_with_min_lr:
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps, total_steps, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio
        )
    if kind == SchedulerType.inverse_sqrt:
        from transformers.optimization import get_inverse_sqrt_schedule

        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps, timescale=timescale)
    if kind == SchedulerType.warmup_stable_decay:
        from transformers.optimization import get_wsd_schedule

        if num_warmup_steps + num_decay_steps > total_steps:
            raise ValueError(
                f"scheduler.type=warmup_stable_decay needs 0 < decay steps ({num_decay_steps}) and warmup + decay "
                f"<= total steps ({total_steps}): set scheduler.decay_ratio (e.g. 0.2) or scheduler.decay_steps"
            )
        return get_wsd_schedule(
            optimizer, num_warmup_steps, num_decay_steps, num_training_steps=total_steps,
            min_lr_ratio=min_lr_ratio or 0.0, num_cycles=num_cycles / 2,
        )  # fmt: skip
    if kind == SchedulerType.piecewise_constant:
        return get_scheduler(kind.value, optimizer, step_rules=step_rules)
    name = kind.value
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


def lr_scheduler_from_config(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `cfg` (a SchedulerConfig) describes, over `steps.total` optimizer steps."""
    return build_lr_scheduler(
        cfg.type,
        optimizer,
        steps.total,
        steps.warmup,
        cfg.num_cycles,
        cfg.power,
        min_lr_ratio=cfg.min_lr_ratio,
        num_decay_steps=steps.decay,
        timescale=cfg.timescale,
        step_rules=cfg.step_rules,
    )


def lr_curve(cfg: SchedulerConfig, base_lrs: list[float], steps: ScheduleSteps) -> list[list[float]]:
    """The lr of each param group at steps 1..steps.total, from a throwaway optimizer."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], lr=base_lrs[0])
    scheduler = lr_scheduler_from_config(cfg, optimizer, steps)
    curves: list[list[float]] = [[] for _ in base_lrs]
    for _ in range(steps.total):
        for curve, group in zip(curves, optimizer.param_groups):
            curve.append(group["lr"])
        optimizer.step()
        scheduler.step()
    return curves
