"""optimizer: the optimizer and its learning rates, and the rates each part trains at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional

from omegaconf import MISSING

from atelier.config.schema.enums import OptimizerType
from atelier.config.schema.fields import option


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
