"""FLUX.1 samples during training (atelier.sampling.flux_samples, atelier.loop.samples), on tiny-flux.

sd-scripts' FLUX sampler (library/flux_train_utils.py sample_image_inference, denoise,
get_schedule) is the reference: sizes in multiples of 16, --g the distilled guidance (3.5),
CFG only when --l != 1.0, one sampler (Euler), the shifted schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from atelier.config.sample_prompts import SampleDefaults, SamplePrompt, parse_prompts
from atelier.config.schema import TrainingConfig
from atelier.models.loading import BaseModel
from atelier.plugins import FluxPlugin, plugin_of
from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

SHORT_T5 = 32  # T5 tokens the tests encode (the run's default is 512): same code, less time


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()  # tiny tensors: threads only oversubscribe the 2 cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_flux_path(atelier_cache: Path) -> Path:
    return ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)


def flux_base(path: Path) -> BaseModel:
    """The BaseModel the FLUX loader gives: the transformer as `unet`, CLIP-L and T5."""
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(path)
    for module in (p.transformer, p.vae, p.text_encoder, p.text_encoder_2):
        module.eval()
    return BaseModel(unet=p.transformer, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                     noise_scheduler=p.scheduler, version="flux1", v_parameterization=False, name="tiny-flux",
                     path=str(path), text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2)  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_flux_path: Path) -> BaseModel:
    return flux_base(tiny_flux_path)


def make_pipeline(base: BaseModel, **options):
    from atelier.sampling.flux_samples import build_flux_pipeline

    options = {"t5_max_length": SHORT_T5, **options}
    return build_flux_pipeline(base.unet, base.vae, base.text_encoders, base.tokenizers, **options)


def prompts(text: str) -> list[SamplePrompt]:
    return parse_prompts(text, SampleDefaults(width=64, height=64, steps=2, cfg_scale=1.0))


def render(pipeline, line: str, tmp_path: Path, name: str = "s") -> torch.Tensor:
    from atelier.sampling.generate import generate_samples

    [path] = generate_samples(pipeline, prompts(line), tmp_path / name, "run", 1, 1, "cpu")
    with Image.open(path) as image:
        return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)


def run_config(lines: list[str], **sampling) -> SimpleNamespace:
    """The parts of an AtelierConfig SampleWriter reads, with the schema's sampling defaults."""
    values = {"prompts": lines, "prompt_file": None, "limit": None, "width": 64, "height": 64, "steps": 2,
              "cfg_scale": None, "seed": 1234, "sampler": "ddim", **sampling}  # fmt: skip
    return SimpleNamespace(sampling=SimpleNamespace(**values), output=SimpleNamespace(output_name="run"),
                           training=TrainingConfig(), model=SimpleNamespace())  # fmt: skip


