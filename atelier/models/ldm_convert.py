"""Convert SD1 diffusers modules to the original (LDM / CompVis) single-file layout.

diffusers only converts the other way (single file -> diffusers). The inverse
mapping here is derived from the modules themselves (how many resnets each block
has, which blocks have attention), so it works for any block_out_channels /
layers_per_block: the tiny test model as well as a real SD1.5.

Key layout of the single file:
    model.diffusion_model.*                   UNet (openaimodel.UNetModel)
    first_stage_model.*                       VAE (AutoencoderKL)
    cond_stage_model.transformer.text_model.* CLIP text encoder (SD1 only)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_RENAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# SD2's text encoder is stored in OpenCLIP layout, which this module doesn't write.
_SD2_CONTEXT_DIM = 1024


def diffusers_to_ldm(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """State dict of an SD1 model in the original single-file layout.

    The tensors are the modules' own (no copies); VAE attention weights are
    reshaped views.
    """
    if unet.config.cross_attention_dim == _SD2_CONTEXT_DIM:
        raise ValueError("SD2 single files keep the text encoder in OpenCLIP layout; only SD1 is supported")
    state_dict = {}
    for prefix, converted in (
        (UNET_PREFIX, unet_to_ldm(unet)),
        (VAE_PREFIX, vae_to_ldm(vae)),
        (TEXT_ENCODER_PREFIX, text_encoder_to_ldm(text_encoder)),
    ):
        state_dict.update({prefix + key: value for key, value in converted.items()})
    return state_dict


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """UNet state dict with `openaimodel.UNetModel` keys (without `model.diffusion_model.`)."""
    return _rename_all(unet.state_dict(), _unet_module_map(unet), "UNet")


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """VAE state dict with LDM `AutoencoderKL` keys (without `first_stage_model.`)."""
    converted = _rename_all(vae.state_dict(), _vae_module_map(vae), "VAE")
    for key, value in converted.items():
        # LDM's mid-block attention uses 1x1 convs where diffusers uses Linear.
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            converted[key] = value[:, :, None, None]
    return converted


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """CLIP text state dict with `text_model.*` keys (without `cond_stage_model.transformer.`)."""
    converted = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 dropped the `text_model.` level; the file keeps it.
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            continue  # a buffer, not a weight
        converted["text_model." + key] = value
    return converted


def _unet_module_map(unet: UNet2DConditionModel) -> dict[str, str]:
    """diffusers module path -> LDM module path for every UNet module with weights."""
    mapping = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }

    # input_blocks: [conv_in], then per down block one entry per resnet
    # (resnet at .0, its attention at .1) and one for the downsampler.
    index = 1
    for i, block in enumerate(unet.down_blocks):
        has_attention = hasattr(block, "attentions")
        for j in range(len(block.resnets)):
            _add_resnet(mapping, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if has_attention:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    # middle_block alternates resnet, attention, resnet.
    for j in range(len(unet.mid_block.resnets)):
        _add_resnet(mapping, f"mid_block.resnets.{j}", f"middle_block.{2 * j}", _UNET_RESNET_RENAMES)
    for j in range(len(unet.mid_block.attentions)):
        mapping[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"

    # output_blocks: one entry per resnet; the block's upsampler sits in the
    # entry of its last resnet, after the attention if there is one.
    index = 0
    for i, block in enumerate(unet.up_blocks):
        has_attention = hasattr(block, "attentions")
        for j in range(len(block.resnets)):
            _add_resnet(mapping, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if has_attention:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == len(block.resnets) - 1 and block.upsamplers:
                slot = 2 if has_attention else 1
                mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return mapping


def _vae_module_map(vae: AutoencoderKL) -> dict[str, str]:
    """diffusers module path -> LDM module path for every VAE module with weights."""
    mapping = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        mapping[f"{part}.conv_in"] = f"{part}.conv_in"
        mapping[f"{part}.conv_out"] = f"{part}.conv_out"
        mapping[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        mid = getattr(vae, part).mid_block
        for j in range(len(mid.resnets)):
            _add_resnet(mapping, f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", _VAE_RESNET_RENAMES)
        for j in range(len(mid.attentions)):
            for old, new in _VAE_ATTENTION_RENAMES.items():
                mapping[f"{part}.mid_block.attentions.{j}.{old}"] = f"{part}.mid.attn_{j + 1}.{new}"

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            _add_resnet(
                mapping, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_RENAMES
            )
        if block.downsamplers:
            mapping[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"

    # LDM numbers the decoder's levels by resolution (up.0 is the last to run);
    # diffusers numbers them in execution order.
    num_levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = num_levels - 1 - i
        for j in range(len(block.resnets)):
            _add_resnet(
                mapping, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET_RENAMES
            )
        if block.upsamplers:
            mapping[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return mapping


def _add_resnet(mapping: dict[str, str], diffusers_prefix: str, ldm_prefix: str, renames: dict[str, str]) -> None:
    for old, new in renames.items():
        mapping[f"{diffusers_prefix}.{old}"] = f"{ldm_prefix}.{new}"


def _rename_all(state_dict: dict[str, torch.Tensor], module_map: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    return {_rename(key, module_map, what): value for key, value in state_dict.items()}


def _rename(key: str, module_map: dict[str, str], what: str) -> str:
    """Rename `key` by the longest module path in `module_map` that contains it."""
    module, _, param = key.rpartition(".")
    renamed = _rename_module(module, module_map)
    if renamed is None:
        # Better to fail than to write a file that silently lacks weights.
        raise ValueError(f"cannot convert {what} key {key!r}: not part of the SD1 original layout")
    return f"{renamed}.{param}"


def _rename_module(module: str, module_map: dict[str, str]) -> str | None:
    prefix = module
    while prefix:
        if prefix in module_map:
            return f"{module_map[prefix]}{module[len(prefix):]}"
        prefix = prefix.rpartition(".")[0]
    return None


def unet_module_path_mapper(unet: UNet2DConditionModel) -> Callable[[str], str]:
    """diffusers UNet module path -> its LDM path (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` in SDXL); kohya names SDXL's LoRA modules this way.
    Paths outside the mapped blocks are returned unchanged."""
    module_map = _unet_module_map(unet)
    return lambda path: _rename_module(path, module_map) or path
