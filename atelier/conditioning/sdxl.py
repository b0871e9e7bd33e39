"""What an SDXL UNet is conditioned on, as sd-scripts' sdxl_train_network computes it.

- Text: each caption through both text encoders; the hidden states of each one's
  penultimate layer (no final layer norm) concatenated on the feature axis
  (768 + 1280 = 2048 in SDXL), and the projected pooled output of encoder 2.
  Long captions (max_token_length 150/225) are encoded in 75-token chunks like
  SD1's (atelier.conditioning.text_chunks); the pooled output is the first chunk's.
  Weighted captions (dataset.weighted_captions) scale each encoder's hidden states by the
  token weights before they are concatenated; the pooled output is not weighted
  (sd-scripts' SdxlTextEncodingStrategy.encode_tokens_with_weights).
- Size/crop ("micro-conditioning"): per sample the 6 numbers
  (original h, w, crop top, left, target h, w), from the image's size, its bucket
  and whether it is flipped. sd-scripts does not take the crop offset of the
  actual crop: it takes the offset at which the image, scaled to FIT inside the
  bucket, would sit centred (Stability AI's preprocessing), mirrored for a flipped
  sample (BucketManager.get_crop_ltrb); we compute the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.text_chunks import apply_token_weights, stitch_chunks, tokenize_long, tokenize_weighted

if TYPE_CHECKING:
    from atelier.models.loading import BaseModel

log = logging.getLogger(__name__)


@dataclass
class SDXLText:
    """The text conditioning of a batch (or, in the cache, of one caption)."""

    hidden: torch.Tensor  # [B, tokens, dim1 + dim2]
    pooled: torch.Tensor  # [B, projection_dim]


class SDXLCaptionEncoder(CaptionEncoder):
    """CaptionEncoder for SDXL's two text encoders; returns SDXLText instead of a tensor."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], **kwargs: Any):
        clip_skip = kwargs.pop("clip_skip", 1)
        if clip_skip and clip_skip > 1:
            # sd-scripts warns the same way: SDXL always conditions on the penultimate layers.
            log.warning("training.clip_skip=%s has no effect on SDXL (it uses the penultimate layers)", clip_skip)
        super().__init__(tokenizers[0], text_encoders[0], clip_skip=1, **kwargs)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], text_encoders[1]

    def _encode(self, captions: list[str], grad: bool) -> SDXLText:
        with torch.set_grad_enabled(grad):
            hidden_1, _ = _penultimate(self.tokenizer, self.text_encoder, captions, self.max_token_length,
                                       self.weighted)  # fmt: skip
            hidden_2, pooled = _penultimate(self.tokenizer_2, self.text_encoder_2, captions, self.max_token_length,
                                            self.weighted)  # fmt: skip
        return SDXLText(torch.cat([hidden_1, hidden_2.to(hidden_1.dtype)], dim=-1), pooled)

    def _rows(self, encoded: SDXLText) -> list[SDXLText]:
        return [SDXLText(h, p) for h, p in zip(encoded.hidden.cpu(), encoded.pooled.cpu())]

    def _batch(self, rows: list[SDXLText], device: torch.device) -> SDXLText:
        return SDXLText(
            torch.stack([r.hidden for r in rows]).to(device), torch.stack([r.pooled for r in rows]).to(device)
        )


def _penultimate(tokenizer, text_encoder: torch.nn.Module, captions: list[str], max_token_length: int,
                 weighted: bool = False):  # fmt: skip
    """(penultimate hidden states [B, max_token_length + 2, dim], pooled output of chunk 0 or None);
    `weighted`: the hidden states scaled by the captions' token weights."""
    weights = None
    if weighted:
        chunk_ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
    else:
        chunk_ids = tokenize_long(tokenizer, captions, max_token_length)
    batch, num_chunks, chunk_length = chunk_ids.shape
    out = text_encoder(chunk_ids.reshape(batch * num_chunks, chunk_length).to(text_encoder.device),
                       output_hidden_states=True)  # fmt: skip
    hidden = stitch_chunks(out.hidden_states[-2], batch, num_chunks)
    if weights is not None:
        hidden = apply_token_weights(hidden, weights)
    pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection only
    if pooled is not None:
        pooled = pooled.reshape(batch, num_chunks, -1)[:, 0]
    return hidden, pooled


# --- size / crop conditioning ---------------------------------------------------


def crop_left_top(bucket: tuple[int, int], image_size: tuple[int, int], flipped: bool = False) -> tuple[int, int]:
    """sd-scripts' crop (left, top) for an image of image_size (w, h) in bucket (w, h)."""
    bucket_w, bucket_h = bucket
    image_ar = image_size[0] / image_size[1]
    if bucket_w / bucket_h > image_ar:  # the bucket is wider: the image fits its height
        fit_w, fit_h = bucket_h * image_ar, bucket_h
    else:
        fit_w, fit_h = bucket_w, bucket_w / image_ar
    left = math.floor((bucket_w - fit_w) / 2)
    top = math.floor((bucket_h - fit_h) / 2)
    if flipped:  # the right edge, seen in the mirrored image
        left = int(bucket_w - (left + fit_w))
    return int(left), int(top)


def time_ids(bucket: tuple[int, int], image_size: tuple[int, int], flipped: bool = False) -> list[int]:
    """SDXL's add_time_ids of one sample: original (h, w), crop (top, left), target (h, w)."""
    left, top = crop_left_top(bucket, image_size, flipped)
    return [image_size[1], image_size[0], top, left, bucket[1], bucket[0]]


# --- the trainer's hook -------------------------------------------------------------


def prepare_text_encoder_2(base: BaseModel, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen, eval mode, on `device`, in the training weight dtype: as the trainer sets up text_encoder."""
    encoder = base.text_encoder_2
    if encoder is None:
        return
    encoder.requires_grad_(False)
    encoder.eval()
    encoder.to(device)
    if dtype != torch.float32:
        encoder.to(dtype)


__all__ = [
    "SDXLCaptionEncoder",
    "SDXLText",
    "crop_left_top",
    "prepare_text_encoder_2",
    "time_ids",
]
