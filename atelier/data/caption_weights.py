"""Attention weights written in a caption, A1111 style (dataset.weighted_captions).

The syntax and its meaning are sd-scripts' (library/strategy_base.py,
TokenizeStrategy._get_weighted_input_ids.parse_prompt_attention, itself AUTOMATIC1111's):

    (word)        weight x 1.1           [word]   weight / 1.1
    (word:1.3)    weight x 1.3           nesting multiplies: ((word)) is x 1.21
    \\( \\) \\[ \\] \\\\   the literal character   an unclosed bracket applies to the end of the text

Brackets are text syntax, not tags: shuffle_caption, caption_tag_dropout_rate, keep_tokens and
token warmup split a caption at caption_separator before it is parsed, so a bracket that holds a
separator, "(red, blue:1.2)", is cut apart by them (sd-scripts' help says the same: "No commas
inside parens"). Write one bracket per tag: "(red:1.2), (blue:1.2)".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from atelier.config.schema.captions import CaptionOptions

# One match per piece: an escape, an opening bracket, ":<number>)" closing a weighted bracket,
# a closing bracket, a run of plain text, or a lone colon.
_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\
    | \( | \[
    | :([+-]?[.\d]+)\)
    | \) | ]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# Characters that make a caption carry weights (anything else parses to itself at 1.0).
_SYNTAX = re.compile(r"[\\()\[\]]")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The caption as (text, weight) runs, neighbours of equal weight merged; sd-scripts'
    parse_prompt_attention (library/strategy_base.py), e.g.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a bracket closing nothing (kept as text, as sd-scripts does)
            runs.append([piece, 1.0])
    for start in round_open:  # unclosed: to the end of the text
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not runs:
        return [("", 1.0)]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(piece, weight) for piece, weight in merged]


def has_weight_syntax(caption: str) -> bool:
    """True when the caption holds brackets or escapes, i.e. parses to something other than itself."""
    return bool(_SYNTAX.search(caption))


def bracket_spans_separator(caption: str, separator: str) -> bool:
    """True when `separator` occurs inside an open (...) or [...] of the caption: per-tag
    processing (shuffle, tag dropout, keep_tokens) would split that bracket apart."""
    depth = 0
    i = 0
    while i < len(caption):
        char = caption[i]
        if char == "\\":
            i += 2
            continue
        if char in "([":
            depth += 1
        elif char in ")]" and depth:
            depth -= 1
        elif depth and caption.startswith(separator, i):
            return True
        i += 1
    return False


def cuts_tags(opts: CaptionOptions) -> bool:
    """True when captions are split into tags each step (caption_ops.process_caption does then)."""
    return bool(opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or opts.keep_tokens_separator
                or opts.token_warmup_step > 0)  # fmt: skip


def brackets_cut_apart(captions: Iterable[str], opts: CaptionOptions) -> list[str]:
    """The captions whose brackets per-tag processing would split (empty when none is on)."""
    if not cuts_tags(opts):
        return []
    return [caption for caption in captions if bracket_spans_separator(caption, opts.caption_separator)]


__all__ = ["bracket_spans_separator", "brackets_cut_apart", "cuts_tags", "has_weight_syntax",
           "parse_prompt_attention"]  # fmt: skip
