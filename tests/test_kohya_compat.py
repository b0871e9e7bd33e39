"""The saved LoRA is what A1111/ComfyUI/diffusers expect: diffusers reproduces training output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from atelier.loop.trainer import Trainer
from atelier.models.architectures import SD1_PIPELINE_SCHEDULER
from atelier.sampling.generate import build_pipeline
from atelier.sampling.samplers import make_scheduler
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)

PROMPT = "atelier cube, red"


def render(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        return pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=generator, output_type="np").images[0]


@pytest.mark.parametrize("extra", [[], ["network.train_unet_only=true"]])
def test_diffusers_load_lora_weights_reproduces_trained_model(tmp_path, tiny_model_path, extra):
    cfg = make_cfg("training.max_train_steps=6", "optimizer.learning_rate=5e-3", "network.alpha=2", *extra)
    trainer = Trainer(cfg, tmp_path)
    result = trainer.train()
    base = trainer.base
    trained = render(build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, SD1_PIPELINE_SCHEDULER))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", SD1_PIPELINE_SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    untouched = render(pipe)
    pipe.load_lora_weights(str(result.output_file))
    with_lora = render(pipe)

    assert np.abs(with_lora - trained).max() < 1e-4
    assert np.abs(with_lora - untouched).max() > 1e-2
