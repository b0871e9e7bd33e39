"""SD2 768-v and SDXL on their tiny built-in models: training, kohya files, diffusers reload."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from atelier.loop.trainer import Trainer
from atelier.models.architectures import SD2_V_PIPELINE_SCHEDULER
from atelier.models.tiny import TINY_SD2_V_NAME, ensure_tiny_model
from atelier.network.lora_file import load_lora
from atelier.sampling.generate import build_pipeline
from atelier.sampling.samplers import make_scheduler
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)

PROMPT = "atelier cube, red"


def render(pipe) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        return pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=generator, output_type="np").images[0]


def test_tiny_sd2_v_trains_v_prediction_and_reloads_in_diffusers(tmp_path, atelier_cache):
    cfg = make_cfg("model=tiny_sd2_v", "training.max_train_steps=6", "optimizer.learning_rate=5e-3", "network.alpha=2")
    trainer = Trainer(cfg, tmp_path)
    result = trainer.train()
    base = trainer.base
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    assert base.unet.config.use_linear_projection and base.text_encoder.config.hidden_act == "gelu"
    assert base.tokenizer.pad_token == "!"

    state, meta = load_lora(result.output_file)
    assert meta["ss_v2"] == "True" and meta["ss_v_parameterization"] == "True"
    # What sd-scripts writes for SD2 v-prediction (model_util.get_model_version_str_for_sd1_sd2).
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    # Linear proj_in: a 2-D LoRA (SD1's 1x1 conv gives 4-D ones).
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert state[proj_in].ndim == 2

    trained = render(build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, SD2_V_PIPELINE_SCHEDULER))
    folder = ensure_tiny_model(atelier_cache, TINY_SD2_V_NAME)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler = make_scheduler("ddim", SD2_V_PIPELINE_SCHEDULER)
    assert_reload_reproduces(pipe, result.output_file, trained)


def assert_reload_reproduces(pipe, lora_file, trained: np.ndarray) -> None:
    """diffusers' load_lora_weights of the kohya file gives the in-training model's image."""
    pipe.set_progress_bar_config(disable=True)
    untouched = render(pipe)
    pipe.load_lora_weights(str(lora_file))
    with_lora = render(pipe)
    assert np.abs(with_lora - trained).max() < 1e-4
    assert np.abs(with_lora - untouched).max() > 1e-2


# --- SDXL -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, atelier_cache):
    """One short tiny-SDXL run (UNet with its convs, both text encoders), shared by the SDXL tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_dir = tmp_path_factory.mktemp("sdxl")
    cfg = make_cfg(
        "model=tiny_sdxl", "training.max_train_steps=6", "optimizer.learning_rate=5e-3", "network.alpha=2",
        "network.conv_dim=4", "network.conv_alpha=2", "sampling.sample_every_n_epochs=1",
    )  # fmt: skip
    trainer = Trainer(cfg, run_dir)
    result = trainer.train()
    return trainer, result


def test_sdxl_lora_has_kohya_sdxl_names_and_metadata(sdxl_run):
    trainer, result = sdxl_run
    state, meta = load_lora(result.output_file)
    modules = {key.split(".")[0] for key in state}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules
    # The UNet in SDXL's LDM layout, as sd-scripts writes it (layers_per_block 2).
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_0_proj",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_0_1_proj_in",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
        # conv_dim: resnets, downsamplers, upsamplers in LDM names too.
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_middle_block_2_emb_layers_1",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_8_0_out_layers_3",
    ):
        assert name in modules
    assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
    assert not any(m.startswith("lora_te_") for m in modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # Both text encoders' LoRAs were trained (text encoder 2's last layer feeds the pooled output).
    assert state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].abs().sum() > 0
    assert state["lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"].abs().sum() > 0
    # Sampling works for SDXL.
    assert list((result.output_file.parent / "samples").glob("*.png"))


def test_sdxl_reload_in_diffusers_reproduces_training_output(sdxl_run, atelier_cache):
    from diffusers import StableDiffusionXLPipeline

    from atelier.models.architectures import SDXL_PIPELINE_SCHEDULER
    from atelier.models.tiny import TINY_SDXL_NAME
    from atelier.sampling.generate import build_sdxl_pipeline

    trainer, result = sdxl_run
    base = trainer.base
    trained = render(build_sdxl_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, SDXL_PIPELINE_SCHEDULER))
    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model(atelier_cache, TINY_SDXL_NAME))
    pipe.scheduler = make_scheduler("ddim", SDXL_PIPELINE_SCHEDULER)
    assert_reload_reproduces(pipe, result.output_file, trained)
    # Every module of the file found its layer (none was dropped by a name diffusers did not map).
    trained_parts = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for part, prefix in trained_parts.items():
        injected = sum(1 for name, _ in getattr(pipe, part).named_modules() if name.endswith("lora_A"))
        assert injected == sum(1 for name in trainer.network.loras if name.startswith(prefix)), part


