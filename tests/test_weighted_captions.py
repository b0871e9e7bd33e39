"""dataset.weighted_captions: sd-scripts' --weighted_captions ("(word:1.3)" in captions).

The parser against sd-scripts' documented examples; plain captions encode bit for bit as
without the option; a weighted token's states are multiplied by its weight (sd-scripts'
train_network.py, strategy_sd.encode_tokens_with_weights); weights follow their tokens into later 75-token chunks; SD1 and
SDXL tiny models; a short training run; the refused separators.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from atelier.conditioning.caption_encoder import CaptionEncoder
from atelier.conditioning.text_chunks import apply_token_weights, encode_long, tokenize_long, tokenize_weighted
from atelier.config.schema.captions import CaptionOptions
from atelier.data.caption_weights import (
    bracket_spans_separator,
    brackets_cut_apart,
    has_weight_syntax,
    parse_prompt_attention,
)
from atelier.errors import DatasetError
from atelier.network.lora_file import load_lora
from tests.test_caption_step_options import captioned
from tests.test_dataset_pipeline import NO_SAMPLES
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (autouse fixture)

LONG = ", ".join(f"tag{i}" for i in range(20))  # ~110 tokens with the tiny tokenizer (no merges)


# --- the parser: sd-scripts' docstring examples -----------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
        ("[quiet]", [("quiet", 1 / 1.1)]),
        ("", [("", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("close) nothing]", [("close) nothing]", 1.0)]),  # unmatched closers stay text
        ("time: 3pm", [("time: 3pm", 1.0)]),  # a colon outside (...:w) is text
    ],
)
def test_parse_prompt_attention(text: str, expected: list) -> None:
    got = parse_prompt_attention(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_nested_brackets_multiply_as_sd_scripts_documents() -> None:
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]  # fmt: skip
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_syntax_detection_and_brackets_that_tag_processing_splits() -> None:
    assert not has_weight_syntax("sks dog, red collar: yes")
    assert has_weight_syntax("sks (dog)") and has_weight_syntax("a \\( b")
    assert bracket_spans_separator("x, (red, blue:1.2)", ",")
    assert not bracket_spans_separator("(red:1.2), (blue:1.2)", ",")
    assert not bracket_spans_separator("\\(a, b\\)", ",")  # escaped: no bracket
    captions = ["(a, b:1.2), c", "(a:1.2), b"]
    assert brackets_cut_apart(captions, CaptionOptions()) == []  # nothing splits captions
    assert brackets_cut_apart(captions, CaptionOptions(shuffle_caption=True)) == ["(a, b:1.2), c"]
    assert brackets_cut_apart(captions, CaptionOptions(caption_tag_dropout_rate=0.1)) == ["(a, b:1.2), c"]


# --- tokens and weights -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tiny_model_path: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model_path / "text_encoder").eval()
    return tokenizer, encoder


@pytest.fixture(scope="module")
def sdxl_text(atelier_cache: Path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from atelier.models.tiny import TINY_SDXL_NAME, ensure_tiny_model

    folder = ensure_tiny_model(atelier_cache, TINY_SDXL_NAME)
    tokenizers = [CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()]  # fmt: skip
    return tokenizers, encoders


def stitched_ids(chunks: torch.Tensor) -> torch.Tensor:
    """[batch, n, 77] chunk ids -> [batch, n*75+2] in the stitched states' layout."""
    inner = [chunks[:, k, 1:-1] for k in range(chunks.shape[1])]
    return torch.cat([chunks[:, 0, :1], *inner, chunks[:, -1, -1:]], dim=1)


@pytest.mark.parametrize("max_token_length", [75, 150])
def test_plain_captions_tokenize_as_without_weights(text_model, sdxl_text, max_token_length: int) -> None:
    captions = ["a red dog", LONG, "", "time: 3pm, x"]
    # SD1's tokenizer pads with EOS; SDXL's second pads with "!" (chunks closed differently).
    for tokenizer in (text_model[0], sdxl_text[0][1]):
        ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
        assert torch.equal(ids, tokenize_long(tokenizer, captions, max_token_length))
        assert weights.shape == (len(captions), max_token_length + 2) and bool((weights == 1).all())


