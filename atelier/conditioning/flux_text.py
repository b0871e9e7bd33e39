"""Captions -> FLUX.1's text conditioning: CLIP-L's pooled vector and T5-XXL's token states.

As sd-scripts' strategy_flux (FluxTokenizeStrategy, FluxTextEncodingStrategy): CLIP-L reads
77 tokens (padded, truncated) and gives its pooler_output; T5 reads t5xxl_max_token_length
tokens (padded, truncated) and gives its last hidden states; with apply_t5_attn_mask T5 skips
its padding, and the transformer is given the mask too (atelier.objective.steps). Weighted
captions do not apply: sd-scripts' FLUX encoder has no weights either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atelier.conditioning.caption_encoder import CaptionEncoder

CLIP_TOKENS = 77  # CLIP-L's context, BOS and EOS included


@dataclass(frozen=True)
class FluxTextOptions:
    """How a run encodes FLUX captions: T5's token count and whether its padding is masked."""

    t5_tokens: int
    apply_t5_attn_mask: bool


@dataclass
class FluxText:
    """The text conditioning of a batch (or, in the cache, of one caption)."""

    t5: torch.Tensor  # [B, t5xxl_max_token_length, t5 width]
    pooled: torch.Tensor  # [B, CLIP-L width]
    t5_mask: torch.Tensor  # [B, t5xxl_max_token_length] 1 for a caption token, 0 for padding


class FluxCaptionEncoder(CaptionEncoder):
    """CaptionEncoder for FLUX.1's CLIP-L + T5; returns FluxText. Caches per caption as SD's does."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], *, options: FluxTextOptions,
                 **kwargs: Any):  # fmt: skip
        kwargs.pop("clip_skip", None)  # the config refuses clip_skip for FLUX
        kwargs.pop("max_token_length", None)
        if kwargs.pop("weighted", False):
            raise ValueError("dataset.weighted_captions: FLUX.1's text encoders read captions without weights")
        super().__init__(tokenizers[0], text_encoders[0], max_token_length=CLIP_TOKENS - 2, **kwargs)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], text_encoders[1]
        self.t5_tokens = options.t5_tokens
        self.apply_t5_attn_mask = options.apply_t5_attn_mask

    def _encode(self, captions: list[str], grad: bool) -> FluxText:
        clip_ids = self.tokenizer(captions, max_length=CLIP_TOKENS, padding="max_length", truncation=True,
                                  return_tensors="pt").input_ids  # fmt: skip
        t5 = self.tokenizer_2(captions, max_length=self.t5_tokens, padding="max_length", truncation=True,
                              return_tensors="pt")  # fmt: skip
        t5_device = self.text_encoder_2.device
        mask = t5.attention_mask.to(t5_device)
        with torch.set_grad_enabled(grad):
            pooled = self.text_encoder(clip_ids.to(self.text_encoder.device)).pooler_output
        with torch.no_grad():  # T5 is never trained (sd-scripts' train_t5xxl is not built here)
            states = self.text_encoder_2(t5.input_ids.to(t5_device),
                                         attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        return FluxText(states, pooled, mask)

    def _rows(self, encoded: FluxText) -> list[FluxText]:
        return [FluxText(t5, pooled, mask) for t5, pooled, mask in
                zip(encoded.t5.cpu(), encoded.pooled.cpu(), encoded.t5_mask.cpu())]  # fmt: skip

    def _batch(self, rows: list[FluxText], device: torch.device) -> FluxText:
        return FluxText(torch.stack([r.t5 for r in rows]).to(device), torch.stack([r.pooled for r in rows]).to(device),
                        torch.stack([r.t5_mask for r in rows]).to(device))  # fmt: skip


__all__ = ["CLIP_TOKENS", "FluxCaptionEncoder", "FluxText", "FluxTextOptions"]
