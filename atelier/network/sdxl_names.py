"""SDXL's kohya module names: the UNet in the original (LDM / sgm) layout.

sd-scripts trains SDXL on its own copy of Stability's UNet, so its LoRA names are
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, not diffusers'
`lora_unet_down_blocks_1_attentions_0_...`; every SDXL loader (A1111, ComfyUI,
diffusers) expects those. A network trained on the diffusers SDXL UNet is named
through atelier.models.ldm_convert's module map (derived from the UNet's blocks),
so it writes the names sd-scripts writes. SD1/2 keep diffusers names, as in sd-scripts.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def is_sdxl_unet(unet: nn.Module) -> bool:
    """A UNet with SDXL's size/crop + pooled-text added embedding."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


def unet_path_mapper(unet: nn.Module) -> Callable[[str], str] | None:
    """diffusers module path -> LDM path for an SDXL UNet; None for other UNets."""
    if not is_sdxl_unet(unet):
        return None
    from atelier.models.ldm_convert import unet_module_path_mapper

    return unet_module_path_mapper(unet)
