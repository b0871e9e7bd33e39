"""DyLoRA as sd-scripts' networks.dylora trains it, saved as a plain kohya LoRA.

The rank is split into blocks of `unit` ranks. Each training forward draws a block
b at random: only that block learns (the others get no gradient, so the optimizer
leaves them alone), and the update is scaled up by sqrt(rank / (b*unit + unit)),
which teaches the leading blocks to carry the most. Outside training the module is
a plain LoRA of the full rank, which is also how every loader reads the file
(lora_down / lora_up / alpha), so it can later be cut to any multiple of `unit`
(sd-scripts: extract_lora_from_dylora.py, or `atelier resize`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.network.lora import max_norm_ratio
from atelier.network.patch import PatchedLayer

if TYPE_CHECKING:
    from atelier.config.network_spec import NetworkSpec
    from atelier.network.targets import TargetLayer

DOWN, UP = "lora_down.weight", "lora_up.weight"


class DyLoRAModule(PatchedLayer):
    def __init__(self, lora_name: str, base: nn.Module, rank: int, alpha: float, unit: int):
        super().__init__(lora_name, base)
        if rank % unit:
            raise ValueError(f"DyLoRA: the rank ({rank}) of {lora_name} must be a multiple of network.unit ({unit})")
        self.rank, self.unit = rank, unit
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            kernel = base.kernel_size
            self.conv_args = {"stride": base.stride, "padding": base.padding}
            down_shape, up_shape = (unit, base.in_channels, *kernel), (base.out_channels, unit, 1, 1)
        else:
            down_shape, up_shape = (unit, base.in_features), (base.out_features, unit)
        blocks = rank // unit
        # One parameter per block, so a block that does not learn this step has no
        # gradient at all (a zero gradient would still move it through momentum).
        self.down_blocks = nn.ParameterList([torch.empty(down_shape) for _ in range(blocks)])
        self.up_blocks = nn.ParameterList([torch.zeros(up_shape) for _ in range(blocks)])
        for block in self.down_blocks:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.register_alpha(alpha, rank)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(tuple(self.down_blocks), dim=0), torch.cat(tuple(self.up_blocks), dim=1)

    def _pick_block(self) -> float:
        """Train one random block this step; returns the extra scale for it."""
        block = int(torch.randint(len(self.down_blocks), ()))
        for i, (down, up) in enumerate(zip(self.down_blocks, self.up_blocks)):
            down.requires_grad_(i == block)
            up.requires_grad_(i == block)
        return math.sqrt(self.rank / (block * self.unit + self.unit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        extra = self._pick_block() if self.training else 1.0
        down, up = self.weights()
        x = x.to(down.dtype)
        if self.is_conv:
            h = F.conv2d(F.conv2d(x, down, **self.conv_args), up)
        else:
            h = F.linear(F.linear(x, down), up)
        return out + (h * (self.multiplier * self.scale * extra)).to(out.dtype)

    # The file holds one lora_down / lora_up pair, as sd-scripts writes it.
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        destination = {} if destination is None else destination
        down, up = self.weights()
        destination[prefix + DOWN] = down if keep_vars else down.detach()
        destination[prefix + UP] = up if keep_vars else up.detach()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        down, up = state_dict.pop(prefix + DOWN, None), state_dict.pop(prefix + UP, None)
        if down is not None and up is not None:
            if down.shape[0] != self.rank:
                error_msgs.append(f"{self.lora_name}: rank {down.shape[0]} in the file, {self.rank} here")
            else:
                for i in range(len(self.down_blocks)):
                    rows = slice(i * self.unit, (i + 1) * self.unit)
                    state_dict[f"{prefix}down_blocks.{i}"] = down[rows]
                    state_dict[f"{prefix}up_blocks.{i}"] = up[:, rows]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[bool, float]:
        down, up = self.weights()
        norm = (up.flatten(1) @ down.flatten(1) * self.scale).norm()
        ratio = max_norm_ratio(norm, max_norm)
        scaled = bool(ratio < 1)
        if scaled:
            for block in (*self.down_blocks, *self.up_blocks):
                block.mul_(ratio.sqrt())
        return scaled, float(norm * ratio)


def build_module(spec: NetworkSpec, target: TargetLayer, dim: int, alpha: float, options: dict[str, Any]) -> DyLoRAModule:
    """The `dylora` kind's builder (atelier.config.network_kinds)."""
    return DyLoRAModule(target.lora_name, target.module, dim, alpha, spec.unit)
