"""DoRA on our LoRA / LoCon modules (network.dora_wd), as LyCORIS' LoConModule does it.

LyCORIS (lycoris/modules/locon.py with weight_decompose=True, wd_on_out=True, and
functional/general.py `weight_decompose`) rebuilds the layer's weight at every call:
    W' = (W + dW) * (m / ||W + dW||)
with ||.|| per output channel (over inputs and kernel) plus float32's eps, dW = up @ down *
alpha / rank, and m (`dora_scale`, float32) starting as ||W|| per output channel and learnt, so
the untrained module is a no-op (up is zero). A multiplier k only interpolates the rescale,
W' = (W + dW) * (k * (m / ||W + dW|| - 1) + 1), as LyCORIS applies it. The file holds
`<module>.dora_scale` ([out, 1] or [out, 1, 1, 1]) beside lora_down / lora_up / alpha: what
LyCORIS writes, and what A1111, ComfyUI and LyCORIS load as DoRA. sd-scripts' networks.lora has
no DoRA; such a file's metadata is LyCORIS' (atelier.config.network_spec.kohya_module).

LyCORIS applies no neuron dropout with DoRA (the spec refuses network.dropout) and drops rank
dropout's whole output rows of dW, unscaled: both as here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atelier.network.lora import LoRAModule


def output_norm(weight: torch.Tensor) -> torch.Tensor:
    """||weight|| per output channel, shaped to broadcast over the weight ([out, 1, ...])."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def decompose(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float) -> torch.Tensor:
    """LyCORIS' weight_decompose (wd_on_out=True): the weight rescaled to the learnt magnitudes."""
    weight = weight.to(dora_scale.dtype)
    scale = dora_scale.to(weight.device) / (output_norm(weight) + torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale


class DoRAModule(LoRAModule):
    """A LoRA / LoCon module whose layer weight is re-normalised to learnt magnitudes."""

    def __init__(
        self, lora_name: str, base: nn.Module, rank: int, alpha: float, rank_dropout: float = 0.0,
        module_dropout: float = 0.0, tucker: bool = False,
    ):  # fmt: skip
        super().__init__(lora_name, base, rank, alpha, 0.0, rank_dropout, module_dropout, tucker)
        self.dora_scale = nn.Parameter(output_norm(base.weight.detach().float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.skip_module(self.module_dropout):
            return out
        base_weight = self.base.weight.detach()
        diff = self.weight_delta(scaled=False).reshape(base_weight.shape)
        if self.training and self.rank_dropout:
            # LyCORIS' weight-path rank dropout: whole output rows of dW, not rescaled.
            keep = (torch.rand(diff.shape[0], device=diff.device) > self.rank_dropout).to(diff.dtype)
            diff = diff * keep.view(-1, *[1] * (diff.dim() - 1))
        diff = diff.to(base_weight.dtype) * self.scale
        delta = decompose(base_weight + diff, self.dora_scale, self.multiplier) - base_weight
        return out + self._layer_op(x.to(delta.dtype), delta).to(out.dtype)

    def _layer_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's own op with another weight (no bias: the base forward added it)."""
        base = self.base
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, weight)
