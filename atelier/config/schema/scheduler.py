"""scheduler: how the learning rate changes over the run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from omegaconf import MISSING

from atelier.config.optimizer_types import scheduler_class_path
from atelier.config.schema.checks import unresolved
from atelier.config.schema.enums import SchedulerType
from atelier.config.schema.fields import option
from atelier.errors import ConfigError

# Keys that only some schedules read; setting one for another schedule is a mistake worth stopping for.
KEYS_USED_BY: dict[str, frozenset[SchedulerType]] = {
    "min_lr_ratio": frozenset({SchedulerType.cosine_with_min_lr, SchedulerType.warmup_stable_decay}),
    "decay_steps": frozenset({SchedulerType.warmup_stable_decay}),
    "decay_ratio": frozenset({SchedulerType.warmup_stable_decay}),
    "timescale": frozenset({SchedulerType.inverse_sqrt}),
    "step_rules": frozenset({SchedulerType.piecewise_constant}),
}
# The keys of a schedule given by its class (scheduler.class_path), not by scheduler.type.
CLASS_KEYS = ("class_path", "args")


@dataclass
class SchedulerConfig:
    type: SchedulerType = option(MISSING, flag="lr_scheduler", ss="ss_lr_scheduler",
                                 doc="The schedule (set by the scheduler option, e.g. scheduler=cosine).")
    warmup_steps: int = option(0, flag="lr_warmup_steps",
                               doc="Warmup as a step count (set this or warmup_ratio).")
    warmup_ratio: Optional[float] = option(
        None, flag="lr_warmup_steps", doc="Warmup as a fraction of the total steps (set this or warmup_steps).",
        kohya="a float < 1 is a ratio of the total steps in sd-scripts too (it rounds down, we round up)",
    )
    num_cycles: int = option(
        1, flag="lr_scheduler_num_cycles", ss="ss_lr_scheduler_num_cycles",
        doc="cosine_with_restarts: restarts; cosine_with_min_lr / warmup_stable_decay: half-cosines.",
    )
    power: float = option(1.0, flag="lr_scheduler_power", ss="ss_lr_scheduler_power", doc="polynomial: the power.")
    min_lr_ratio: Optional[float] = option(
        None, flag="lr_scheduler_min_lr_ratio",
        doc="cosine_with_min_lr, warmup_stable_decay: the final lr as a fraction of the start lr.",
    )
    decay_steps: int = option(
        0, flag="lr_decay_steps",
        doc="warmup_stable_decay: length of the decay phase in steps (set this or decay_ratio).",
    )
    decay_ratio: Optional[float] = option(
        None, flag="lr_decay_steps", doc="warmup_stable_decay: the decay phase as a fraction of the total steps.",
        kohya="a float < 1 is a ratio of the total steps in sd-scripts too (it rounds down, we round up)",
    )
    timescale: Optional[int] = option(
        None, flag="lr_scheduler_timescale",
        doc="inverse_sqrt: lr = lr0 / sqrt((step + timescale - warmup) / timescale) after warmup (null: the "
        "warmup steps, or 10000 without warmup).",
    )
    step_rules: Optional[str] = option(
        None, flag="lr_scheduler_args step_rules",
        doc='piecewise_constant: diffusers\' rules "mult:until_step,...,final_mult", e.g. "1:100,0.5:200,0.1".',
    )
    class_path: Optional[str] = option(
        None, flag="lr_scheduler_type", ss="ss_lr_scheduler",
        doc="Any schedule by its class instead of scheduler.type (with scheduler=constant, no warmup): a class of "
        "torch.optim.lr_scheduler (CosineAnnealingLR) or a class path (torch.optim.lr_scheduler.OneCycleLR), "
        "built as Class(optimizer, **scheduler.args) and stepped once per optimizer step. ss_lr_scheduler is "
        "then 'class_path(args)'.",
        kohya="sd-scripts writes --lr_scheduler (constant) to ss_lr_scheduler and leaves --lr_scheduler_type out",
    )
    args: Dict[str, Any] = option(
        default_factory=dict, flag="lr_scheduler_args",
        doc="The scheduler.class_path schedule's constructor arguments (+scheduler.args.T_max=1000), checked "
        "against its signature before the model loads.",
    )

    def __post_init__(self) -> None:
        if unresolved(self.type):
            return  # the group's schema before an option set its type
        kind = SchedulerType(self.type)
        for key, users in KEYS_USED_BY.items():
            value = getattr(self, key)
            if value not in (None, 0) and kind not in users:
                names = ", ".join(sorted(t.value for t in users))
                raise ConfigError(f"scheduler.{key}={value} is only read by {names}; scheduler.type is {kind.value}")
        for name in ("warmup", "decay"):
            steps, ratio = getattr(self, f"{name}_steps"), getattr(self, f"{name}_ratio")
            if steps < 0:
                raise ConfigError(f"scheduler.{name}_steps must be >= 0, got {steps}")
            if ratio is not None and not 0 <= ratio < 1:
                raise ConfigError(f"scheduler.{name}_ratio must be in [0, 1), got {ratio}")
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if kind == SchedulerType.cosine_with_min_lr and self.min_lr_ratio is None:
            raise ConfigError("scheduler.type=cosine_with_min_lr needs scheduler.min_lr_ratio, e.g. 0.1")
        if kind == SchedulerType.warmup_stable_decay and not (self.decay_steps or self.decay_ratio):
            raise ConfigError("scheduler.type=warmup_stable_decay needs a decay phase: set scheduler.decay_ratio "
                              "(e.g. 0.2) or scheduler.decay_steps")  # fmt: skip
        if kind == SchedulerType.piecewise_constant:
            if not self.step_rules:
                raise ConfigError('scheduler.type=piecewise_constant needs scheduler.step_rules, e.g. "1:100,0.1"')
            if self.warmup_steps or self.warmup_ratio:
                raise ConfigError("scheduler.type=piecewise_constant has no warmup: put it in scheduler.step_rules")
            parse_step_rules(self.step_rules)
        if self.class_path is not None:
            self.check_class_schedule(kind)
        elif self.args:
            self.refuse_args(kind)

    def check_class_schedule(self, kind: SchedulerType) -> None:
        """A class-path schedule replaces scheduler.type's; the keys only a named schedule reads
        would be ignored, so they are refused (sd-scripts refuses a warmup there too)."""
        where = f"scheduler.class_path={self.class_path}"
        scheduler_class_path(self.class_path)  # the spelling; the import is checked before the model loads
        if kind != SchedulerType.constant:
            raise ConfigError(f"{where} replaces scheduler.type={kind.value}: use scheduler=constant with it")
        if self.warmup_steps or self.warmup_ratio:
            raise ConfigError(f"{where} takes no scheduler.warmup_steps / warmup_ratio (sd-scripts refuses them "
                              "too): give the class's own warmup in scheduler.args, or chain one with "
                              "torch.optim.lr_scheduler.SequentialLR")  # fmt: skip
        for key in ("num_cycles", "power"):
            if getattr(self, key) != 1:
                raise ConfigError(f"scheduler.{key}={getattr(self, key)} is not read with {where}: give the "
                                  f"class's own argument in scheduler.args")  # fmt: skip

    def refuse_args(self, kind: SchedulerType) -> None:
        """scheduler.args is read by a class-path schedule only; a named one's arguments are keys here."""
        name = next(iter(self.args))
        key = f"scheduler.args.{name}"
        if name in {f.name for f in fields(SchedulerConfig)} - {"type", *CLASS_KEYS}:
            raise ConfigError(f"{key}: sd-scripts' scheduler args are options of their own here: set scheduler.{name}")
        takes = ", ".join(f"scheduler.{k}" for k in keys_read_by(kind))
        raise ConfigError(f"{key}: not an argument scheduler.type={kind.value} takes; it takes {takes} "
                          "(scheduler.args is read by a schedule class, scheduler.class_path)")  # fmt: skip


