"""optimizer: the optimizer and its learning rates, and the rates each part trains at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional

from omegaconf import MISSING

from atelier.config.optimizer_types import (
    ADAFACTOR,
    canonical_optimizer,
    is_adaptive_type,
    is_schedule_free_type,
    optimizer_class_path,
)
from atelier.config.schema.checks import finite_rate, unresolved
from atelier.config.schema.fields import option
from atelier.errors import ConfigError


@dataclass
class OptimizerConfig:
    # A str, not an enum: a class path is a type too (atelier.config.optimizer_types checks the spelling).
    type: str = option(
        MISSING, flag="optimizer_type", ss="ss_optimizer",
        doc="The optimizer (set by the optimizer option, e.g. optimizer=prodigy): one of sd-scripts' names "
        "(AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
        "SGDNesterov8bit, DAdaptation / DAdaptAdamPreprint, DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, "
        "DAdaptLion, DAdaptSGD, Prodigy, Adafactor, AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree; any "
        "case), a class of torch.optim (RAdam), or any optimizer's class path (bitsandbytes.optim.AdEMAMix8bit), "
        "with its arguments in optimizer.args.",
    )
    learning_rate: float = option(1e-4, flag="learning_rate",
                                  ss=("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr"),
                                  doc="The rate of every part that has no rate of its own.")
    unet_lr: Optional[float] = option(
        None, flag="unet_lr", ss="ss_unet_lr",
        doc="The UNet's own rate; null means learning_rate, and 0 is a rate (that part stays as it is). Read "
        "through part_learning_rates.",
    )
    text_encoder_lr: Optional[float] = option(None, flag="text_encoder_lr", ss="ss_text_encoder_lr",
                                              doc="The text encoder's own rate, as unet_lr (SDXL: both, unless "
                                              "text_encoder_2_lr is set).")
    text_encoder_2_lr: Optional[float] = option(
        None, flag="text_encoder_lr", ss="ss_text_encoder_lr",
        doc="SDXL: the second text encoder's (lora_te2_) own rate; null means text_encoder_lr. sd-scripts spells "
        "the pair --text_encoder_lr A B; ss_text_encoder_lr is then written as [A, B].",
        kohya="the second value of --text_encoder_lr (export-kohya writes both); sd-scripts' networks.lora "
        "(SD1/SDXL) reads only the first, so there both SDXL text encoders train at A",
    )
    args: Dict[str, Any] = option(default_factory=dict, flag="optimizer_args",
                                  doc="Passed to the optimizer's constructor (add one with +optimizer.args.eps=1e-6).")

    def __post_init__(self) -> None:
        if not unresolved(self.type):  # the group's schema before an option set its type
            self.type = canonical_optimizer(self.type)  # sd-scripts' spelling: "adamw8bit" -> AdamW8bit
        for key in ("learning_rate", "unet_lr", "text_encoder_lr", "text_encoder_2_lr"):
            finite_rate(f"optimizer.{key}", getattr(self, key))


class PartLearningRates(NamedTuple):
    unet: float
    text_encoder: float
    text_encoder_2: float  # SDXL's second text encoder; = text_encoder unless set


def part_learning_rates(opt: OptimizerConfig) -> PartLearningRates:
    """The rates the UNet and text-encoder parts of a network train at, derived here only
    (the optimizer's groups, ss_unet_lr / ss_text_encoder_lr). `is None`, not `or`: a rate
    of 0 is set, not missing."""
    text_encoder = opt.learning_rate if opt.text_encoder_lr is None else opt.text_encoder_lr
    return PartLearningRates(
        unet=opt.learning_rate if opt.unet_lr is None else opt.unet_lr,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder if opt.text_encoder_2_lr is None else opt.text_encoder_2_lr,
    )


def is_adaptive(kind: str, args: dict[str, Any]) -> bool:
    """Whether the optimizer picks its own step size: Prodigy, D-Adaptation (any of them, by
    name or class path), Adafactor with relative_step (transformers' default)."""
    return is_adaptive_type(kind) or (optimizer_class_path(kind) == ADAFACTOR and args.get("relative_step", True))


def check_schedule_fits(kind: str, scheduler_type: str, num_warmup_steps: float) -> None:
    """Schedule-free optimizers replace the schedule (sd-scripts gives them a do-nothing one).
    `scheduler_type`: scheduler.type, or its class_path; `num_warmup_steps`: scheduler.warmup_steps,
    or its warmup_ratio."""
    if is_schedule_free_type(kind) and (scheduler_type != "constant" or num_warmup_steps):
        raise ConfigError(
            f"optimizer.type={kind} needs no learning-rate schedule: use scheduler=constant without "
            f"warmup (got scheduler.type={scheduler_type}, {num_warmup_steps} warmup steps); "
            "for a warmup set optimizer.args.warmup_steps=N"
        )


class LrFindError(ConfigError):
    """The run cannot give a learning-rate suggestion (atelier.loop.lr_find); the message says
    what to change."""


def check_can_suggest(kind: str, args: dict[str, Any]) -> None:
    """training.suggest_lr needs an optimizer that logs d*lr (atelier.loop.lr_find)."""
    if not is_adaptive(kind, args):
        raise LrFindError(
            f"training.suggest_lr needs an optimizer that estimates its step size; optimizer.type is "
            f"{kind}: use optimizer=prodigy or optimizer=dadapt_adam"
        )
