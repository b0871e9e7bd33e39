"""scheduler: how the learning rate changes over the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from atelier.config.schema.enums import SchedulerType
from atelier.config.schema.fields import option


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
