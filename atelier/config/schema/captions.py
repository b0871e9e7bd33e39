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
    # Replaced by caption_separator after shuffle and dropout: "a;;;b" stays one tag until then.
    secondary_separator: str | None = None
    # "{red|blue} dog" picks one alternative per step ({{ and }} are literal braces); a caption
    # file's non-blank lines are alternatives too, one picked per step.
    enable_wildcard: bool = False
    # Token warmup: the shuffled/dropped tags are cut to token_warmup_min at step 0, growing
    # linearly to all of them at token_warmup_step (below 1: that fraction of the run's steps).
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    def __post_init__(self) -> None:
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")
        if self.secondary_separator and self.secondary_separator in (self.caption_separator,
                                                                     self.keep_tokens_separator):  # fmt: skip
            raise ValueError(
                f"secondary_separator={self.secondary_separator!r} is also the caption_separator or the "
                "keep_tokens_separator; give it a string of its own (e.g. ';;;') or drop it"
            )
        if self.token_warmup_min < 0:
            raise ValueError(f"token_warmup_min must not be negative, got {self.token_warmup_min}")
        if self.token_warmup_step < 0:
            raise ValueError(
                f"token_warmup_step must not be negative, got {self.token_warmup_step} (0: off; below 1: a "
                "fraction of the run's steps; else a step count)"
            )
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
