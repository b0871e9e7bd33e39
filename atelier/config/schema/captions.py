"""The caption options of a dataset (sd-scripts' names) with their rules: what
atelier.data.caption_ops applies each time an image is drawn."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    # "a, b ||| c, d ||| e": a, b stay first, e stays last, c, d are shuffled.
    # Takes precedence over keep_tokens in captions that contain it, and is always
    # removed: the marker is an instruction, never text for the text encoder.
    keep_tokens_separator: str = ""
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0

    def __post_init__(self) -> None:
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must not be negative, got {self.keep_tokens}")
        if self.caption_dropout_every_n_epochs < 0:
            raise ValueError(
                f"caption_dropout_every_n_epochs must not be negative, got {self.caption_dropout_every_n_epochs}"
            )
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
