"""Kohya-style LoRA: low-rank updates patched into a frozen model's layers.

Each `LoRAModule` replaces the `forward` of one Linear (or 1x1 Conv2d) layer with
    y = W x + (up @ down) x * (alpha / rank) * multiplier
and is named as sd-scripts names it, so the saved file loads in A1111, ComfyUI and
diffusers. The base layers are never copied or modified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# The classes whose Linear / 1x1-conv layers sd-scripts' networks.lora targets.
UNET_TARGETS = ("Transformer2DModel",)
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


class LoRAModule(nn.Module):
    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.lora_name = lora_name
        self.rank = rank
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        # A zero `up` makes the untrained network an exact no-op.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = 1.0
        # Kept outside the module tree: the base layer is not ours to save or train.
        self._base = [base]
        self._base_forward = None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def apply_to(self) -> None:
        base = self._base[0]
        self._base_forward = base.forward
        base.forward = self.forward

    def restore(self) -> None:
        if self._base_forward is not None:
            self._base[0].forward = self._base_forward
            self._base_forward = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        return out + (self.delta(x) * (self.multiplier * self.scale)).to(out.dtype)


@dataclass(frozen=True)
class TargetLayer:
    lora_name: str
    module: nn.Module


def _is_target_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)


def find_targets(root: nn.Module, prefix: str, target_classes: Iterable[str], name_root: str = "") -> Iterator[TargetLayer]:
    """Layers inside `target_classes` blocks, named `<prefix>_<path with . -> _>`."""
    target_classes = tuple(target_classes)
    seen: set[str] = set()
    for block_path, block in root.named_modules():
        if type(block).__name__ not in target_classes:
            continue
        for child_path, child in block.named_modules():
            if not _is_target_layer(child):
                continue
            path = ".".join(p for p in (name_root, block_path, child_path) if p)
            lora_name = f"{prefix}_{path.replace('.', '_')}"
            if lora_name not in seen:  # nested target blocks would repeat layers
                seen.add(lora_name)
                yield TargetLayer(lora_name, child)


def text_encoder_name_root(text_encoder: nn.Module) -> str:
    """Kohya names start at `text_model`; transformers >= 5.6 dropped that level."""
    return "" if hasattr(text_encoder, "text_model") else "text_model"


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, keyed by their kohya names."""

    def __init__(self, modules: dict[str, LoRAModule]):
        super().__init__()
        self.loras = nn.ModuleDict(modules)

    @classmethod
    def create(
        cls,
        unet: nn.Module | None,
        text_encoder: nn.Module | None,
        rank: int,
        alpha: float,
        ranks: dict[str, int] | None = None,
        alphas: dict[str, float] | None = None,
    ) -> "LoRANetwork":
        """Build modules for `unet` and/or `text_encoder` (None = not trained).

        `ranks` / `alphas` override the rank and alpha per module name (used when
        starting from an existing file).
        """
        ranks, alphas = ranks or {}, alphas or {}
        modules: dict[str, LoRAModule] = {}
        for target in iter_targets(unet, text_encoder):
            r = ranks.get(target.lora_name, rank)
            a = alphas.get(target.lora_name, alpha)
            modules[target.lora_name] = LoRAModule(target.lora_name, target.module, r, a)
        network = cls(modules)
        if text_encoder is not None:
            log.info("create LoRA for Text Encoder: %d modules.", network.count(TEXT_ENCODER_PREFIX))
        if unet is not None:
            log.info("create LoRA for U-Net: %d modules.", network.count(UNET_PREFIX))
        return network

    def count(self, prefix: str) -> int:
        return sum(1 for name in self.loras if name.startswith(prefix + "_"))

    def apply_to(self) -> None:
        for module in self.loras.values():
            module.apply_to()

    def restore(self) -> None:
        for module in self.loras.values():
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.loras.values():
            module.multiplier = multiplier

    def parameters_of(self, prefix: str) -> list[nn.Parameter]:
        return [p for name, m in self.loras.items() if name.startswith(prefix + "_") for p in m.parameters()]

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as the kohya file stores them: lora_down/lora_up weights and alpha."""
        state: dict[str, torch.Tensor] = {}
        for name, module in self.loras.items():
            state[f"{name}.lora_down.weight"] = module.lora_down.weight.detach()
            state[f"{name}.lora_up.weight"] = module.lora_up.weight.detach()
            state[f"{name}.alpha"] = module.alpha.detach()
        return state

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy weights from a kohya file; the module set must match exactly."""
        expected = set(self.kohya_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"network.weights={source} does not fit this model: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
                f"(e.g. {unexpected[:3]}). Was it trained on another base model or with "
                "train_unet_only / train_text_encoder_only set differently?"
            )
        with torch.no_grad():
            for name, module in self.loras.items():
                module.lora_down.weight.copy_(state[f"{name}.lora_down.weight"])
                module.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])
                module.alpha.copy_(state[f"{name}.alpha"])


def iter_targets(unet: nn.Module | None, text_encoder: nn.Module | None) -> Iterator[TargetLayer]:
    if text_encoder is not None:
        yield from find_targets(
            text_encoder, TEXT_ENCODER_PREFIX, TEXT_ENCODER_TARGETS, text_encoder_name_root(text_encoder)
        )
    if unet is not None:
        yield from find_targets(unet, UNET_PREFIX, UNET_TARGETS)


def ranks_and_alphas(state: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (from lora_down's shape) and alpha of a kohya state dict."""
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    return ranks, alphas
