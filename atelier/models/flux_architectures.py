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
