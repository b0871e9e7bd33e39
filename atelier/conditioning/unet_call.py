"""The UNet call every training, validation and fused step makes: SD1/2 take the text
hidden states; SDXL also its pooled text and the size/crop ids (atelier.conditioning.sdxl)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from atelier.conditioning.sdxl import SDXLText


def unet_prediction(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor | SDXLText,
    time_ids: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The UNet's output; SDXL's (text is SDXLText) gets pooled text and the [B, 6] size/crop
    ids too (`time_ids`, or a function computing them: only called for SDXL)."""
    if not isinstance(text, SDXLText):
        return unet(noisy, timesteps, text).sample
    if callable(time_ids):
        time_ids = time_ids()
    if time_ids is None:
        raise ValueError("an SDXL UNet needs the size/crop time_ids of the batch")
    ids = time_ids.to(device=noisy.device, dtype=text.pooled.dtype)
    added = {"text_embeds": text.pooled, "time_ids": ids}
    return unet(noisy, timesteps, text.hidden, added_cond_kwargs=added).sample
