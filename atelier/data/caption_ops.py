"""Per-step caption processing, as sd-scripts applies it each time an image is drawn.

Order (sd-scripts' BaseDataset.process_caption): whole-caption dropout; with
enable_wildcard one line of a multi-line caption; prefix/suffix (so they take part
in keep_tokens); wildcards; then the tags after the kept ones are cut by token
warmup, shuffled and tag-dropped; last, secondary_separator becomes caption_separator.
"""

from __future__ import annotations

import math
import random
import re

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
        or opts.enable_wildcard
        or opts.token_warmup_step > 0
    )


def process_caption(
    caption: str, opts: CaptionOptions, rng: random.Random, epoch: int, step: int = 0, total_steps: int = 0
) -> str:
    """The caption to train on this step; epoch counts from 1 as in sd-scripts, step (the
    optimizer steps done before this batch) and total_steps are for token warmup.

    All randomness comes from rng, so the same rng state gives the same caption.
    """
    if _drop_whole_caption(opts, rng, epoch):
        return ""
    if opts.enable_wildcard and "\n" in caption:
        # Before the prefix/suffix: sd-scripts joins them to the first and last line only.
        caption = rng.choice(caption.split("\n"))
    caption = add_prefix_suffix(caption, opts)
    if opts.enable_wildcard:
        caption = fill_wildcards(caption, rng)
    has_marker = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or has_marker or opts.token_warmup_step > 0):
        return _secondary_to_separator(caption, opts)
    head, middle, tail = split_kept_tags(caption, opts)
    middle = middle[: warmup_tag_count(len(middle), opts, step, total_steps)]
    if opts.shuffle_caption:
        rng.shuffle(middle)
    middle = _drop_tags(middle, opts.caption_tag_dropout_rate, rng)
    return _secondary_to_separator(_JOINER.join(head + middle + tail), opts)


def token_warmup_steps(opts: CaptionOptions, total_steps: int) -> float:
    """The step at which every tag is in: token_warmup_step, or below 1 that fraction of
    total_steps rounded down (sd-scripts' floor(token_warmup_step * max_train_steps)); 0: off."""
    if opts.token_warmup_step < 1:
        return math.floor(opts.token_warmup_step * total_steps)
    return opts.token_warmup_step


def warmup_tag_count(num_tags: int, opts: CaptionOptions, step: int, total_steps: int) -> int:
    """How many of the free tags a step keeps: floor(step * (num_tags - min) / warmup) + min
    before the warmup ends (sd-scripts' token warmup), all of them after."""
    warmup = token_warmup_steps(opts, total_steps)
    if not warmup or step >= warmup:
        return num_tags
    return max(0, math.floor(step * (num_tags - opts.token_warmup_min) / warmup) + opts.token_warmup_min)


def fill_wildcards(caption: str, rng: random.Random) -> str:
    """Each "{a|b|c}" replaced by one of a, b, c; "{{" and "}}" are literal braces
    (sd-scripts' enable_wildcard)."""
    # Placeholders for the escaped braces, made longer until the caption does not contain them.
    left, right = "\u2985", "\u2986"
    while left in caption or right in caption:
        left, right = left + "\u2985", right + "\u2986"
    escaped = caption.replace("{{", left).replace("}}", right)
    filled = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), escaped)
    return filled.replace(left, "{").replace(right, "}")


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _secondary_to_separator(caption: str, opts: CaptionOptions) -> str:
    if not opts.secondary_separator:
        return caption
    return caption.replace(opts.secondary_separator, opts.caption_separator)


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
    "fill_wildcards",
    "process_caption",
    "split_kept_tags",
    "token_warmup_steps",
    "warmup_tag_count",
]