@torch.no_grad()
def test_a_caption_without_brackets_encodes_bit_for_bit_as_without_the_option(text_model) -> None:
    tokenizer, encoder = text_model
    captions = ["a red dog", LONG]
    for max_token_length in (75, 150):
        plain = CaptionEncoder(tokenizer, encoder, max_token_length=max_token_length, clip_skip=2)(captions)
        weighted = CaptionEncoder(tokenizer, encoder, max_token_length=max_token_length, clip_skip=2,
                                  weighted=True)(captions)  # fmt: skip
        assert torch.equal(plain, weighted)
    # In a batch with a weighted caption, the plain one still comes out unchanged.
    mixed = encode_long(tokenizer, encoder, ["a red dog", "a (red:1.5) dog"], weighted=True)
    assert torch.equal(mixed[0], encode_long(tokenizer, encoder, ["a red dog"])[0])


@torch.no_grad()
def test_a_weighted_tokens_states_are_multiplied_by_its_weight_as_sd_scripts_does(text_model) -> None:
    tokenizer, encoder = text_model
    ids, weights = tokenize_weighted(tokenizer, ["a (red:1.5) dog"], 75)
    assert torch.equal(ids, tokenize_long(tokenizer, ["a red dog"], 75))  # the brackets are not text
    red = len(tokenizer("a").input_ids) - 1  # BOS + the tokens of "a "
    red_tokens = len(tokenizer("red").input_ids) - 2
    assert weights[0, red : red + red_tokens].tolist() == [1.5] * red_tokens
    assert float(weights.sum()) == pytest.approx(77 + 0.5 * red_tokens)

    plain = encode_long(tokenizer, encoder, ["a red dog"])
    weighted = encode_long(tokenizer, encoder, ["a (red:1.5) dog"], weighted=True)
    # sd-scripts' train_network.py: x * w, nothing restored afterwards.
    torch.testing.assert_close(weighted[0, red], plain[0, red] * 1.5)
    torch.testing.assert_close(weighted[0, :red], plain[0, :red])
    torch.testing.assert_close(weighted[0, red + red_tokens :], plain[0, red + red_tokens :])


def test_apply_token_weights_multiplies_each_token_in_the_states_dtype() -> None:
    hidden = torch.randn(2, 5, 4, dtype=torch.float16) + 1
    weights = torch.tensor([[1, 2, 1, 1, 1], [1, 1, 1, 0.5, 1]])
    out = apply_token_weights(hidden, weights)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, hidden * weights.half()[..., None])
    assert apply_token_weights(hidden, torch.ones(2, 5)) is hidden  # all 1: untouched


@torch.no_grad()
def test_a_long_caption_keeps_its_weights_in_later_chunks(text_model) -> None:
    tokenizer, encoder = text_model
    caption = LONG + ", (zebra:1.5), [apple]"
    assert 75 < len(tokenizer(caption).input_ids) - 2 < 150
    ids, weights = tokenize_weighted(tokenizer, [caption], 150)
    assert ids.shape == (1, 2, 77) and weights.shape == (1, 152)
    flat = stitched_ids(ids)[0]
    zebra = tokenizer("zebra").input_ids[1:-1]
    apple = tokenizer("apple").input_ids[1:-1]
    heavy = (weights[0] == 1.5).nonzero().flatten().tolist()
    light = (weights[0] < 1).nonzero().flatten().tolist()
    assert heavy and min(heavy) > 76 and flat[heavy].tolist() == zebra  # in chunk 2, on zebra's tokens
    assert light and flat[light].tolist() == apple and weights[0, light[0]] == pytest.approx(1 / 1.1)

    plain_ids = tokenize_long(tokenizer, [LONG + ", zebra, apple"], 150)
    assert torch.equal(ids, plain_ids)
    weighted = encode_long(tokenizer, encoder, [caption], 150, weighted=True)
    torch.testing.assert_close(weighted, apply_token_weights(encode_long(tokenizer, encoder, [LONG + ", zebra, apple"],
                                                                         150), weights))  # fmt: skip
    # Truncated at 75 tokens, the weighted tokens are cut off with the rest: nothing is weighted.
    _, short_weights = tokenize_weighted(tokenizer, [caption], 75)
    assert bool((short_weights == 1).all())


@torch.no_grad()
def test_the_text_encoder_cache_holds_weighted_states(text_model) -> None:
    tokenizer, encoder = text_model
    captions = ["a (red:1.5) dog", "plain dog"]
    cached = CaptionEncoder(tokenizer, encoder, cache=True, weighted=True)
    assert cached.fill(captions) == 2
    torch.testing.assert_close(cached(captions), encode_long(tokenizer, encoder, captions, weighted=True))
    assert not torch.allclose(cached(captions)[0], encode_long(tokenizer, encoder, captions[:1])[0])


