"""optimizer: the optimizer and its learning rates, and the rates each part trains at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional

from omegaconf import MISSING

from atelier.config.schema.checks import finite_rate
from atelier.config.schema.enums import OptimizerType
from atelier.config.schema.fields import option
from atelier.errors import ConfigError


@dataclass
class OptimizerConfig:
    type: OptimizerType = option(MISSING, flag="optimizer_type", ss="ss_optimizer",
                                 doc="The optimizer (set by the optimizer option, e.g. optimizer=prodigy).")
    learning_rate: float = option(1e-4, flag="learning_rate",
                                  ss=("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr"),
                                  doc="The rate of every part that has no rate of its own.")
    unet_lr: Optional[float] = option(
        None, flag="unet_lr", ss="ss_unet_lr",
        doc="The UNet's own rate; null means learning_rate, and 0 is a rate (that part stays as it is). Read "
        "through part_learning_rates.",
    )
    text_encoder_lr: Optional[float] = option(None, flag="text_encoder_lr", ss="ss_text_encoder_lr",
                                              doc="The text encoder's own rate, as unet_lr.")
    args: Dict[str, Any] = option(default_factory=dict, flag="optimizer_args",
                                  doc="Passed to the optimizer's constructor (add one with +optimizer.args.eps=1e-6).")

    def __post_init__(self) -> None:
        for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
            finite_rate(f"optimizer.{key}", getattr(self, key))


# Optimizers that choose their own step size (their d*lr is logged; experiment=lr_find reads it).
ADAPTIVE_TYPES = frozenset({OptimizerType.Prodigy, OptimizerType.DAdaptAdam})
# Optimizers with train()/eval() modes and no schedule of their own.
SCHEDULE_FREE_TYPES = frozenset({OptimizerType.AdamWScheduleFree})


class PartLearningRates(NamedTuple):
    unet: float
    text_encoder: float


def part_learning_rates(opt: OptimizerConfig) -> PartLearningRates:
    """The rates the UNet and text-encoder parts of a network train at, derived here only
    (the optimizer's groups, ss_unet_lr / ss_text_encoder_lr). `is None`, not `or`: a rate
    of 0 is set, not missing."""
    return PartLearningRates(
        unet=opt.learning_rate if opt.unet_lr is None else opt.unet_lr,
        text_encoder=opt.learning_rate if opt.text_encoder_lr is None else opt.text_encoder_lr,
    )


def is_adaptive(kind: OptimizerType | str, args: dict[str, Any]) -> bool:
    """Whether the optimizer picks its own step size: Prodigy, D-Adaptation, Adafactor with
    relative_step (transformers' default)."""
    kind = OptimizerType(kind)
    return kind in ADAPTIVE_TYPES or (kind == OptimizerType.Adafactor and args.get("relative_step", True))


def check_schedule_fits(kind: OptimizerType | str, scheduler_type: str, num_warmup_steps: float) -> None:
    """Schedule-free optimizers replace the schedule (sd-scripts gives them a do-nothing one).
    `num_warmup_steps`: scheduler.warmup_steps, or its warmup_ratio."""
    kind = OptimizerType(kind)
    if kind in SCHEDULE_FREE_TYPES and (scheduler_type != "constant" or num_warmup_steps):
        raise ConfigError(
            f"optimizer.type={kind.value} needs no learning-rate schedule: use scheduler=constant without "
            f"warmup (got scheduler.type={scheduler_type}, {num_warmup_steps} warmup steps); "
            "for a warmup set optimizer.args.warmup_steps=N"
        )


class LrFindError(ConfigError):
    """The run cannot give a learning-rate suggestion (atelier.loop.lr_find); the message says
    what to change."""


def check_can_suggest(kind: OptimizerType | str, args: dict[str, Any]) -> None:
    """training.suggest_lr needs an optimizer that logs d*lr (atelier.loop.lr_find)."""
    if not is_adaptive(kind, args):
        raise LrFindError(
            f"training.suggest_lr needs an optimizer that estimates its step size; optimizer.type is "
            f"{OptimizerType(kind).value}: use optimizer=prodigy or optimizer=dadapt_adam"
        )
