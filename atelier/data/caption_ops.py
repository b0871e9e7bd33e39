"""Per-step caption processing, as sd-scripts applies it each time an image is drawn.

Order (sd-scripts'): prefix/suffix are joined on first, so they take part in
keep_tokens; then whole-caption dropout; then the tags after the kept ones are
shuffled and tag-dropped.
"""

from __future__ import annotations

import random

from atelier.config.schema.captions import CaptionOptions

# sd-scripts joins processed tags with ", " whatever the separator was.
_JOINER = ", "


def captions_are_static(opts: CaptionOptions) -> bool:
    """True when a caption always comes out the same, so text-encoder outputs can be cached."""
    return not (
        opts.shuffle_caption
        or opts.caption_tag_dropout_rate > 0
        or opts.caption_dropout_rate > 0
        or opts.caption_dropout_every_n_epochs > 0
    )


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int) -> str:
    """The caption to train on this step; epoch counts from 1 as in sd-scripts.

    All randomness comes from rng, so the same rng state gives the same caption.
    """
    caption = add_prefix_suffix(caption, opts)
    if _drop_whole_caption(opts, rng, epoch):
        return ""
    has_marker = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or has_marker):
        return caption
    head, middle, tail = split_kept_tags(caption, opts)
    if opts.shuffle_caption:
        rng.shuffle(middle)
    middle = _drop_tags(middle, opts.caption_tag_dropout_rate, rng)
    return _JOINER.join(head + middle + tail)


def add_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    return caption


def split_kept_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(tags kept first, tags free to shuffle or drop, tags kept last)."""
    sep = opts.keep_tokens_separator
    if sep and sep in caption:
        head, rest = caption.split(sep, 1)
        middle, _, tail = rest.partition(sep)
        return _tags(head, opts), _tags(middle, opts), _tags(tail, opts)
    tags = _tags(caption, opts)
    return tags[: opts.keep_tokens], tags[opts.keep_tokens :], []


def _tags(text: str, opts: CaptionOptions) -> list[str]:
    return [tag.strip() for tag in text.split(opts.caption_separator) if tag.strip()]


def _drop_whole_caption(opts: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    # The rate draw comes first and only when a rate is set, so enabling
    # every_n_epochs alone does not shift the rng stream of the other options.
    by_rate = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    return by_rate or (every > 0 and epoch % every == 0)


def _drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    if rate <= 0:
        return tags
    return [tag for tag in tags if rng.random() >= rate]


__all__ = [
    "CaptionOptions",
    "add_prefix_suffix",
    "captions_are_static",
    "process_caption",
    "split_kept_tags",
]
