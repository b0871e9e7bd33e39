"""Architecture shapes of the base models we know, as plain config dicts.

Each architecture is a set of keyword arguments for the diffusers / transformers
classes. `build_*` instantiate them with random weights; wrap the call in
`with torch.device("meta"):` to get the shapes of a full-size model without
allocating its memory (tests and benchmarks do this).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

# The tiny model's byte-level vocab: 256 byte symbols, the same 256 with the
# `</w>` end-of-word suffix, then <|startoftext|> and <|endoftext|> (the order
# of the real CLIP vocab, minus its merges).
TINY_VOCAB_SIZE = 2 * 256 + 2
TINY_BOS_TOKEN_ID = TINY_VOCAB_SIZE - 2
TINY_EOS_TOKEN_ID = TINY_VOCAB_SIZE - 1

_SD1_UNET_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

_ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    # SD1.5-shaped, ~1 M parameters in all: for tests and the built-in demo model.
    # The 2-level VAE downsamples by 2, so a 64 px image is a 32x32 latent.
    "tiny-sd15": {
        "unet": {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 4),
        },
        "vae": {
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "latent_channels": 4,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            # Deliberately not a multiple of hidden_size: LoRA code that mixes up
            # in/out features fails on this model instead of passing by accident.
            "intermediate_size": 37,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
            # The pooled output is read at the first eos token, so these must be
            # the tokenizer's real ids.
            "bos_token_id": TINY_BOS_TOKEN_ID,
            "eos_token_id": TINY_EOS_TOKEN_ID,
            "pad_token_id": TINY_EOS_TOKEN_ID,
        },
    },
    # Stable Diffusion 1.5 (runwayml / stable-diffusion-v1-5 configs).
    "sd15": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            **_SD1_UNET_BLOCKS,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {
            "sample_size": 512,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "latent_channels": 4,
            "scaling_factor": 0.18215,
        },
        # CLIP ViT-L/14 text tower.
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            # The legacy ids shipped with SD1.5 (eos_token_id 2 makes CLIP pool at
            # the highest token id, which is <|endoftext|> in the real vocab).
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
    },
}

ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)

# Training noise schedule of SD1.x / SD2.x (the DDPM schedule they were trained with).
SD1_NOISE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# The inference scheduler SD1.5 ships in its scheduler/ folder. It is a PNDM
# config; DDPMScheduler would reject `set_alpha_to_one` and `skip_prk_steps`.
SD1_PIPELINE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _get(arch: str, component: str) -> dict[str, Any]:
    try:
        config = _ARCHITECTURES[arch][component]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    return copy.deepcopy(config)


def unet_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `UNet2DConditionModel` for `arch` (a fresh copy)."""
    return _get(arch, "unet")


def vae_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `AutoencoderKL` for `arch` (a fresh copy)."""
    return _get(arch, "vae")


def text_encoder_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `CLIPTextConfig` for `arch` (a fresh copy)."""
    return _get(arch, "text_encoder")


def noise_scheduler_config(v_parameterization: bool = False) -> dict[str, Any]:
    """The SD1/SD2 training `DDPMScheduler` config, predicting epsilon or v."""
    config = dict(SD1_NOISE_SCHEDULER)
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return config


def build_unet(arch: str) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(arch))


def build_vae(arch: str) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(arch))


def build_text_encoder(arch: str) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(arch)))


def build_noise_scheduler(v_parameterization: bool = False) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_scheduler_config(v_parameterization))
