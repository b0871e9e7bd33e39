"""model.base_weights: LoRA files merged into the base model before training (sd-scripts'
--base_weights / --base_weights_multiplier, train_network.py's merge_to before the network).

Each module's update W += multiplier * up @ down * alpha / rank replaces the base layer's
weight with a new tensor: the base's own tensors are never written in place, so a base model
an in-process sweep keeps for its next jobs (atelier.runtime.reuse) stays pristine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from atelier.config.network_kinds import KINDS
from atelier.config.network_spec import NetworkSpec
from atelier.errors import ConfigError
from atelier.network.factory import create_network, file_family, file_variants, module_shapes
from atelier.network.lora_file import load_lora
from atelier.network.targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, belongs_to

log = logging.getLogger(__name__)


@torch.no_grad()
def merge_base_weights(
    unet: nn.Module, text_encoder: nn.Module | Sequence[nn.Module], paths: Sequence[str], multipliers: Sequence[float]
) -> None:
    """Merge each LoRA file of `paths` into the base (multipliers[i], or 1.0 past their end)."""
    for index, path in enumerate(paths):
        multiplier = multipliers[index] if index < len(multipliers) else 1.0
        key = f"model.base_weights[{index}]"
        try:
            state, _ = load_lora(path)
        except FileNotFoundError:
            raise ConfigError(f"{key}={path}: no such file") from None
        try:
            found = file_family(state)
        except ValueError as err:
            raise ConfigError(f"{key}={path} {err}") from None
        if found != "lora":
            raise ConfigError(f"{key}={path} holds {found} (LyCORIS) modules; only LoRA files merge into the base here")
        if file_variants(state):  # DoRA renormalises the merged weight: up @ down alone would be wrong
            variants = ", ".join(f"network.{v}" for v in sorted(file_variants(state)))
            raise ConfigError(f"{key}={path} was trained with {variants} (LyCORIS); only plain LoRA files merge into "
                              "the base here")
        merged = _merge(unet, text_encoder, state, multiplier, f"{key}={path}")
        log.info("merged %s into the base model (multiplier %g, %d modules)", path, multiplier, merged)


def _merge(unet: nn.Module, text_encoder: nn.Module | Sequence[nn.Module], state: dict[str, torch.Tensor],
           multiplier: float, where: str) -> int:  # fmt: skip
    shapes = module_shapes("lora", state)
    has = {prefix: any(belongs_to(name, prefix) for name in shapes) for prefix in (UNET_PREFIX, TEXT_ENCODER_PREFIX)}
    spec = NetworkSpec(kind=KINDS["lora"].name, dim=1, alpha=1.0)
    network = create_network(spec, unet if has[UNET_PREFIX] else None, text_encoder if has[TEXT_ENCODER_PREFIX] else None,
                             per_module=shapes, names=set(shapes))  # fmt: skip
    unknown = sorted(set(shapes) - set(network.loras))
    if unknown:
        raise ConfigError(f"{where} does not fit this base model: {len(unknown)} modules it does not have "
                          f"(e.g. {unknown[:3]}); was it trained on another model family?")  # fmt: skip
    network.load_kohya_state_dict(state, where)
    for module in network.loras.values():
        layer = module.base
        delta = module.weight_delta().reshape(layer.weight.shape) * multiplier
        layer.weight.data = layer.weight.data + delta.to(layer.weight.dtype)  # a new tensor, never in place
    return len(network.loras)
