"""SD2 768-v and SDXL on their tiny built-in models: training, kohya files, diffusers reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from atelier.models.architectures import SD2_V_PIPELINE_SCHEDULER
from atelier.models.tiny import TINY_SD2_V_NAME, ensure_tiny_model
from atelier.outputs.lora_file import load_lora
from atelier.sampling.generate import build_pipeline
from atelier.sampling.samplers import make_scheduler
from atelier.train.trainer import Trainer
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