@torch.no_grad()
def test_sdxl_weights_both_encoders_states_and_not_the_pooled_output(sdxl_text) -> None:
    from atelier.conditioning.sdxl import SDXLCaptionEncoder

    tokenizers, encoders = sdxl_text
    plain = SDXLCaptionEncoder(tokenizers, encoders, max_token_length=150)
    weighted = SDXLCaptionEncoder(tokenizers, encoders, max_token_length=150, weighted=True)
    same = ["a red dog", LONG]
    a, b = plain(same), weighted(same)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)

    a, b = plain(["a red dog"]), weighted(["a (red:1.5) dog"])
    assert torch.equal(a.pooled, b.pooled)  # sd-scripts weights the hidden states only
    assert not torch.allclose(a.hidden, b.hidden)
    width = encoders[0].config.hidden_size
    weighted_tokens = (b.hidden != a.hidden).any(dim=-1)[0]
    assert weighted_tokens.any() and not weighted_tokens.all()  # only "red"'s tokens, in both encoders' halves
    red = weighted_tokens.nonzero()[:, 0]
    torch.testing.assert_close(b.hidden[0, red, :width], a.hidden[0, red, :width] * 1.5)
    torch.testing.assert_close(b.hidden[0, red, width:], a.hidden[0, red, width:] * 1.5)


# --- config and training ----------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("caption_separator", "'('"), ("keep_tokens_separator", "'[['"),
                                        ("secondary_separator", "'\\\\'")])  # fmt: skip
def test_a_separator_made_of_weight_syntax_is_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(DatasetError, match=f"dataset.{key}=.*dataset.weighted_captions=false"):
        make_cfg("dataset.weighted_captions=true", f"dataset.{key}={value}")
    make_cfg(f"dataset.{key}={value}")  # fine without weighted captions


def test_weighted_captions_train_sd1_with_the_cache(tmp_path) -> None:
    from atelier.loop.trainer import Trainer

    root = captioned(tmp_path, ["sks (cube:1.3), [red]", "sks ((orb)), blue"])
    cfg = make_cfg(f"dataset.train_data_dir={root}", "dataset.weighted_captions=true", "network.train_unet_only=true",
                   "training.max_train_steps=3", NO_SAMPLES)  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    result = trainer.train()
    assert result.steps == 3 and trainer.captions.caching and trainer.captions.weighted
    with torch.no_grad():
        plain = CaptionEncoder(trainer.base.tokenizer, trainer.base.text_encoder)(["sks (cube:1.3), [red]"])
        cached = trainer.captions(["sks (cube:1.3), [red]"])
    assert not torch.allclose(cached, plain)  # the cache holds the weighted states
    _, meta = load_lora(result.output_file)
    assert not any("weighted" in key for key in meta)  # sd-scripts' train_network.py writes no key for it


def test_shuffled_weighted_captions_train_and_warn_of_split_brackets(tmp_path, caplog) -> None:
    root = captioned(tmp_path, ["sks, (red, blue:1.2), cube", "sks, (orb:0.8)"])
    with caplog.at_level(logging.WARNING):
        _, summary = train(tmp_path, f"dataset.train_data_dir={root}", "dataset.weighted_captions=true",
                           "dataset.shuffle_caption=true", "network.train_unet_only=true",
                           "training.max_train_steps=2", NO_SAMPLES)  # fmt: skip
    assert summary["status"] == "completed"
    warned = [r.getMessage() for r in caplog.records if "dataset.weighted_captions" in r.getMessage()]
    assert len(warned) == 1 and "(red, blue:1.2)" in warned[0] and "shuffle_caption" in warned[0]


def test_weighted_captions_train_sdxl(tmp_path) -> None:
    root = captioned(tmp_path, ["sks (cube:1.3), red", "sks [orb]"])
    _, summary = train(tmp_path, "model=tiny_sdxl", f"dataset.train_data_dir={root}", "dataset.weighted_captions=true",
                       "dataset.max_token_length=150", "training.max_train_steps=2", NO_SAMPLES)  # fmt: skip
    assert summary["status"] == "completed"
