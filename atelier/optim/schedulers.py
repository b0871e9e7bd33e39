"""Learning-rate schedules with sd-scripts' names.

diffusers' implementations where it has one; transformers' for cosine_with_min_lr,
inverse_sqrt and warmup_stable_decay (as sd-scripts does, num_cycles counts half-cosines there).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from atelier.config.optimizer_types import scheduler_class_path
from atelier.config.schema import SchedulerConfig, SchedulerType
from atelier.errors import ConfigError
from atelier.optim.optimizers import import_class

LRScheduler = torch.optim.lr_scheduler.LRScheduler
# Schedules the trainer cannot step: why.
UNSTEPPABLE = {
    torch.optim.lr_scheduler.ReduceLROnPlateau: "it needs a metric at each step(metrics), which the trainer does not "
    "give (sd-scripts neither)",
}


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


def resolve_scheduler_class(class_path: str) -> type[LRScheduler]:
    """The schedule class scheduler.class_path names, imported. ConfigError naming the key for
    one that does not import, is not a schedule, or cannot be stepped here."""
    path = scheduler_class_path(class_path)
    cls = import_class(path, "scheduler.class_path")
    if not (inspect.isclass(cls) and issubclass(cls, LRScheduler)):
        raise ConfigError(
            f"scheduler.class_path={class_path}: {path} is not a learning-rate schedule (not a "
            "torch.optim.lr_scheduler.LRScheduler class); e.g. torch.optim.lr_scheduler.CosineAnnealingLR"
        )
    for refused, why in UNSTEPPABLE.items():
        if issubclass(cls, refused):
            raise ConfigError(f"scheduler.class_path={class_path}: {why}; choose another schedule")
    return cls


def check_scheduler_args(cfg: SchedulerConfig) -> None:
    """A class-path schedule imports, and scheduler.args fits its constructor: no unknown
    argument (named, with the closest), none it needs left out. Run in the job before the model
    loads (atelier.launch.job) and when the schedule is built; nothing to do for a named one."""
    if cfg.class_path is None:
        return
    cls = resolve_scheduler_class(cfg.class_path)
    path = scheduler_class_path(cfg.class_path)
    parameters = list(inspect.signature(cls).parameters.values())[1:]  # after `optimizer`, the trainer's
    if "optimizer" in cfg.args:
        raise ConfigError("scheduler.args.optimizer: not a schedule argument here: the trainer passes the optimizer")
    takes = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        for name in cfg.args:
            if name not in takes:
                close = difflib.get_close_matches(name, takes, n=1)
                hint = f"; did you mean scheduler.args.{close[0]}?" if close else ""
                raise ConfigError(f"scheduler.args.{name}: not an argument of {path}{hint} It takes: {', '.join(takes)}")
    needed = [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in needed:
        if name not in cfg.args:
            raise ConfigError(f"scheduler.class_path={cfg.class_path} needs scheduler.args.{name}: add "
                              f"+scheduler.args.{name}=<value> (it takes: {', '.join(takes)})")  # fmt: skip


def lr_scheduler_from_config(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `cfg` (a SchedulerConfig) describes, over `steps.total` optimizer steps; a
    class-path one is Class(optimizer, **scheduler.args), as sd-scripts' --lr_scheduler_type."""
    if cfg.class_path is not None:
        check_scheduler_args(cfg)
        return resolve_scheduler_class(cfg.class_path)(optimizer, **cfg.args)
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
