"""Captions -> text-encoder hidden states for the UNet, with an optional cache.

Captions are encoded in 75-token chunks up to dataset.max_token_length
(atelier.conditioning.text_chunks). When the text encoder is not trained and captions never
change, the hidden states of each distinct caption are computed once and reused
every step (the text-encoder output cache).

With `weighted` (dataset.weighted_captions) "(word:1.3)"-style weights in a caption scale
its tokens' hidden states (text_chunks.apply_token_weights). The cache lives in the encoder
and holds what this encoder computed, weights applied, so a weighted run never reads
unweighted states (nor the other way round).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.conditioning.text_chunks import encode_long
from atelier.errors import ConfigError

log = logging.getLogger(__name__)


class CaptionEncoder:
    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        *,
        max_token_length: int = 75,
        clip_skip: int = 1,
        cache: bool = False,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        batch_size: int = 16,
        weighted: bool = False,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_token_length = max_token_length
        layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
        if layers is not None and clip_skip > layers:
            raise ConfigError(
                f"training.clip_skip={clip_skip} but the text encoder has {layers} layers: "
                f"pass training.clip_skip between 1 and {layers} (2 = the penultimate layer)"
            )
        self.clip_skip = clip_skip
        self.autocast = autocast
        self.batch_size = batch_size
        self.weighted = weighted
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None
        # Where cached batches go: the training device, also once the idle text encoders moved
        # off it (atelier.loop.build.offload_text_encoders).
        self.device = getattr(text_encoder, "device", torch.device("cpu"))

    @property
    def caching(self) -> bool:
        return self._cache is not None

    def __call__(self, captions: Sequence[str], grad: bool = False) -> torch.Tensor:
        """Hidden states [B, max_token_length + 2, dim] on the text encoder's device."""
        if self._cache is None:
            return self._encode(list(captions), grad)
        self.fill(captions)
        return self._batch([self._cache[caption] for caption in captions], self.device)

    def fill(self, captions: Sequence[str]) -> int:
        """Encode the captions not cached yet; returns how many were encoded."""
        assert self._cache is not None, "fill() needs cache=True"
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self._cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with self.autocast():
                hidden = self._encode(chunk, grad=False)
            for caption, states in zip(chunk, self._rows(hidden)):
                self._cache[caption] = states
        return len(missing)

    # The cache holds one entry per caption; an encoder whose output is not one
    # tensor (SDXL's) overrides these two.
    def _rows(self, encoded: torch.Tensor) -> list:
        """One batch's output -> one CPU entry per caption."""
        return list(encoded.cpu())

    def _batch(self, rows: list, device: torch.device):
        """Cached entries -> one batch's output on `device`."""
        return torch.stack(rows).to(device)

    def _encode(self, captions: list[str], grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return encode_long(self.tokenizer, self.text_encoder, captions, self.max_token_length, self.clip_skip,
                               weighted=self.weighted)  # fmt: skip


__all__ = ["CaptionEncoder"]
