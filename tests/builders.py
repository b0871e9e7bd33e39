"""Helpers the tests build fixtures and expectations with (not used by the package itself)."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.models.ldm_convert import diffusers_to_ldm
from atelier.network.lora import LoRANetwork
from atelier.utils.atomic import atomic_path


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def ranks_and_alphas(state: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (from lora_down's shape) and alpha of a kohya state dict."""
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    return ranks, alphas


def set_multiplier(network: LoRANetwork, multiplier: float) -> None:
    """Scale every module's update (what A1111's <lora:name:multiplier> does)."""
    for module in network.loras.values():
        module.multiplier = multiplier


def save_single_file(
    path: str | os.PathLike,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the model as one original-layout `.safetensors` file, atomically."""
    from safetensors.torch import save_file

    state_dict = {key: value.detach().contiguous() for key, value in diffusers_to_ldm(unet, vae, text_encoder).items()}
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
