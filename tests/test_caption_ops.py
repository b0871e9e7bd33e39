"""Per-step caption processing (sd-scripts' options) and long-caption chunked encoding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from atelier.conditioning.text_chunks import encode_long, split_into_chunks, tokenize_long
from atelier.conditioning.text_encoding import encode_tokens
from atelier.config.schema.captions import CaptionOptions
from atelier.data.caption_ops import captions_are_static, process_caption, token_warmup_steps, warmup_tag_count
from tests.builders import tokenize

CAPTION = "sks dog, red collar, grass, sunny, outdoors, running"
TAGS = [tag.strip() for tag in CAPTION.split(",")]


def run(caption: str, opts: CaptionOptions, seed: int = 0, epoch: int = 1) -> str:
    return process_caption(caption, opts, random.Random(seed), epoch)


def tags_of(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


# --- process_caption --------------------------------------------------------------------


def test_no_options_leaves_the_caption_alone() -> None:
    assert run(CAPTION, CaptionOptions()) == CAPTION


def test_prefix_and_suffix_are_added() -> None:
    opts = CaptionOptions(caption_prefix="masterpiece,", caption_suffix=", best quality")
    assert run("a dog", opts) == "masterpiece, a dog , best quality"


def test_shuffle_keeps_the_first_keep_tokens_tags() -> None:
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    outputs = {run(CAPTION, opts, seed) for seed in range(30)}
    assert len(outputs) > 10
    for out in outputs:
        tags = tags_of(out)
        assert tags[:2] == TAGS[:2]
        assert sorted(tags[2:]) == sorted(TAGS[2:])


def test_shuffle_is_deterministic_given_the_rng() -> None:
    opts = CaptionOptions(shuffle_caption=True)
    assert run(CAPTION, opts, seed=4) == run(CAPTION, opts, seed=4)
    rng = random.Random(4)
    first, second = process_caption(CAPTION, opts, rng, 1), process_caption(CAPTION, opts, rng, 1)
    assert first != second  # the rng advances between steps


def test_prefix_joins_the_first_tag_and_is_kept_with_it() -> None:
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="photo of")
    for seed in range(10):
        assert tags_of(run(CAPTION, opts, seed))[0] == "photo of sks dog"


def test_keep_tokens_separator_fixes_head_and_tail() -> None:
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks dog, red collar ||| grass, sunny, outdoors ||| high quality"
    for seed in range(20):
        tags = tags_of(run(caption, opts, seed))
        assert tags[:2] == ["sks dog", "red collar"]
        assert tags[-1] == "high quality"
        assert sorted(tags[2:-1]) == ["grass", "outdoors", "sunny"]


def test_keep_tokens_separator_never_reaches_the_text_encoder() -> None:
    opts = CaptionOptions(keep_tokens_separator="|||")
    assert run("a, b ||| c, d", opts) == "a, b, c, d"


def test_custom_separator() -> None:
    opts = CaptionOptions(shuffle_caption=True, caption_separator=";", keep_tokens=1)
    tags = run("a; b; c; d", opts, seed=1).split(", ")
    assert tags[0] == "a" and sorted(tags) == ["a", "b", "c", "d"]


def test_tag_dropout_only_drops_unkept_tags() -> None:
    everything = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert run(CAPTION, everything) == "sks dog"
    half = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    kept = [len(tags_of(run(CAPTION, half, seed))) - 1 for seed in range(300)]
    assert 0.4 < sum(kept) / (300 * (len(TAGS) - 1)) < 0.6
    # Without shuffling the surviving tags keep their order.
    for seed in range(20):
        tags = tags_of(run(CAPTION, half, seed))
        assert tags == [tag for tag in TAGS if tag in tags]


def test_caption_dropout_rate() -> None:
    assert run(CAPTION, CaptionOptions(caption_dropout_rate=1.0, caption_prefix="x")) == ""
    opts = CaptionOptions(caption_dropout_rate=0.25)
    dropped = sum(run(CAPTION, opts, seed) == "" for seed in range(400))
    assert 60 < dropped < 140


def test_caption_dropout_every_n_epochs() -> None:
    opts = CaptionOptions(caption_dropout_every_n_epochs=2)
    assert [run(CAPTION, opts, epoch=epoch) for epoch in (1, 2, 3, 4)] == [CAPTION, "", CAPTION, ""]


def test_captions_are_static_only_without_randomness() -> None:
    assert captions_are_static(CaptionOptions())
    assert captions_are_static(CaptionOptions(keep_tokens=2, caption_prefix="a", caption_suffix="b"))
    for opts in (
        CaptionOptions(shuffle_caption=True),
        CaptionOptions(caption_tag_dropout_rate=0.1),
        CaptionOptions(caption_dropout_rate=0.1),
        CaptionOptions(caption_dropout_every_n_epochs=3),
    ):
        assert not captions_are_static(opts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"caption_dropout_rate": 1.5}, "caption_dropout_rate"),
        ({"caption_tag_dropout_rate": -0.1}, "caption_tag_dropout_rate"),
        ({"keep_tokens": -1}, "keep_tokens"),
        ({"caption_separator": ""}, "caption_separator"),
        ({"caption_dropout_every_n_epochs": -2}, "every_n_epochs"),
    ],
)
def test_options_are_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CaptionOptions(**kwargs)


def test_secondary_separator_keeps_a_tag_together_then_becomes_the_separator() -> None:
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    outputs = {run("a, b;;;c, d, e", opts, seed) for seed in range(30)}
    assert len(outputs) > 5
    for out in outputs:
        assert ";;;" not in out and "b,c" in out  # shuffled as one tag, joined by caption_separator after
        assert sorted(out.split(", ")) == ["a", "b,c", "d", "e"]
    # Without shuffle or dropout it is still replaced (sd-scripts does it last, always).
    assert run("a, b;;;c", CaptionOptions(secondary_separator=";;;")) == "a, b,c"
    assert run("a, b;;;c", CaptionOptions(secondary_separator=";;;", caption_dropout_rate=1.0)) == ""


def test_wildcards_pick_one_alternative_per_step() -> None:
    opts = CaptionOptions(enable_wildcard=True)
    outputs = {run("a {red|blue|green} dog, {{literal}}", opts, seed) for seed in range(30)}
    assert outputs == {f"a {colour} dog, {{literal}}" for colour in ("red", "blue", "green")}
    assert run("a {red|blue} dog", opts, seed=3) == run("a {red|blue} dog", opts, seed=3)
    # Off: the braces are text.
    assert run("a {red|blue} dog", CaptionOptions()) == "a {red|blue} dog"


def test_wildcard_lines_are_alternatives_and_each_gets_prefix_and_suffix() -> None:
    opts = CaptionOptions(enable_wildcard=True, caption_prefix="pre", caption_suffix="post")
    outputs = {run("one, x\ntwo {a|b}", opts, seed) for seed in range(40)}
    assert outputs == {"pre one, x post", "pre two a post", "pre two b post"}


def test_token_warmup_grows_the_free_tags_from_min_to_all() -> None:
    opts = CaptionOptions(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    counts = [len(tags_of(process_caption(CAPTION, opts, random.Random(0), 1, step))) for step in (0, 5, 9, 10, 50)]
    # The kept tag + floor(step * (5 - 1) / 10) + 1 of the 5 free ones.
    assert counts == [1 + 1, 1 + 3, 1 + 4, 6, 6]
    assert tags_of(process_caption(CAPTION, opts, random.Random(0), 1, 0)) == TAGS[:2]  # cut before the shuffle
    # Below 1: a fraction of the run's steps (floor(0.5 * 20) = 10 here).
    frac = CaptionOptions(keep_tokens=1, token_warmup_step=0.5)
    assert token_warmup_steps(frac, 20) == 10
    assert len(tags_of(process_caption(CAPTION, frac, random.Random(0), 1, 5, 20))) == 4
    assert warmup_tag_count(5, CaptionOptions(), 0, 100) == 5  # off by default


def test_captions_vary_with_wildcards_and_token_warmup() -> None:
    assert not captions_are_static(CaptionOptions(enable_wildcard=True))
    assert not captions_are_static(CaptionOptions(token_warmup_step=0.2))
    assert captions_are_static(CaptionOptions(secondary_separator=";;;", token_warmup_min=3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"secondary_separator": ","}, "secondary_separator=',' is also the caption_separator"),
        ({"secondary_separator": "|||", "keep_tokens_separator": "|||"}, "also the caption_separator or the keep"),
        ({"token_warmup_min": -1}, "token_warmup_min must not be negative"),
        ({"token_warmup_step": -0.5}, "token_warmup_step must not be negative"),
    ],
)
def test_new_caption_options_are_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CaptionOptions(**kwargs)


# --- long captions: 75-token chunks -----------------------------------------------------


def test_chunks_get_bos_and_eos_when_pad_is_not_eos() -> None:
    bos, eos, pad = 100, 101, 0
    # 4 content slots per chunk (chunk length 6): caption of 5 tokens, then EOS, then pads.
    ids = torch.tensor([[bos, 1, 2, 3, 4, 5, eos, pad, pad, pad]])
    chunks = split_into_chunks(ids, chunk_length=6, eos_id=eos, pad_id=pad)
    assert chunks.tolist() == [[[bos, 1, 2, 3, 4, eos], [bos, 5, eos, pad, pad, pad]]]
    empty_second = torch.tensor([[bos, 1, 2, eos, pad, pad, pad, pad, pad, pad]])
    chunks = split_into_chunks(empty_second, 6, eos, pad)
    assert chunks.tolist() == [[[bos, 1, 2, eos, pad, pad], [bos, eos, pad, pad, pad, pad]]]


def test_chunks_reuse_the_caption_end_when_pad_is_eos() -> None:
    bos, eos = 100, 101
    ids = torch.tensor([[bos, 1, 2, 3, 4, 5, eos, eos, eos, eos]])
    chunks = split_into_chunks(ids, 6, eos, eos)
    assert chunks.tolist() == [[[bos, 1, 2, 3, 4, eos], [bos, 5, eos, eos, eos, eos]]]
    with pytest.raises(ValueError, match="chunks"):
        split_into_chunks(ids[:, :9], 6, eos, eos)


@pytest.fixture(scope="module")
def text_model(tiny_model_path: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model_path / "text_encoder").eval()
    return tokenizer, encoder


LONG = ", ".join(f"tag{i}" for i in range(20))  # ~110 tokens: the tiny tokenizer has no merges


@torch.no_grad()
def test_75_tokens_is_plain_clip_encoding(text_model) -> None:
    tokenizer, encoder = text_model
    captions = ["a red dog", LONG]
    for clip_skip in (1, 2):
        expected = encode_tokens(encoder, tokenize(tokenizer, captions), clip_skip)
        assert torch.allclose(encode_long(tokenizer, encoder, captions, 75, clip_skip), expected, atol=1e-6)
    assert tokenize_long(tokenizer, captions, None).shape == (2, 1, 77)


@torch.no_grad()
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_encoding_has_max_token_length_plus_two_states(text_model, max_token_length: int) -> None:
    tokenizer, encoder = text_model
    hidden = encode_long(tokenizer, encoder, ["a red dog", LONG], max_token_length, clip_skip=2)
    assert hidden.shape == (2, max_token_length + 2, encoder.config.hidden_size)
    assert torch.isfinite(hidden).all()


@torch.no_grad()
def test_first_chunk_matches_plain_encoding_and_later_tokens_count(text_model) -> None:
    tokenizer, encoder = text_model
    short = encode_tokens(encoder, tokenize(tokenizer, ["a red dog"]))
    long_short = encode_long(tokenizer, encoder, ["a red dog"], 150)
    assert torch.allclose(long_short[:, :76], short[:, :76], atol=1e-6)  # BOS + first 75 tokens
    # Two captions that differ only after token 75: truncated they encode the same, chunked they do not.
    a, b = LONG + ", apple", LONG + ", zebra"
    assert 75 < len(tokenizer(a).input_ids) - 2 < 150
    plain = encode_tokens(encoder, tokenize(tokenizer, [a, b]))
    assert torch.allclose(plain[0], plain[1])
    chunked = encode_long(tokenizer, encoder, [a, b], 150)
    assert not torch.allclose(chunked[0], chunked[1])
    assert torch.allclose(chunked[0, :76], chunked[1, :76], atol=1e-6)


def test_unsupported_max_token_length(text_model) -> None:
    tokenizer, _ = text_model
    with pytest.raises(ValueError, match="75, 150, 225"):
        tokenize_long(tokenizer, ["x"], 100)
