"""The Stable Diffusion families as one plug-in: SD1.x, SD2.x (epsilon or v) and SDXL.

- load: a diffusers folder or an original-layout single file (SD1/SD2; SDXL from folders),
  atelier.models.loading;
- condition: CLIP (SD1/SD2: one encoder, clip_skip, 75-token chunks; SDXL: two, with the
  pooled vector and its size/crop vector), atelier.conditioning;
- objective: DDPM noise with sd-scripts' noise options, epsilon or v target, min-SNR and
  friends (atelier.objective.steps.DiffusionObjective);
- network: kohya's lora_unet_ / lora_te_ (SDXL: lora_te1_ / lora_te2_, LDM paths) modules of
  any network kind, block-wise options by the family's BlockLayout (atelier.network.factory);
- sampling: diffusers' StableDiffusion(XL)Pipeline with the sampler's scheduler;
- metadata: sd-scripts' train_network.py / sdxl_train_network.py keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.sdxl import SDXLCaptionEncoder
from atelier.config.network_spec import NetworkSpec
from atelier.config.sample_prompts import SamplePrompt
from atelier.config.schema import AtelierConfig, ModelConfig, NetworkConfig, SamplingConfig, TrainingConfig
from atelier.families import ModelFamily
from atelier.models.architectures import SD1_PIPELINE_SCHEDULER
from atelier.models.loading import BaseModel, load_base_model
from atelier.network.factory import build_network, network_targets
from atelier.network.lora import LoRANetwork
from atelier.objective.steps import DiffusionObjective, Objective
from atelier.plugins.plugin import EncoderFactory, FamilyPlugin
from atelier.sampling.generate import build_pipeline, build_sdxl_pipeline

log = logging.getLogger(__name__)


class StableDiffusionPlugin(FamilyPlugin):
    """SD1, SD2 and SDXL: one behaviour, their facts (text encoders, names, blocks) told apart."""

    default_cfg_scale = 7.0  # Atelier's since its first release (sd-scripts' SD sampler: 7.5)

    def __init__(self, facts: ModelFamily):
        self.facts = facts

    def load(self, model: ModelConfig, cache_dir: str | None = None) -> BaseModel:
        return load_base_model(model.path, builtin=model.builtin, version=self.facts.version,
                               v_parameterization=model.v_parameterization, config=model.config, vae=model.vae,
                               cache_dir=cache_dir, allow_pickle=model.allow_pickle)  # fmt: skip

    def caption_encoder(self, base: BaseModel, t: TrainingConfig) -> EncoderFactory:
        return SDXLCaptionEncoder if self.facts.text_encoders > 1 else CaptionEncoder

    def objective(self, t: TrainingConfig, base: BaseModel) -> Objective:
        return DiffusionObjective(t, base.noise_scheduler)

    def lora_names(self, base: BaseModel, net: NetworkConfig) -> list[str]:
        unet, encoders = _trained(base, net)
        return [target.lora_name for target in network_targets(NetworkSpec.from_config(net), unet, encoders)]

    def network(self, net: NetworkConfig, base: BaseModel, unet: bool, text_encoder: bool) -> LoRANetwork:
        return build_network(net, base.unet if unet else None, base.text_encoders if text_encoder else None)

    def check_sample_prompts(self, prompts: Sequence[SamplePrompt], sampling: SamplingConfig) -> None:
        guided = [p.index for p in prompts if p.guidance is not None]
        if guided:
            log.warning("sample prompt(s) %s give --g, the distilled guidance of FLUX models; SD models have none "
                        "(their guidance is the CFG scale, --l), so --g is not used",
                        ", ".join(str(i + 1) for i in guided))  # fmt: skip

    def sample_clip_skip(self, t: TrainingConfig) -> int | None:
        # SDXL's pipeline always takes the penultimate layers (sd-scripts: clip_skip does not apply).
        return None if self.facts.text_encoders > 1 else t.clip_skip

    def sample_pipeline(self, base: BaseModel, cfg: AtelierConfig) -> Any:
        # Inference schedulers want SD's pipeline settings, not the training DDPM's.
        config = {**SD1_PIPELINE_SCHEDULER, "prediction_type": base.noise_scheduler.config.prediction_type}
        sampler = cfg.sampling.sampler
        if self.facts.text_encoders > 1:
            return build_sdxl_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, config, sampler)
        return build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, config, sampler)


def _trained(base: BaseModel, net: NetworkConfig) -> tuple[Any, Any]:
    """The UNet and the text encoders a network of `net` adapts (None: that part is not trained)."""
    return (None if net.train_text_encoder_only else base.unet), (None if net.train_unet_only else base.text_encoders)
