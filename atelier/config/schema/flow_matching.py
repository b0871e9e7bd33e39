"""training's FLUX.1 options: flow matching's timesteps and prediction, the guidance and T5.

Names, defaults and meanings are sd-scripts' (library/flux_train_utils.py
add_flux_train_arguments, train_util's weighting_scheme group); the formulas are in
atelier.objective.flow_matching. The SD families train without them: a value other than the
default on an SD model is refused (check_flow_matching_options), as sd-scripts' SD scripts
have no such flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from atelier.config.schema.checks import at_least
from atelier.config.schema.enums import ModelPredictionType, TimestepSampling, WeightingScheme
from atelier.config.schema.fields import option
from atelier.errors import ConfigError

T5_TOKENS_DEV, T5_TOKENS_SCHNELL = 512, 256  # sd-scripts' t5xxl_max_token_length by model


@dataclass
class FlowMatchingOptions:
    timestep_sampling: TimestepSampling = option(
        TimestepSampling.sigma, flag="timestep_sampling", ss="ss_timestep_sampling",
        doc="FLUX: how training draws sigma: sigma (the shifted schedule's table, weighting_scheme's density), "
        "uniform, sigmoid (sigmoid of sigmoid_scale * N(0, 1)), shift (sigmoid, then discrete_flow_shift), "
        "flux_shift (sigmoid, then BFL's resolution-dependent shift).",
    )
    sigmoid_scale: float = option(1.0, flag="sigmoid_scale", ss="ss_sigmoid_scale",
                                  doc="FLUX: the scale of the normal draw of the sigmoid / shift / flux_shift samplings.")
    discrete_flow_shift: float = option(
        3.0, flag="discrete_flow_shift", ss="ss_discrete_flow_shift",
        doc="FLUX: the schedule's shift (timestep_sampling=sigma and shift): shift*s / (1 + (shift-1)*s).",
    )
    model_prediction_type: ModelPredictionType = option(
        ModelPredictionType.sigma_scaled, flag="model_prediction_type", ss="ss_model_prediction_type",
        doc="FLUX: what the loss compares with the target noise - latents: raw (the output), additive (output + "
        "noisy input) or sigma_scaled (noisy input - sigma * output, weighted by weighting_scheme).",
    )
    guidance_scale: float = option(
        3.5, flag="guidance_scale", ss="ss_guidance_scale",
        doc="FLUX.1-dev: the distilled guidance the transformer is given while training (sd-scripts: 3.5; 1.0 is "
        "common for LoRAs). schnell has no guidance input: not used.",
    )
    weighting_scheme: WeightingScheme = option(
        WeightingScheme.uniform, flag="weighting_scheme", ss="ss_weighting_scheme",
        doc="FLUX: the density of timestep_sampling=sigma (logit_normal, mode) or the loss weight of "
        "model_prediction_type=sigma_scaled (sigma_sqrt, cosmap); uniform / none: neither.",
    )
    logit_mean: float = option(0.0, flag="logit_mean", ss="ss_logit_mean",
                               doc="FLUX: the mean of weighting_scheme=logit_normal.")
    logit_std: float = option(1.0, flag="logit_std", ss="ss_logit_std",
                              doc="FLUX: the standard deviation of weighting_scheme=logit_normal.")
    mode_scale: float = option(1.29, flag="mode_scale", ss="ss_mode_scale",
                               doc="FLUX: the scale of weighting_scheme=mode.")
    apply_t5_attn_mask: bool = option(
        False, flag="apply_t5_attn_mask", ss="ss_apply_t5_attn_mask",
        doc="FLUX: mask T5's padding tokens in T5 and in the transformer's attention (sd-scripts' option).",
    )
    t5xxl_max_token_length: Optional[int] = option(
        None, flag="t5xxl_max_token_length",
        doc="FLUX: T5 tokens per caption (null: 512 for dev, 256 for schnell, as sd-scripts).",
    )

    blocks_to_swap: Optional[int] = option(
        None, flag="blocks_to_swap",
        doc="FLUX: keep the Linear weights of this many transformer blocks in CPU memory, copied to the GPU "
        "each time they run (sd-scripts: the last N // 2 double and (N - N // 2) * 2 single blocks): less GPU "
        "memory, slower steps (atelier.models.block_swap). null: off.",
    )

    def __post_init__(self) -> None:
        at_least("training.t5xxl_max_token_length", self.t5xxl_max_token_length, 1)
        at_least("training.blocks_to_swap", self.blocks_to_swap, 1)
        for key in ("sigmoid_scale", "logit_std", "discrete_flow_shift"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"training.{key} must be above 0, got {getattr(self, key)}")
        if self.guidance_scale < 0:
            raise ConfigError(f"training.guidance_scale must not be negative, got {self.guidance_scale}")

    def t5_tokens(self, variant: str | None) -> int:
        """t5xxl_max_token_length, or its default for the model variant ("dev" / "schnell")."""
        if self.t5xxl_max_token_length is not None:
            return self.t5xxl_max_token_length
        return T5_TOKENS_SCHNELL if variant == "schnell" else T5_TOKENS_DEV


FLOW_MATCHING_KEYS = tuple(f.name for f in dataclasses.fields(FlowMatchingOptions))


def check_flow_matching_options(options: FlowMatchingOptions, objective: str, label: str) -> None:
    """An SD family trains without FLUX's options: one set away from its default is refused."""
    if objective == "flow_matching":
        return
    defaults = FlowMatchingOptions()
    for key in FLOW_MATCHING_KEYS:
        value = getattr(options, key)
        if value != getattr(defaults, key):
            raise ConfigError(f"training.{key}={getattr(value, 'value', value)}: a FLUX.1 option (flux_train_network.py's); "
                              f"{label} has no use for it: drop it (or use model=flux1)")
