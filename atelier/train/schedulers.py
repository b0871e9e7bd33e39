"""Learning-rate schedules with sd-scripts' names.

diffusers' implementations where it has one; transformers' for cosine_with_min_lr,
inverse_sqrt and warmup_stable_decay (as sd-scripts does, num_cycles counts half-cosines there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from atelier.config.schema import SchedulerConfig
from atelier.config.schema import SchedulerType

# Keys of SchedulerConfig that only some schedules read; setting one for another schedule
# is a mistake worth stopping for.
KEYS_USED_BY: dict[str, frozenset[SchedulerType]] = {
    "min_lr_ratio": frozenset({SchedulerType.cosine_with_min_lr, SchedulerType.warmup_stable_decay}),
    "decay_steps": frozenset({SchedulerType.warmup_stable_decay}),
    "decay_ratio": frozenset({SchedulerType.warmup_stable_decay}),
    "timescale": frozenset({SchedulerType.inverse_sqrt}),
    "step_rules": frozenset({SchedulerType.piecewise_constant}),
}


def _steps(total_steps: int, steps: int, ratio: float | None, name: str) -> int:
    # An explicit step count wins over a ratio: the presets (conf/scheduler/) set a ratio, and
    # scheduler.warmup_steps=N on the command line (sd-scripts' --lr_warmup_steps) must just work.
    if ratio is not None and not steps:
        if not 0 <= ratio < 1:
            raise ValueError(f"scheduler.{name}_ratio must be in [0, 1), got {ratio}")
        return math.ceil(ratio * total_steps)
    if steps < 0:
        raise ValueError(f"scheduler.{name}_steps must be >= 0, got {steps}")
    return steps


def warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    return _steps(total_steps, warmup_steps, warmup_ratio, "warmup")


def decay_steps(total_steps: int, decay_steps: int, decay_ratio: float | None) -> int:
    return _steps(total_steps, decay_steps, decay_ratio, "decay")


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


def parse_step_rules(step_rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' piecewise_constant rules "m1:s1,m2:s2,...,m_last": lr x m1 before step s1,
    m2 before s2, ..., m_last after. ValueError naming scheduler.step_rules otherwise."""
    hint = 'e.g. scheduler.step_rules="1:100,0.5:200,0.1" (x1 until step 100, x0.5 until 200, then x0.1)'
    parts = [p.strip() for p in step_rules.split(",")]
    try:
        rules = [(float(m), int(s)) for m, s in (p.split(":") for p in parts[:-1])]
        final = float(parts[-1])
    except ValueError:
        raise ValueError(f"scheduler.step_rules={step_rules!r} is not 'mult:step,...,mult'; {hint}") from None
    boundaries = [s for _, s in rules]
    if boundaries != sorted(set(boundaries)) or any(s <= 0 for s in boundaries):
        raise ValueError(f"scheduler.step_rules={step_rules!r}: steps must be positive and increasing; {hint}")
    return rules, final


def _check_keys(kind: SchedulerType, given: dict[str, Any]) -> None:
    for key, value in given.items():
        if value not in (None, 0) and kind not in KEYS_USED_BY[key]:
            users = ", ".join(sorted(t.value for t in KEYS_USED_BY[key]))
            raise ValueError(f"scheduler.{key}={value} is only read by {users}; scheduler.type is {kind.value}")


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
    kind = SchedulerType(scheduler_type)
    _check_keys(kind, {"min_lr_ratio": min_lr_ratio, "decay_steps": num_decay_steps, "timescale": timescale,
                       "step_rules": step_rules})  # fmt: skip
    if min_lr_ratio is not None and not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if kind == SchedulerType.cosine_with_min_lr:
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        if min_lr_ratio is None:
            raise ValueError("scheduler.type=cosine_with_min_lr needs scheduler.min_lr_ratio, e.g. 0.1")
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps, total_steps, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio
        )
    if kind == SchedulerType.inverse_sqrt:
        from transformers.optimization import get_inverse_sqrt_schedule

        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps, timescale=timescale)
    if kind == SchedulerType.warmup_stable_decay:
        from transformers.optimization import get_wsd_schedule

        if num_decay_steps <= 0 or num_warmup_steps + num_decay_steps > total_steps:
            raise ValueError(
                f"scheduler.type=warmup_stable_decay needs 0 < decay steps ({num_decay_steps}) and warmup + decay "
                f"<= total steps ({total_steps}): set scheduler.decay_ratio (e.g. 0.2) or scheduler.decay_steps"
            )
        return get_wsd_schedule(
            optimizer, num_warmup_steps, num_decay_steps, num_training_steps=total_steps,
            min_lr_ratio=min_lr_ratio or 0.0, num_cycles=num_cycles / 2,
        )  # fmt: skip
    if kind == SchedulerType.piecewise_constant:
        if not step_rules:
            raise ValueError('scheduler.type=piecewise_constant needs scheduler.step_rules, e.g. "1:100,0.1"')
        if num_warmup_steps:
            raise ValueError("scheduler.type=piecewise_constant has no warmup: put it in scheduler.step_rules")
        parse_step_rules(step_rules)
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
