"""The tiny SD2-768-v and SDXL-shaped built-in models (see atelier.models.tiny).

Same recipe as tiny-sd15: fixed seeds per component, the byte-level tokenizer,
saved as the diffusers pipeline folder of the real model family, so loading,
training and diffusers' own LoRA loader see the layout of the real thing.
"""

from __future__ import annotations

from pathlib import Path

from . import architectures as arch
from .tiny import TINY_SD2_V_NAME, TINY_SDXL_NAME, build_seeded, build_tiny_tokenizer, save_pipeline

# OpenCLIP's tokenizer (SD2, SDXL's second one) pads with "!" instead of <|endoftext|>.
OPEN_CLIP_PAD_TOKEN = "!"


def build_tiny_sd2_v(folder: Path | str) -> None:
    """SD 2.x 768-v-shaped: OpenCLIP-style text encoder, linear projections, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    modules = build_seeded(
        TINY_SD2_V_NAME,
        {"unet": arch.build_unet, "vae": arch.build_vae, "text_encoder": arch.build_text_encoder},
    )
    pipeline = StableDiffusionPipeline(
        **modules,
        tokenizer=build_tiny_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN),
        scheduler=DDIMScheduler(**arch.SD2_V_PIPELINE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipeline, folder)


def build_tiny_sdxl(folder: Path | str) -> None:
    """SDXL-shaped: two text encoders, a "text_time" UNet, saved as a StableDiffusionXLPipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    modules = build_seeded(
        TINY_SDXL_NAME,
        {
            "unet": arch.build_unet,
            "vae": arch.build_vae,
            "text_encoder": arch.build_text_encoder,
            "text_encoder_2": arch.build_text_encoder_2,
        },
    )
    pipeline = StableDiffusionXLPipeline(
        **modules,
        tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN),
        scheduler=EulerDiscreteScheduler(**arch.SDXL_PIPELINE_SCHEDULER),
    )
    save_pipeline(pipeline, folder, tokenizers=("tokenizer", "tokenizer_2"))
