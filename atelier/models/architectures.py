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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

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

# The 2-level VAE downsamples by 2, so a 64 px image is a 32x32 latent.
_TINY_VAE: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}

# SD1.5-shaped, ~1 M parameters in all: for tests and the built-in demo model.
_TINY_SD15_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
}

_TINY_SD15_TEXT_ENCODER: dict[str, Any] = {
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
}

# OpenCLIP-style (SD2's, SDXL's second): gelu, pads with "!", wider than SD1's.
_TINY_OPENCLIP_TEXT_ENCODER: dict[str, Any] = {
    **_TINY_SD15_TEXT_ENCODER,
    "hidden_size": 48,
    "intermediate_size": 53,
    "hidden_act": "gelu",
    "projection_dim": 48,
    "pad_token_id": 0,
}

_ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-sd15": {"unet": _TINY_SD15_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_SD15_TEXT_ENCODER},
    # SD2.x-768-v-shaped: what distinguishes SD2 from SD1 at tiny size. Linear
    # proj_in/proj_out (use_linear_projection), an OpenCLIP-style text tower (gelu,
    # pads with "!" rather than <|endoftext|>) of another width than SD1's, and a
    # v-prediction scheduler (set by the builder). Like diffusers' SD2 text encoder,
    # which keeps 23 of OpenCLIP-H's 24 layers, the last layer here IS the
    # penultimate layer SD2 conditions on: the UNet reads last_hidden_state.
    "tiny-sd2-v": {
        # SD2 keeps the head width (64) fixed and grows the head count; here 16 wide.
        "unet": {**_TINY_SD15_UNET, "cross_attention_dim": 48, "use_linear_projection": True},
        "vae": _TINY_VAE,
        "text_encoder": _TINY_OPENCLIP_TEXT_ENCODER,
    },
    # SDXL-shaped: two text encoders (CLIP-L-like, and an OpenCLIP-bigG-like one with a
    # projection whose pooled output feeds the UNet's "text_time" added embedding with
    # the 6 size/crop numbers), LDM layout of 3 levels with layers_per_block 2 (the
    # kohya input_blocks_* / output_blocks_* names depend on it), the first level
    # without attention, and 2 transformer layers at the deepest level as in SDXL.
    "tiny-sdxl": {
        "unet": {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1, 2),
            # hidden states of text encoder 1 (32) and 2 (48), concatenated.
            "cross_attention_dim": 80,
            "attention_head_dim": (2, 4, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            # text encoder 2's projection (40) + 6 time ids x addition_time_embed_dim.
            "projection_class_embeddings_input_dim": 40 + 6 * 8,
        },
        # SDXL's VAE differs from SD1's in its latent scale.
        "vae": {**_TINY_VAE, "scaling_factor": 0.13025},
        "text_encoder": _TINY_SD15_TEXT_ENCODER,
        "text_encoder_2": {**_TINY_OPENCLIP_TEXT_ENCODER, "projection_dim": 40},
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

# Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs): a 2.6 B
# UNet, SD1's VAE layout with SDXL's latent scale, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.
_ARCHITECTURES["sdxl"] = {
    "unet": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 1280 + 6 * 256,
    },
    "vae": {**_ARCHITECTURES["sd15"]["vae"], "sample_size": 1024, "scaling_factor": 0.13025},
    "text_encoder": _ARCHITECTURES["sd15"]["text_encoder"],
    "text_encoder_2": {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "intermediate_size": 5120,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
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


# The DDIM config SD 2.x 768-v ships in its scheduler/ folder.
SD2_V_PIPELINE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}

# The Euler config SDXL base 1.0 ships (its training schedule is SD1's DDPM one).
SDXL_PIPELINE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

def _get(arch: str, component: str) -> dict[str, Any]:
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        config = _ARCHITECTURES[arch][component]
    except KeyError:
        raise ValueError(f"architecture {arch!r} has no {component}") from None
    return copy.deepcopy(config)


def unet_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `UNet2DConditionModel` for `arch` (a fresh copy)."""
    return _get(arch, "unet")


def vae_config(arch: str) -> dict[str, Any]:
    """Keyword arguments of `AutoencoderKL` for `arch` (a fresh copy)."""
    return _get(arch, "vae")


def text_encoder_config(arch: str, component: str = "text_encoder") -> dict[str, Any]:
    """Keyword arguments of `CLIPTextConfig` for `arch` (a fresh copy); SDXL's second
    encoder is component="text_encoder_2"."""
    return _get(arch, component)


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


def build_text_encoder_2(arch: str) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder (OpenCLIP-bigG-like, with the projection of its pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_config(arch, "text_encoder_2")))


def build_noise_scheduler(v_parameterization: bool = False) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_scheduler_config(v_parameterization))
