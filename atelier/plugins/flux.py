"""FLUX.1 (dev and schnell) as one plug-in, the way sd-scripts' flux_train_network.py trains it.

- load: a diffusers FLUX folder, or the BFL transformer single file with ae / clip_l / t5xxl
  files and configs from a local folder (atelier.models.flux_loading, flux_files);
- condition: CLIP-L's pooled vector and T5-XXL's states (t5xxl_max_token_length tokens,
  apply_t5_attn_mask), atelier.conditioning.flux_text;
- objective: flow matching (timestep_sampling, model_prediction_type, guidance_scale,
  weighting_scheme), atelier.objective.steps.FlowMatchingObjective;
- network: sd-scripts' lora_flux modules on the double / single blocks (train_blocks), BFL's
  fused layers as one module each, CLIP-L as lora_te1_ (atelier.network.flux_lora);
- sampling: flow-match Euler with sd-scripts' shifted schedule, --g guidance
  (atelier.sampling.flux_samples);
- metadata: ss_model_type and the flow-matching settings sd-scripts' update_metadata writes; no
  modelspec.prediction_type.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from atelier.conditioning.flux_text import FluxCaptionEncoder, FluxTextOptions
from atelier.config.sample_prompts import SamplePrompt
from atelier.config.schema import AtelierConfig, ModelConfig, NetworkConfig, SamplingConfig, TrainingConfig
from atelier.config.schema.flow_matching import FlowMatchingOptions
from atelier.families import FLUX1
from atelier.models.flux_architectures import FLUX1_PIPELINE_SCHEDULER
from atelier.models.flux_loading import load_flux_base
from atelier.models.load_errors import ModelLoadError
from atelier.models.loading import BaseModel
from atelier.network.factory import build_flux
from atelier.network.flux_lora import clip_targets
from atelier.network.flux_names import flux_targets_of
from atelier.network.lora import LoRANetwork
from atelier.objective.steps import FlowMatchingObjective, Objective
from atelier.plugins.plugin import EncoderFactory, FamilyPlugin
from atelier.sampling.flux_samples import DEFAULT_CFG_SCALE, build_flux_pipeline, flux_prompt_warnings

# The schema's sampling defaults: its sampler (ddim) is no choice a FLUX user made, so it is not warned of.
_SAMPLING_DEFAULTS = {field.name: field.default for field in dataclasses.fields(SamplingConfig)}


class FluxPlugin(FamilyPlugin):
    facts = FLUX1
    default_cfg_scale = DEFAULT_CFG_SCALE  # sd-scripts' FLUX sampler: 1.0, no CFG
    # sd-scripts' flux_train_network.update_metadata keys (its FLUX options' ss names): only FLUX files carry them.
    own_metadata = ("ss_model_type", *(ss for field in dataclasses.fields(FlowMatchingOptions)
                                       for ss in field.metadata["ss"]))  # fmt: skip

    def load(self, model: ModelConfig, cache_dir: str | None = None) -> BaseModel:
        # Hydra configs may spell "unset" as an empty string.
        path, builtin, config, vae, ae, clip_l, t5xxl = (value or None for value in (
            model.path, model.builtin, model.config, model.vae, model.ae, model.clip_l, model.t5xxl))
        if vae is not None:
            raise ModelLoadError("model.vae: FLUX.1's autoencoder is model.ae (ae.safetensors); drop model.vae")
        return load_flux_base(path, builtin=builtin, config=config, cache_dir=cache_dir, ae=ae, clip_l=clip_l,
                              t5xxl=t5xxl)  # fmt: skip

    def caption_encoder(self, base: BaseModel, t: TrainingConfig) -> EncoderFactory:
        return functools.partial(FluxCaptionEncoder, options=FluxTextOptions(t.t5_tokens(base.variant),
                                                                             t.apply_t5_attn_mask))  # fmt: skip

    def objective(self, t: TrainingConfig, base: BaseModel) -> Objective:
        # schnell has no guidance input; dev is given training.guidance_scale at every step.
        guidance_embeds = bool(getattr(base.unet.config, "guidance_embeds", False))
        return FlowMatchingObjective(t, base.noise_scheduler, guidance_embeds)

    def lora_names(self, base: BaseModel, net: NetworkConfig) -> list[str]:
        names = [] if net.train_unet_only else [name for name, _ in clip_targets(base.text_encoder)]
        if not net.train_text_encoder_only:
            blocks = net.train_blocks.value if net.train_blocks is not None else "all"
            names += [target.name for target in flux_targets_of(base.unet, blocks)]
        return names

    def network(self, net: NetworkConfig, base: BaseModel, unet: bool, text_encoder: bool) -> LoRANetwork:
        return build_flux(net, base.unet, base.text_encoder, unet, text_encoder)

    def check_sample_prompts(self, prompts: Sequence[SamplePrompt], sampling: SamplingConfig) -> None:
        # sampling.sampler's default (ddim) is no choice the user made: warned of only when set.
        sampler = None if sampling.sampler == _SAMPLING_DEFAULTS["sampler"] else str(sampling.sampler)
        flux_prompt_warnings(prompts, sampler)

    def sample_clip_skip(self, t: TrainingConfig) -> int | None:
        return None  # FLUX reads CLIP-L's pooled output: clip_skip does not apply

    def sample_pipeline(self, base: BaseModel, cfg: AtelierConfig) -> Any:
        # FLUX.1's inference scheduler (flow-match Euler, shifted by size), not the training one.
        t = cfg.training
        return build_flux_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, FLUX1_PIPELINE_SCHEDULER,
                                   t5_max_length=t.t5_tokens(base.variant), apply_t5_attn_mask=t.apply_t5_attn_mask)

    def metadata(self, meta: dict[str, Any]) -> None:
        meta["ss_model_type"] = "flux"  # sd-scripts' --model_type (flux or chroma)
        meta.pop("modelspec.prediction_type", None)  # sd-scripts: FLUX models have none
