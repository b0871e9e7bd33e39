"""What every network module shares: patching one base layer's forward, and when it trains."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GradGatedTraining:
    """`training` is true only while the module is in train mode AND autograd records.

    Dropouts, module dropout and DyLoRA's random rank must act only in training
    steps. Validation and sampling run the patched model under no_grad without
    switching the network to eval mode, so the mode flag alone would let them act
    there. Mixed in before nn.Module; `train()` / `eval()` still set the flag.
    """

    @property
    def training(self) -> bool:
        return self.__dict__.get("_train_mode", True) and torch.is_grad_enabled()

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_train_mode"] = bool(mode)


class PatchedLayer(GradGatedTraining, nn.Module):
    """Replaces the `forward` of one base layer; the base layer is not copied or owned."""

    def __init__(self, lora_name: str, base: nn.Module):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = 1.0
        # Kept outside the module tree: the base layer is not ours to save or train.
        self._base = [base]
        self._base_forward: Callable[..., torch.Tensor] | None = None

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def apply_to(self) -> None:
        self._base_forward = self.base.forward
        self.base.forward = self.forward

    def restore(self) -> None:
        if self._base_forward is not None:
            self.base.forward = self._base_forward
            self._base_forward = None

    def register_alpha(self, alpha: float, rank: int) -> None:
        """kohya's `alpha` buffer (saved in the file), and alpha / rank kept as a Python float.

        The forward reads the float: `float(self.alpha)` there would copy the buffer from the
        GPU at every layer of every forward (hundreds of host-device syncs a step, measured
        0.30 s/step for SD1.5 on an H200) and break torch.compile's graph at each layer. The
        float follows the buffer whenever a state dict is loaded into the module.
        """
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._scale = float(alpha) / rank
        self.register_load_state_dict_post_hook(_refresh_scale)

    @property
    def scale(self) -> float:
        return self._scale

    def skip_module(self, module_dropout: float) -> bool:
        """kohya's module dropout: the whole update is left out of this training step."""
        return bool(module_dropout) and self.training and bool(torch.rand(1) < module_dropout)


def _refresh_scale(module: PatchedLayer, _incompatible_keys) -> None:
    module._scale = float(module.alpha) / module.rank