def test_sdxl_text_conditioning_matches_diffusers_encode_prompt(sdxl_run):
    from atelier.sampling.generate import build_sdxl_pipeline

    trainer, _ = sdxl_run
    base = trainer.base
    pipe = build_sdxl_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, {})
    captions = [PROMPT, "an orb"]
    with torch.no_grad():
        text = trainer.captions(captions)
        hidden, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert text.hidden.shape[-1] == 32 + 48 == base.unet.config.cross_attention_dim
    torch.testing.assert_close(text.hidden, hidden)
    torch.testing.assert_close(text.pooled, pooled)


def test_sdxl_size_and_crop_conditioning_as_sd_scripts():
    from atelier.conditioning.sdxl import time_ids

    # original (h, w), crop (top, left), target (h, w)
    assert time_ids((64, 64), (64, 64)) == [64, 64, 0, 0, 64, 64]
    # A wide image in a square bucket: fitted inside it, it sits 16 px down.
    assert time_ids((64, 64), (200, 100)) == [100, 200, 16, 0, 64, 64]
    assert time_ids((64, 64), (100, 200)) == [200, 100, 0, 16, 64, 64]
    # Not centred to the pixel: flipping mirrors the left offset (2 -> 3).
    assert time_ids((48, 64), (60, 90)) == [90, 60, 0, 2, 64, 48]
    assert time_ids((48, 64), (60, 90), flipped=True) == [90, 60, 0, 3, 64, 48]


def test_sdxl_batches_carry_each_images_size_and_bucket(sdxl_run):
    from atelier.conditioning.training_data import batch_time_ids

    trainer, _ = sdxl_run
    data = trainer.data
    batch = data.epoch(1)[0]
    ids = batch_time_ids(data, batch)
    assert ids.shape == (len(batch), 6)
    for row, index in zip(ids.tolist(), batch.indices):
        width, height = data.assignments[index].image_size
        assert row[:2] == [height, width] and row[4:] == [64, 64]


def test_sdxl_unet_only_with_cached_long_captions_checkpointing_flips_and_validation(tmp_path):
    from atelier.conditioning.sdxl import SDXLCaptionEncoder

    cfg = make_cfg(
        "model=tiny_sdxl", "training.max_train_steps=3", "network.train_unet_only=true",
        "dataset.max_token_length=150", "training.gradient_checkpointing=true", "dataset.flip_aug=true",
        "dataset.validation_split=0.2",
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    result = trainer.train()
    assert result.steps == 3 and trainer.captions.caching
    # The validation loss conditions on each held-out image's size and bucket too.
    assert len(result.validation_losses) == 1 and np.isfinite(result.validation_loss)
    assert all(chunk.time_ids[:, 4:].eq(64).all() for chunk in trainer.validator.chunks)
    state, _ = load_lora(result.output_file)
    assert all(k.startswith("lora_unet_") for k in state)
    base = trainer.base
    captions = ["a " * 120, "short"]
    plain = SDXLCaptionEncoder(base.tokenizers, base.text_encoders, max_token_length=150)
    with torch.no_grad():
        text, cached = plain(captions), trainer.captions(captions)
    assert text.hidden.shape == (2, 152, 80) and text.pooled.shape == (2, 40)
    torch.testing.assert_close(cached.hidden, text.hidden)
    torch.testing.assert_close(cached.pooled, text.pooled)


def test_sdxl_lora_file_continues_as_network_weights(sdxl_run):
    from atelier.network.factory import build_network

    trainer, result = sdxl_run
    state, _ = load_lora(result.output_file)
    net_cfg = dataclasses.replace(trainer.cfg.network, weights=str(result.output_file))
    network = build_network(net_cfg, trainer.base.unet, trainer.base.text_encoders)
    again = network.kohya_state_dict()
    assert set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) for k in state)


@pytest.mark.parametrize("name", [TINY_SD2_V_NAME, "tiny-sdxl"])
def test_tiny_builtins_build_deterministically_beside_each_other(tmp_path, atelier_cache, name):
    import hashlib

    def hashes(folder):
        return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.safetensors")}

    cached = ensure_tiny_model(atelier_cache, name)
    rebuilt = ensure_tiny_model(tmp_path, name)
    assert rebuilt != cached and hashes(rebuilt) == hashes(cached)
    assert cached.name != ensure_tiny_model(atelier_cache).name  # its own folder beside tiny-sd15
