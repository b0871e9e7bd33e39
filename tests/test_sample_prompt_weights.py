"""Sample prompts read A1111 weights as sd-scripts' sampler does (atelier.sampling.prompt_text).

The expected conditioning is computed here from the tokenizer and the text encoder directly (SD1)
or from diffusers' own encode_prompt (SDXL), not through Atelier's weighting code: SD1/2 multiply
each token's states by its weight and keep the prompt's mean (sd-scripts' lpw_stable_diffusion),
SDXL multiplies both encoders' states and leaves the pooled output alone (sd-scripts'
SdxlTextEncodingStrategy.encode_tokens_with_weights). A prompt without brackets renders bit for
bit as diffusers renders its text (the path every sample took before weights were read).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atelier.conditioning.text_chunks import apply_token_weights
from atelier.config.sample_prompts import SampleDefaults, parse_prompts
from atelier.sampling.generate import build_pipeline, build_sdxl_pipeline, generate_samples, render_prompt
from atelier.sampling.prompt_text import text_arguments
from tests.test_sampling import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return build_pipeline(
        UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet").eval(),
        AutoencoderKL.from_pretrained(tiny_model_path, subfolder="vae").eval(),
        CLIPTextModel.from_pretrained(tiny_model_path, subfolder="text_encoder").eval(),
        CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer"),
        json.loads((tiny_model_path / "scheduler" / "scheduler_config.json").read_text()),
    )


@pytest.fixture(scope="module")
def biased_sd_pipe(sd_pipe):
    """sd_pipe whose text encoder's final norm has a bias, as real CLIP's has: the tiny one's
    states average ~1e-8, where keeping the mean divides rounding noise by rounding noise."""
    pipe = copy.copy(sd_pipe)
    encoder = copy.deepcopy(sd_pipe.text_encoder)
    with torch.no_grad():
        encoder.final_layer_norm.bias.fill_(0.25)
    pipe.text_encoder = encoder
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(atelier_cache: Path):
    from diffusers import StableDiffusionXLPipeline

    from atelier.models.architectures import SDXL_PIPELINE_SCHEDULER
    from atelier.models.tiny import TINY_SDXL_NAME, ensure_tiny_model

    loaded = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model(atelier_cache, TINY_SDXL_NAME))
    for module in (loaded.unet, loaded.vae, loaded.text_encoder, loaded.text_encoder_2):
        module.eval()
    return build_sdxl_pipeline(loaded.unet, loaded.vae, [loaded.text_encoder, loaded.text_encoder_2],
                               [loaded.tokenizer, loaded.tokenizer_2], SDXL_PIPELINE_SCHEDULER)  # fmt: skip


def prompt(line: str):
    [parsed] = parse_prompts(line, SampleDefaults(width=64, height=64, steps=2, cfg_scale=5.0))
    return parsed


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def token_span(tokenizer, before: str, word: str) -> slice:
    """Where `word`'s tokens sit in the 77 states of `before + word + ...` (BOS first)."""
    start = len(tokenizer(before).input_ids) - 1  # BOS and the tokens of `before`
    return slice(start, start + len(tokenizer(word).input_ids) - 2)


def clip_states(pipe, text: str, clip_skip: int = 1) -> torch.Tensor:
    """The states diffusers' SD pipeline conditions on (clip_skip > 1: sd-scripts' layer, normed)."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids  # fmt: skip
    out = pipe.text_encoder(ids, output_hidden_states=True)
    if clip_skip <= 1:
        return out[0]
    return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(out.hidden_states[-clip_skip])


def weighted_keeping_mean(states: torch.Tensor, span: slice, weight: float) -> torch.Tensor:
    """sd-scripts' get_weighted_text_embeddings, written out: x * w, then x * (mean before / mean after)."""
    weights = torch.ones(states.shape[1])
    weights[span] = weight
    weighted = states * weights[None, :, None]
    return weighted * (states.mean() / weighted.mean())


