"""fp16 loss scaling around our own optimizer step.

With training.mixed_precision=fp16 accelerate makes a GradScaler and `accelerator.backward`
multiplies the loss by its scale. accelerate unscales only optimizers passed through
`accelerator.prepare`, and ours is stepped directly (one loop for one or K adapters), so the
step unscales the gradients itself before clipping, and steps through the scaler, which skips
a step whose gradients overflowed and lowers the scale (torch.amp's recipe:
https://pytorch.org/docs/stable/amp.html#gradient-scaling). Without a scaler (fp32, bf16) both
are the plain calls.
"""

from __future__ import annotations

import torch
from torch.amp import GradScaler


class FullFp16GradScaler(GradScaler):
    """A GradScaler that unscales fp16 gradients: training.full_fp16 keeps the network's
    parameters, hence their gradients, in fp16, which torch's scaler refuses (it expects fp32
    master weights). sd-scripts patches accelerate's scaler the same way
    (library/train_util.py: patch_accelerator_for_fp16_training)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ANN001, ANN202
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def unscale_gradients(scaler: GradScaler | None, optimizer: torch.optim.Optimizer) -> None:
    """The true gradients, before they are clipped or averaged into norms (no-op without a scaler)."""
    if scaler is not None:
        scaler.unscale_(optimizer)


def optimizer_step(scaler: GradScaler | None, optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(); with a scaler, skipped when the gradients hold inf/NaN (the scale then drops)."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()
