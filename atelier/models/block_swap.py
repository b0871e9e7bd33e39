"""training.blocks_to_swap: the frozen weights of some transformer blocks stay in CPU memory.

sd-scripts' --blocks_to_swap N (library/flux_models.py enable_block_swap) keeps the weights of
the last N // 2 double blocks and the last (N - N // 2) * 2 single blocks of FLUX's transformer
on the CPU and swaps them with resident blocks on a side CUDA stream. Here each Linear weight
of those blocks lives on the CPU (pinned when training on CUDA) and is copied to the training
device each time the layer runs, in the forward and again in the backward: the layer's forward
is a `StreamedLinear` autograd function that keeps nothing of the copy for backward (the base
weight is frozen, so backward needs the weight only for the input's gradient and fetches it
again). At most one layer's weight is on the device beyond the resident blocks', whether or
not gradient checkpointing is on, and the arithmetic is the layer's own: F.linear forward,
grad @ W backward. The copies are not overlapped with compute (sd-scripts' streams are); the
price is a synchronous host-to-device copy per swapped layer, twice a step.

Other weights of those blocks (norm scales, biases: a few KB a block) stay on the device, as
sd-scripts' weighs_to_device keeps them. LoRA modules wrap the streamed forward like any
other (they capture `layer.forward`), and fp8 storage (atelier.models.fp8_storage) streams the
fp8 bytes and casts them on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from atelier.errors import ConfigError

KEY = "training.blocks_to_swap"


def blocks_to_swap(transformer: nn.Module, n: int) -> list[nn.Module]:
    """The blocks sd-scripts swaps for blocks_to_swap=n: the last n // 2 double blocks and the
    last (n - n // 2) * 2 single blocks (ConfigError naming the key when the model has fewer)."""
    double, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    n_double, n_single = n // 2, (n - n // 2) * 2
    if n < 1 or n_double > len(double) or n_single > len(single):
        most = min(2 * len(double) + 1, len(single) // 2 * 2)  # n // 2 <= double, 2 * ceil(n / 2) <= single
        raise ConfigError(f"{KEY}={n}: swaps {n_double} double and {n_single} single blocks, but this transformer has "
                          f"{len(double)} and {len(single)}; use at most {most} (null: no swapping)")  # fmt: skip
    return double[len(double) - n_double:] + single[len(single) - n_single:]


def streamed_layers(blocks: list[nn.Module]) -> list[nn.Linear]:
    """The Linear layers of `blocks`, each once, in module order."""
    return list(dict.fromkeys(m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)))


def _stored(layer: nn.Linear) -> torch.Tensor:
    """The tensor that holds the layer's weight: itself, or fp8 storage's parametrized original."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original0
    return layer.weight


def stored_bytes(layer: nn.Linear) -> int:
    """Bytes of the layer's weight as stored (fp8 under fp8 storage)."""
    stored = _stored(layer)
    return stored.numel() * stored.element_size()


def fetch_weight(layer: nn.Linear, device: torch.device) -> torch.Tensor:
    """The layer's weight on `device`, in the dtype it computes in (fp8 storage cast after the copy)."""
    stored = _stored(layer).to(device, non_blocking=True)
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight[0](stored)
    return stored


class StreamedLinear(torch.autograd.Function):
    """y = F.linear(x, W, b) with W fetched from the CPU; backward fetches W again for dx = grad @ W
    (W and b are frozen: no gradient of their own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, fetch_weight(layer, x.device), layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        weight = fetch_weight(ctx.layer, grad.device)
        return grad.matmul(weight.to(grad.dtype)), None


def stream(layers: list[nn.Linear], device: torch.device) -> int:
    """Keep each layer's weight on the CPU and stream it to `device` per use; the bytes kept off it."""
    kept = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            raise ValueError(f"{KEY}: a streamed layer must be frozen (its weight is not trained)")
        stored = _stored(layer)
        stored.data = stored.data.to("cpu")
        if device.type == "cuda":  # pinned: the copies run asynchronously to the host
            stored.data = stored.data.pin_memory()
        kept += stored_bytes(layer)
        layer.forward = _streamed_forward(layer)
    return kept


def _streamed_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return StreamedLinear.apply(x, layer)

    return forward


def to_device_except(model: nn.Module, device: torch.device, layers: list[nn.Linear]) -> None:
    """model.to(device), the weights of `layers` left where they are: a model larger than the
    device's memory never has to fit on it whole (sd-scripts' move_to_device_except_swap_blocks)."""
    kept = {id(_stored(layer)) for layer in layers}
    for module in model.modules():
        for tensor in _own_tensors(module):
            if id(tensor) not in kept:
                tensor.data = tensor.data.to(device)


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
