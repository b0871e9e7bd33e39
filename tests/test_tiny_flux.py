"""[10] point 3: tiny-flux, the FLUX.1-dev-shaped built-in model (atelier.models.tiny_flux).

Built deterministically and cached like tiny-sd15; an ordinary diffusers FluxPipeline folder
that diffusers loads offline and samples from, with tokenizers that need no download.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from atelier.models import flux_architectures as flux
from atelier.models.tiny import TINY_FLUX_NAME, TINY_MODEL_DIRNAMES, ensure_tiny_model
from atelier.network.flux_names import flux_targets_of, fused_out_features

WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2")


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_flux_path(atelier_cache: Path) -> Path:
    return ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path: Path):
    from diffusers import FluxPipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py: any download attempt fails
    return FluxPipeline.from_pretrained(tiny_flux_path)


def generate(pipeline, seed: int = 0, prompt: str = "a photo of a cat", size: tuple[int, int] = (64, 64), **kwargs):
    kwargs = {"guidance_scale": 3.5, "max_sequence_length": 32, **kwargs}
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(prompt, height=size[0], width=size[1], num_inference_steps=2, generator=generator,
                      output_type="np", **kwargs).images  # fmt: skip
    return images[0]


def test_built_twice_in_two_caches_gives_the_same_bytes(tmp_path, tiny_flux_path):
    rebuilt = ensure_tiny_model(tmp_path, TINY_FLUX_NAME)
    assert tiny_flux_path.name == rebuilt.name == TINY_MODEL_DIRNAMES[TINY_FLUX_NAME] == "tiny-flux-v1"
    hashes = file_hashes(rebuilt)
    for component in WEIGHTED:
        assert f"{component}/model.safetensors" in hashes or f"{component}/diffusion_pytorch_model.safetensors" in hashes
    assert hashes == file_hashes(tiny_flux_path)  # weights, configs and tokenizers alike


def test_a_cache_whose_transformer_lost_its_weights_is_rebuilt(tmp_path, tiny_flux_path):
    built = ensure_tiny_model(tmp_path, TINY_FLUX_NAME)
    for weights in (built / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert ensure_tiny_model(tmp_path, TINY_FLUX_NAME) == built
    assert file_hashes(built) == file_hashes(tiny_flux_path)
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no staging or stale folder left


def test_the_folder_has_flux1_dev_layout_at_tiny_size(tiny_flux_path, pipeline):
    index = json.loads((tiny_flux_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]  # as FLUX.1's folders
    transformer, vae = pipeline.transformer.config, pipeline.vae.config
    assert type(pipeline.transformer).__name__ == "FluxTransformer2DModel"
    assert (transformer.num_layers, transformer.num_single_layers, transformer.guidance_embeds) == (2, 3, True)
    assert transformer.in_channels == 4 * vae.latent_channels == 64  # 16 latent channels packed 2x2
    assert transformer.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipeline.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipeline.text_encoder_2.config.feed_forward_proj == "gated-gelu"
    assert (vae.scaling_factor, vae.shift_factor, vae.use_quant_conv, vae.use_post_quant_conv) == (0.3611, 0.1159, False, False)
    assert pipeline.vae_scale_factor == 4  # 3 levels: a 64 px image is a 16x16 latent, 64 tokens
    assert {k: pipeline.scheduler.config[k] for k in flux.FLUX1_PIPELINE_SCHEDULER} == flux.FLUX1_PIPELINE_SCHEDULER
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert len(pipeline.tokenizer) == pipeline.text_encoder.config.vocab_size
    assert len(pipeline.tokenizer_2) == pipeline.text_encoder_2.config.vocab_size == flux.TINY_T5_VOCAB_SIZE
    parameters = sum(p.numel() for name in WEIGHTED for p in getattr(pipeline, name).parameters())
    assert parameters < 2_000_000  # tiny: built in a moment on CPU


def test_the_pipeline_generates_deterministically_offline(pipeline):
    image = generate(pipeline)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
    np.testing.assert_array_equal(generate(pipeline), image)
    assert not np.array_equal(generate(pipeline, seed=1), image)
    assert generate(pipeline, size=(32, 48)).shape == (32, 48, 3)  # any size divisible by 2 x vae_scale_factor


@pytest.mark.parametrize(
    "change",
    [{"guidance_scale": 1.0}, {"prompt": "a photo of a dog"}, {"prompt_2": "a photo of a dog"}],
    ids=["guidance", "prompt (CLIP and T5)", "prompt_2 (T5 only)"],
)
def test_the_guidance_scale_and_both_text_encoders_reach_the_image(pipeline, change):
    assert not np.allclose(generate(pipeline, **change), generate(pipeline), atol=1e-6)


def test_the_tokenizers_load_offline_and_know_the_text(tiny_flux_path, pipeline):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_flux_path / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_flux_path / "tokenizer_2")
    # Loading rebuilds transformers 5's T5 backend from the vocab: it is the one saved, unchanged.
    saved = json.loads((tiny_flux_path / "tokenizer_2" / "tokenizer.json").read_text())
    assert json.loads(t5.backend_tokenizer.to_str()) == saved
    assert t5.model_max_length == 512 and (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)

    anything = "A café, naïve — “quoted” ΑΩ Жж שלום مرحبا 日本語 😀\tend"
    clip_ids = clip(anything).input_ids
    assert clip.unk_token_id not in clip_ids[1:-1]  # byte-level: every character is known
    known = "A café, naïve — “quoted” ΑΩ Жж שלום مرحبا {tabs}\tand ~`|\\^"
    ids = t5(known).input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert t5.decode(ids, skip_special_tokens=True) == " ".join(known.split())  # whitespace runs become one space
    # Outside its alphabet (CJK, emoji) the tiny T5, like the real T5's vocab, has <unk>.
    assert t5("日本 😀").input_ids == [3, 2, 3, 2, 1]


def test_the_kohya_flux_lora_modules_are_found_on_its_transformer(pipeline):
    targets = flux_targets_of(pipeline.transformer)
    assert len(targets) == 2 * 10 + 3 * 3  # sd-scripts' 10 Linear per double block, 3 per single block
    linear1 = next(t for t in targets if t.name == "lora_unet_single_blocks_0_linear1")
    assert fused_out_features(pipeline.transformer, linear1) == [32, 32, 32, 128]  # q, k, v, MLP (4 x 32)


def test_tiny_flux_given_as_an_sd_model_is_refused_naming_model_flux1(tmp_path):
    from tests.helpers import error_lines, run_train

    result = run_train("model.builtin=tiny-flux", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert any("is a FLUX.1 pipeline (FluxPipeline); train it with model=flux1" in line
               for line in error_lines(result)), result.stderr[-2000:]