# --- SD1/2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, weight",
    [("a (red) dog", 1.1), ("a [red] dog", 1 / 1.1), ("a (red:1.5) dog", 1.5), ("a ((red)) dog", 1.21),
     ("a ([red]:1.5) dog", 1.5 / 1.1)],
)  # fmt: skip
@torch.no_grad()
def test_sd_weighted_prompt_scales_its_tokens_and_keeps_the_mean(biased_sd_pipe, text: str, weight: float) -> None:
    pipe = biased_sd_pipe
    red = token_span(pipe.tokenizer, "a ", "red")
    assert pipe.tokenizer("a red dog").input_ids[red] == pipe.tokenizer("red").input_ids[1:-1]
    args = text_arguments(pipe, text, "")
    assert "prompt" not in args and args["negative_prompt"] is None  # the plain negative stays text
    plain = clip_states(pipe, "a red dog")
    expected = weighted_keeping_mean(plain, red, weight)
    torch.testing.assert_close(args["prompt_embeds"], expected)
    assert float(args["prompt_embeds"].mean()) == pytest.approx(float(plain.mean()), rel=1e-5)
    # The weighted tokens stand out from the rest by exactly their weight.
    ratio = args["prompt_embeds"][0] / plain[0]
    torch.testing.assert_close(ratio[red] / ratio[0], torch.full_like(ratio[red], weight))


@torch.no_grad()
def test_sd_negative_prompt_and_clip_skip_read_weights_too(biased_sd_pipe) -> None:
    pipe = biased_sd_pipe
    args = text_arguments(pipe, "a dog", "a (blurry:1.4) photo")
    assert args["prompt"] == "a dog" and "negative_prompt" not in args
    blurry = token_span(pipe.tokenizer, "a ", "blurry")
    torch.testing.assert_close(args["negative_prompt_embeds"],
                               weighted_keeping_mean(clip_states(pipe, "a blurry photo"), blurry, 1.4))  # fmt: skip

    skipped = text_arguments(pipe, "a (red:1.5) dog", "", clip_skip=2)
    plain = clip_states(pipe, "a red dog", clip_skip=2)
    red = token_span(pipe.tokenizer, "a ", "red")
    torch.testing.assert_close(skipped["prompt_embeds"], weighted_keeping_mean(plain, red, 1.5))
    assert torch.equal(skipped["negative_prompt_embeds"], clip_states(pipe, "", clip_skip=2))


@torch.no_grad()
def test_sd_escaped_brackets_are_literal_text_at_weight_1(sd_pipe) -> None:
    args = text_arguments(sd_pipe, "a \\(red\\) \\[dog\\] \\\\ ", "")
    literal = "a (red) [dog] \\ "
    assert sd_pipe.tokenizer(literal).input_ids != sd_pipe.tokenizer("a red dog").input_ids
    assert torch.equal(args["prompt_embeds"], clip_states(sd_pipe, literal))
    assert not torch.allclose(args["prompt_embeds"], text_arguments(sd_pipe, "a (red) [dog]", "")["prompt_embeds"])


