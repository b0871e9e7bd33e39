"""FLUX.1's transformer shapes, as keyword arguments of diffusers' FluxTransformer2DModel.

dev and schnell share the architecture (19 double-stream and 38 single-stream blocks, hidden
size 3072 = 24 heads x 128); dev, guidance-distilled, also embeds the guidance scale. Build
one under `with torch.device("meta"):` for its shapes without its 12B parameters.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

_FLUX1: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x a 2x2 patch
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's hidden size
    "pooled_projection_dim": 768,  # CLIP-L's pooled output
    "axes_dims_rope": (16, 56, 56),
}
FLUX1_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "dev": {**_FLUX1, "guidance_embeds": True},
    "schnell": {**_FLUX1, "guidance_embeds": False},
}


def flux_transformer_config(variant: str) -> dict[str, Any]:
    if variant not in FLUX1_TRANSFORMERS:
        raise ValueError(f"no FLUX.1 variant {variant!r}; known: {', '.join(FLUX1_TRANSFORMERS)}")
    return copy.deepcopy(FLUX1_TRANSFORMERS[variant])


def build_flux_transformer(variant: str) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**flux_transformer_config(variant))


# FLUX.1's inference scheduler (its scheduler/ folder): flow matching, the shift grows with the
# image's token count from base_shift at base_image_seq_len to max_shift at max_image_seq_len.
FLUX1_PIPELINE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# The characters of the tiny T5's vocab, as inclusive code point ranges: printable ASCII, the
# rest of the 2-byte UTF-8 range (Latin-1, Latin Extended, IPA, Greek, Cyrillic, Armenian, Hebrew,
# Arabic, ...) and General Punctuation (dashes, curly quotes, ellipsis). Fixed ranges, not
# unicodedata, so the vocab does not change with Python's Unicode version. Other characters
# (CJK, emoji) tokenize to <unk>, as with the real T5's vocab: transformers 5 rebuilds a T5
# tokenizer from its vocab without byte fallback, so the vocab alone decides what is known.
TINY_T5_ALPHABET: tuple[tuple[int, int], ...] = ((0x21, 0x7E), (0xA1, 0x7FF), (0x2000, 0x206F))
# <pad>, </s>, <unk> (T5's ids 0, 1, 2), "▁" (the word start, id 3 as in T5), then the alphabet.
TINY_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
TINY_T5_VOCAB_SIZE = len(TINY_T5_SPECIAL_TOKENS) + 1 + sum(end - start + 1 for start, end in TINY_T5_ALPHABET)

# tiny-flux (atelier.models.tiny_flux): FLUX.1-dev's layout at test size. Its CLIP-L-like text
# encoder is tiny-sd15's (atelier.models.architectures), pooled output 32 wide.
TINY_FLUX: dict[str, dict[str, Any]] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,  # the AE's 16 latent channels x a 2x2 patch, as FLUX.1
        "num_layers": 2,
        "num_single_layers": 3,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # the tiny T5's d_model
        "pooled_projection_dim": 32,  # the tiny CLIP's hidden size (FLUX reads CLIP's pooled output)
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
        "guidance_embeds": True,  # dev-like: the guidance scale is an input
    },
    # FLUX.1's AE (16 latent channels, no quant convs, its scale and shift) with 3 levels instead
    # of 4: the pipeline's vae_scale_factor is 4, a 64 px image a 16x16 latent, 8x8 = 64 tokens.
    "vae": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    # T5 v1.1-XXL's layout (gated GELU, relative position buckets, untied embeddings), tiny.
    "text_encoder_2": {
        "vocab_size": TINY_T5_VOCAB_SIZE,
        "d_model": 32,
        "d_kv": 8,
        "num_heads": 4,
        # Not a multiple of d_model, as tiny-sd15's CLIP: LoRA code that mixes up in/out features fails.
        "d_ff": 37,
        "num_layers": 2,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
}


def tiny_flux_config(component: str) -> dict[str, Any]:
    """Keyword arguments of tiny-flux's transformer / vae / text_encoder_2 (T5Config) (a fresh copy)."""
    if component not in TINY_FLUX:
        raise ValueError(f"tiny-flux has no {component!r}; known: {', '.join(TINY_FLUX)}")
    return copy.deepcopy(TINY_FLUX[component])