def sd_scripts_schedule(steps: int, image_seq_len: int) -> list[float]:
    """sd-scripts' get_schedule(steps, image_seq_len, shift=True), written out from its formula."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    ts = [1 - i / steps for i in range(steps + 1)]
    return [0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


NAME = re.compile(r"^run_e000002_(\d\d)_\d{14}_(\d+)\.png$")


def test_sample_writer_writes_flux_samples_with_sd_scripts_names_records_and_grid(base, tmp_path, caplog):
    from atelier.loop.samples import SampleWriter
    from atelier.sampling.flux_samples import FluxSamplePipeline
    from atelier.sampling.manifest import read_manifest

    lines = ["a red cube --w 88 --h 64 --d 7 --g 2.5", "a blue ball --n green --l 3 --d 8 --h 80"]
    dataset = SimpleNamespace(folders=[])
    with caplog.at_level(logging.WARNING):
        writer = SampleWriter(run_config(lines), base, dataset, tmp_path, torch.device("cpu"), contextlib.nullcontext)
    assert isinstance(writer.plugin, FluxPlugin)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("SD models have none" in m for m in messages)  # --g is FLUX's: no SD warning
    assert any("multiples of 16" in m and "1" in m for m in messages)  # 88 px (a multiple of 8) -> 80
    paths = writer.generate(epoch=2, step=10)
    pipeline = writer._get_pipeline()
    assert isinstance(pipeline, FluxSamplePipeline)
    assert (pipeline.transformer, pipeline.text_encoder_2, pipeline.vae) == (base.unet, base.text_encoder_2, base.vae)
    assert (pipeline.t5_max_length, pipeline.apply_t5_attn_mask) == (512, False)  # dev's default, no mask

    sizes = [(80, 64), (64, 80)]
    for path, (index, seed), size in zip(paths, [(0, 7), (1, 8)], sizes):
        match = NAME.match(path.name)
        assert match and (int(match[1]), int(match[2])) == (index, seed), path.name
        with Image.open(path) as image:
            assert image.size == size
            assert "Sampler: euler" in image.info["parameters"]
    first, second = read_manifest(tmp_path / "samples")
    assert [first["file"], second["file"]] == [p.name for p in paths]
    # No --l: sd-scripts' FLUX scale 1.0 (no CFG) instead of the SD default 7.0; no --g: 3.5.
    assert {k: first[k] for k in ("width", "height", "cfg_scale", "guidance", "sampler", "seed", "epoch", "step")} == {
        "width": 80, "height": 64, "cfg_scale": 1.0, "guidance": 2.5, "sampler": "euler", "seed": 7, "epoch": 2,
        "step": 10}  # fmt: skip
    assert (second["cfg_scale"], second["guidance"], second["negative_prompt"]) == (3.0, 3.5, "green")
    assert writer.write_grid() == tmp_path / "sample_grid.png" and writer.grid_path.is_file()


def test_same_seed_same_image_another_seed_another(base, tmp_path):
    pipeline = make_pipeline(base)
    first = render(pipeline, "a cat --d 5", tmp_path, "a")
    assert torch.equal(first, render(pipeline, "a cat --d 5", tmp_path, "b"))
    assert (first - render(pipeline, "a cat --d 6", tmp_path, "c")).abs().mean() > 1


def test_distilled_guidance_and_cfg_change_the_image(base, tmp_path):
    pipeline = make_pipeline(base)
    plain = render(pipeline, "a cat --d 5", tmp_path, "a")  # --g 3.5, no CFG
    assert torch.equal(plain, render(pipeline, "a cat --d 5 --g 3.5 --l 1 --n ignored at scale 1", tmp_path, "b"))
    assert (plain - render(pipeline, "a cat --d 5 --g 9", tmp_path, "c")).abs().mean() > 1
    assert (plain - render(pipeline, "a cat --d 5 --l 4 --n dog", tmp_path, "d")).abs().mean() > 1


def test_a_lora_patched_transformer_changes_the_image(tiny_flux_path, tmp_path):
    from atelier.network.flux_lora import build_flux_network

    base = flux_base(tiny_flux_path)  # its own modules: the LoRA patches them in place
    pipeline = make_pipeline(base)
    before = render(pipeline, "a cat --d 5", tmp_path, "a")
    network = build_flux_network(base.unet, dim=4, alpha=4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    network.apply_to()
    after = render(pipeline, "a cat --d 5", tmp_path, "b")  # the same pipeline: no copy of the modules
    assert (before - after).abs().mean() > 1
    network.restore()
    assert torch.equal(before, render(pipeline, "a cat --d 5", tmp_path, "c"))


def test_the_schedule_is_sd_scripts_get_schedule(base, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from atelier.models.flux_architectures import FLUX1_PIPELINE_SCHEDULER
    from atelier.sampling.flux_samples import set_flux_schedule

    # FLUX.1 at 1024 px: (1024 / 16)^2 = 4096 tokens, mu = 1.15; get_schedule(4, 4096) by hand:
    # e^1.15 / (e^1.15 + 1/t - 1) at t = 0.75, 0.5, 0.25.
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX1_PIPELINE_SCHEDULER)
    sigmas = set_flux_schedule(scheduler, 4, (1024 // 16) ** 2)
    assert sigmas.tolist() == pytest.approx([1.0, 0.904531, 0.759511, 0.512844, 0.0], abs=1e-5)
    for steps, tokens in ((4, 4096), (7, 1024), (3, 64), (20, 8192)):
        assert set_flux_schedule(scheduler, steps, tokens).tolist() == pytest.approx(
            sd_scripts_schedule(steps, tokens), abs=1e-6)  # fmt: skip

    # The pipeline denoises along it: 96x64 px on tiny-flux (a 4x AE) is 12 x 8 tokens of 2x2 patches.
    pipeline = make_pipeline(base)
    render(pipeline, "a cat --w 96 --h 64 --s 5", tmp_path)
    assert pipeline.scheduler.sigmas.tolist() == pytest.approx(sd_scripts_schedule(5, 12 * 8), abs=1e-6)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_another_sampler_or_weights_warn_once_and_euler_renders(base, tmp_path, caplog):
    from atelier.loop.samples import sample_prompts
    from atelier.sampling.manifest import read_manifest

    lines = ["a cat --ss ddim --d 1", "a (dog:1.3) --ss euler_a", "a bird --ss k_euler", "a [fox] --ss ddim"]
    with caplog.at_level(logging.WARNING, logger="atelier.sampling.flux_samples"):
        parsed = sample_prompts(run_config(lines, sampler="dpmsolver++"), SimpleNamespace(folders=[]), plugin_of("flux1"))
    messages = [r.getMessage() for r in caplog.records]
    [config_sampler] = [m for m in messages if "sampling.sampler=dpmsolver++" in m]
    [per_prompt] = [m for m in messages if "--ss" in m]
    assert "sample prompt(s) 1, 2, 4: --ss ddim, euler_a" in per_prompt and "Euler" in per_prompt
    [weights] = [m for m in messages if "A1111 weights" in m]
    assert "prompt(s) 2, 4 " in weights
    assert "Euler" in config_sampler

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sample_prompts(run_config(["a cat"]), SimpleNamespace(folders=[]), plugin_of("flux1"))[0].cfg_scale == 1.0
    assert not caplog.records  # the default sampler (ddim) is no choice: nothing to warn of

    from atelier.sampling.generate import generate_samples

    generate_samples(make_pipeline(base), parsed[:2], tmp_path, "run", None, 3, "cpu")
    assert [r["sampler"] for r in read_manifest(tmp_path)] == ["euler", "euler"]
    assert [r["prompt"] for r in read_manifest(tmp_path)] == ["a cat", "a (dog:1.3)"]  # read as written


def test_t5_attention_mask_hides_the_padding_from_t5_and_the_transformer(base, tmp_path):
    text = "a red cube"
    exact = len(base.tokenizer_2(text).input_ids)  # the tokens and </s>: no padding at this length
    assert exact < SHORT_T5
    masked = render(make_pipeline(base, apply_t5_attn_mask=True), text, tmp_path, "a")
    unpadded = render(make_pipeline(base, apply_t5_attn_mask=True, t5_max_length=exact), text, tmp_path, "b")
    # Padding masked everywhere: as if there were none (up to a rounding of the last bit).
    assert (masked - unpadded).abs().max() <= 1 and (masked - unpadded).abs().mean() < 0.05
    unmasked = render(make_pipeline(base), text, tmp_path, "c")
    assert (masked - unmasked).abs().mean() > 0.3  # tiny-flux's random T5 pads to small changes


def test_sd_prompts_still_warn_that_g_is_unused(caplog):
    from atelier.loop.samples import sample_prompts

    with caplog.at_level(logging.WARNING, logger="atelier.loop.samples"):
        [prompt] = sample_prompts(run_config(["a cat --g 4"]), SimpleNamespace(folders=[]), plugin_of("sd1"))
    assert prompt.cfg_scale == 7.0
    assert any("SD models have none" in r.getMessage() for r in caplog.records)


def test_a_schnell_like_transformer_takes_no_guidance_and_t5_256(base, tmp_path):
    import dataclasses

    from diffusers import FluxTransformer2DModel

    from atelier.models.flux_architectures import tiny_flux_config

    torch.manual_seed(0)
    schnell = FluxTransformer2DModel(**{**tiny_flux_config("transformer"), "guidance_embeds": False}).eval()
    schnell_base = dataclasses.replace(base, unet=schnell)
    pipeline = make_pipeline(schnell_base)
    image = render(pipeline, "a cat --d 5", tmp_path, "a")
    assert torch.equal(image, render(pipeline, "a cat --d 5 --g 9", tmp_path, "b"))  # no guidance embedder
