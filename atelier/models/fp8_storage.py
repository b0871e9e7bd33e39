"""fp8 storage of a frozen base model's weights (sd-scripts' --fp8_base / --fp8_base_unet).

The weights of every Linear and Conv layer are kept in float8_e4m3fn, half the bytes of
fp16/bf16, and cast up to the compute dtype each time the layer runs. sd-scripts casts the
whole model to fp8 and relies on CUDA autocast to cast weights up inside each matmul; torch's
CPU autocast does not (its GroupNorm refuses fp8 weights), so here the cast is a weight
parametrization (torch.nn.utils.parametrize): the same on any device, and every reader of
`layer.weight` (the layer's forward, a LoRA's base forward, DoRA's weight norm, sampling)
gets the compute-dtype weight. Norm layers and embeddings keep their dtype (a small share
of the bytes; fp8 embeddings are unsupported, as sd-scripts notes for the text encoders).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FP8 = torch.float8_e4m3fn


class StoredInFp8(nn.Module):
    """The parametrization: fp8 storage (`right_inverse`), `dtype` on use (`forward`)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        # A 1-tuple: torch refuses a single stored tensor of another dtype than the weight.
        return (weight.to(FP8),)


def store_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep `model`'s Linear and Conv weights in fp8, used in `compute_dtype`; the bytes saved."""
    saved = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or parametrize.is_parametrized(module, "weight"):
            continue
        before = module.weight.numel() * module.weight.element_size()
        parametrize.register_parametrization(module, "weight", StoredInFp8(compute_dtype))
        stored = module.parametrizations.weight.original0
        stored.requires_grad_(False)
        saved += before - stored.numel() * stored.element_size()
    return saved