@pytest.mark.parametrize("clip_skip", [None, 2])
@torch.no_grad()
def test_sd_plain_prompt_renders_bit_for_bit_as_before(sd_pipe, clip_skip: int | None) -> None:
    sample = prompt("a red dog: yes --n blurry --d 5")
    if clip_skip is None:
        assert text_arguments(sd_pipe, sample.prompt, sample.negative_prompt) == {
            "prompt": "a red dog: yes", "negative_prompt": "blurry"}  # fmt: skip
        before = {"prompt": sample.prompt, "negative_prompt": sample.negative_prompt}
    else:  # what sampling with clip_skip passed before weights were read
        before = {"prompt_embeds": clip_states(sd_pipe, sample.prompt, clip_skip),
                  "negative_prompt_embeds": clip_states(sd_pipe, sample.negative_prompt, clip_skip)}  # fmt: skip
    expected = sd_pipe(**before, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
                       generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    assert np.array_equal(pixels(render_prompt(sd_pipe, sample, clip_skip=clip_skip)), pixels(expected))


def test_sd_weighted_sample_differs_and_keeps_its_text(sd_pipe, tmp_path: Path) -> None:
    from PIL import Image

    prompts = parse_prompts("a red dog --d 3\na (red:1.8) dog --d 3\na red dog --n (blurry) --d 3",
                            SampleDefaults(width=64, height=64, steps=2))  # fmt: skip
    paths = generate_samples(sd_pipe, prompts, tmp_path, "r", 1, 1, "cpu")
    images = [pixels(Image.open(path)) for path in paths]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    with Image.open(paths[1]) as image:
        assert image.info["parameters"].startswith("a (red:1.8) dog")  # as written, A1111 style


# --- SDXL -------------------------------------------------------------------------------------


@torch.no_grad()
def test_sdxl_weighted_prompt_multiplies_both_encoders_and_not_the_pooled_output(sdxl_pipe) -> None:
    pipe = sdxl_pipe
    args = text_arguments(pipe, "a (red:1.5) dog", "[blurry]")
    assert "prompt" not in args and "negative_prompt" not in args
    hidden, _, pooled, _ = pipe.encode_prompt("a red dog", do_classifier_free_guidance=False)
    width = pipe.text_encoder.config.hidden_size
    expected = hidden.clone()
    expected[0, token_span(pipe.tokenizer, "a ", "red"), :width] *= 1.5
    expected[0, token_span(pipe.tokenizer_2, "a ", "red"), width:] *= 1.5
    assert not torch.allclose(expected, hidden)
    torch.testing.assert_close(args["prompt_embeds"], expected)
    assert torch.equal(args["pooled_prompt_embeds"], pooled)  # sd-scripts weights the states only

    neg_hidden, _, neg_pooled, _ = pipe.encode_prompt("blurry", do_classifier_free_guidance=False)
    expected = neg_hidden.clone()
    expected[0, token_span(pipe.tokenizer, "", "blurry"), :width] /= 1.1
    expected[0, token_span(pipe.tokenizer_2, "", "blurry"), width:] /= 1.1
    torch.testing.assert_close(args["negative_prompt_embeds"], expected)
    assert torch.equal(args["negative_pooled_prompt_embeds"], neg_pooled)


@torch.no_grad()
def test_sdxl_plain_prompt_renders_bit_for_bit_and_empty_negative_stays_zeros(sdxl_pipe) -> None:
    sample = prompt("a red dog --d 7")
    assert text_arguments(sdxl_pipe, sample.prompt, "") == {"prompt": "a red dog", "negative_prompt": None}
    expected = sdxl_pipe(prompt=sample.prompt, negative_prompt=None, height=64, width=64, num_inference_steps=2,
                         guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    assert np.array_equal(pixels(render_prompt(sdxl_pipe, sample)), pixels(expected))
    # Weighted, its empty negative still gets diffusers' zeros (force_zeros_for_empty_prompt), as before.
    assert text_arguments(sdxl_pipe, "a (red) dog", "")["negative_prompt"] is None
    weighted = render_prompt(sdxl_pipe, prompt("a (red:1.8) dog --d 7"))
    assert not np.array_equal(pixels(weighted), pixels(expected))


# --- the weighting itself ---------------------------------------------------------------------


def test_keep_mean_restores_each_prompts_mean_and_leaves_zero_means_alone() -> None:
    hidden = torch.randn(2, 5, 4) + 1
    weights = torch.tensor([[1, 2, 1, 1, 1], [1, 1, 1, 0.5, 1]])
    kept = apply_token_weights(hidden, weights, keep_mean=True)
    torch.testing.assert_close(kept.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)))
    factor = kept / (hidden * weights[..., None])  # one rescaling factor per prompt
    torch.testing.assert_close(factor, factor[:, :1, :1].expand_as(factor))
    assert apply_token_weights(hidden, torch.ones(2, 5), keep_mean=True) is hidden
    centred = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    torch.testing.assert_close(apply_token_weights(centred, torch.tensor([[1.0, 3.0]]), keep_mean=True),
                               centred * torch.tensor([1.0, 3.0])[None, :, None])  # fmt: skip