def keys_read_by(kind: SchedulerType | str) -> list[str]:
    """The scheduler.* keys a schedule may be given (its own ones of KEYS_USED_BY, and the
    common ones), in schema order. ValueError for a type that is not a schedule."""
    kind = SchedulerType(kind)
    return [f.name for f in fields(SchedulerConfig)
            if f.name not in ("type", *CLASS_KEYS) and kind in KEYS_USED_BY.get(f.name, {kind})]  # fmt: skip


def parse_step_rules(step_rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' piecewise_constant rules "m1:s1,m2:s2,...,m_last": lr x m1 before step s1,
    m2 before s2, ..., m_last after. ConfigError naming scheduler.step_rules otherwise."""
    hint = 'e.g. scheduler.step_rules="1:100,0.5:200,0.1" (x1 until step 100, x0.5 until 200, then x0.1)'
    parts = [p.strip() for p in step_rules.split(",")]
    try:
        rules = [(float(m), int(s)) for m, s in (p.split(":") for p in parts[:-1])]
        final = float(parts[-1])
    except ValueError:
        raise ConfigError(f"scheduler.step_rules={step_rules!r} is not 'mult:step,...,mult'; {hint}") from None
    boundaries = [s for _, s in rules]
    if boundaries != sorted(set(boundaries)) or any(s <= 0 for s in boundaries):
        raise ConfigError(f"scheduler.step_rules={step_rules!r}: steps must be positive and increasing; {hint}")
    return rules, final
