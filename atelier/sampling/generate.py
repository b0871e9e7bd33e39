"""Sample images during training, named and recorded as kohya sd-scripts does.

Each image is saved as ``{output_name}_{e000001|000500}_{NN}_{YYYYmmddHHMMSS}_{seed}.png`` in
the samples folder, and one record per image is appended to ``samples.json`` there (see
`atelier.sampling.manifest`); `atelier.sampling.grid` builds comparison grids from it.
SD1/2 and SDXL render through diffusers' pipelines and the scheduler of each sampler name; FLUX.1
through atelier.sampling.flux_samples (FluxSamplePipeline, sd-scripts' FLUX sampler).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from atelier.sampling.manifest import append_manifest, manifest_record
from atelier.sampling.flux_samples import FluxSamplePipeline
from atelier.sampling.prompt_text import text_arguments
from atelier.config.sample_prompts import SamplePrompt
from atelier.sampling.samplers import make_scheduler, sampler_name
from atelier.utils.atomic import atomic_path

logger = logging.getLogger(__name__)


def build_pipeline(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
    sampler: str = "ddim",
) -> StableDiffusionPipeline:
    """A pipeline around the given (unwrapped, possibly LoRA-patched) modules; nothing is copied or moved."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(sampler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_sdxl_pipeline(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    scheduler_config: Mapping[str, Any],
    sampler: str = "ddim",
) -> StableDiffusionXLPipeline:
    """build_pipeline for SDXL: its two text encoders and tokenizers; nothing is copied or moved."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=make_scheduler(sampler, scheduler_config),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_samples(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[SamplePrompt],
    out_dir: str | Path,
    output_name: str,
    epoch: int | None,
    step: int,
    device: str | torch.device,
    *,
    clip_skip: int | None = None,
    eval_modules: Sequence[torch.nn.Module] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Path]:
    """Render one image per prompt into `out_dir` and append them to its manifest.

    `device` is where the pipeline's modules already are. `clip_skip` follows sd-scripts
    (2 = penultimate CLIP layer). `eval_modules` are switched to eval mode too while
    sampling, e.g. a kohya LoRA network, whose modules are not children of the UNet.
    Train/eval modes and the global RNG state are restored afterwards. `should_stop` is
    asked before each image: when it says yes (a stop signal came), the images not yet
    rendered are skipped, so a stop waits for one image, not for all of them.
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    _check_device(pipeline, device)
    modules = [_denoiser(pipeline), pipeline.vae, pipeline.text_encoder, *eval_modules]
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL's, FLUX's T5
        modules.append(pipeline.text_encoder_2)
    flux = isinstance(pipeline, FluxSamplePipeline)
    paths: list[Path] = []
    # no_grad rather than inference_mode: inference tensors cached by a module (e.g. a LoRA
    # implementation) would break the backward pass of the training that resumes after.
    with torch.no_grad(), _eval_mode(modules), _forked_rng(device):
        for prompt in prompts:
            if should_stop():
                logger.warning("sampling stopped after %d of %d image(s): a stop was asked", len(paths), len(prompts))
                break
            if flux:  # FLUX: its size grid, its guidance, its one sampler (atelier.sampling.flux_samples)
                prompt = pipeline.resolve(prompt)
                image = pipeline.render(prompt)
            else:
                image = render_prompt(pipeline, prompt, clip_skip=clip_skip)
            path = out_dir / sample_file_name(output_name, epoch, step, prompt.index, prompt.seed)
            sampler = _sampler_label(pipeline, prompt)
            # SD models ignore --g: only FLUX's guidance is written down.
            guidance = prompt.guidance if flux else None
            save_sample(image, path, prompt, sampler, guidance)
            # One record at a time: samples already written stay listed if training dies.
            append_manifest(out_dir, [manifest_record(path, prompt, epoch, step, sampler, guidance)])
            paths.append(path)
    return paths


def render_prompt(pipeline: StableDiffusionPipeline, prompt: SamplePrompt, clip_skip: int | None = None) -> Image.Image:
    """One image for one prompt; its noise depends only on the prompt's seed, not on the device.
    A1111 weights in the prompt and the negative prompt are read (atelier.sampling.prompt_text)."""
    generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
    text_args = text_arguments(pipeline, prompt.prompt, prompt.negative_prompt, clip_skip)
    with _scheduler_for(pipeline, prompt.sampler):
        result = pipeline(
            **text_args,
            height=prompt.height,
            width=prompt.width,
            num_inference_steps=prompt.steps,
            guidance_scale=prompt.cfg_scale,
            generator=generator,
            output_type="pil",
        )
    return result.images[0]


def sample_file_name(output_name: str, epoch: int | None, step: int, index: int, seed: int) -> str:
    """sd-scripts' sample name: {output_name}_{e000001 or 000500}_{NN}_{timestamp}_{seed}.png."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{number}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{seed}.png"


def save_sample(image: Image.Image, path: Path, prompt: SamplePrompt, sampler: str, guidance: float | None = None) -> None:
    """Write the PNG atomically, with A1111-style generation parameters that image viewers show
    (`guidance`: FLUX's distilled guidance, written when given)."""
    info = PngInfo()
    info.add_text("parameters", _a1111_parameters(prompt, sampler, guidance))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


@contextlib.contextmanager
def _scheduler_for(pipeline: StableDiffusionPipeline, sampler: str | None) -> Iterator[None]:
    """Use a prompt's own --ss sampler for one image, then put the pipeline's back."""
    if sampler is None:
        yield
        return
    default = pipeline.scheduler
    pipeline.scheduler = make_scheduler(sampler, default.config)
    try:
        yield
    finally:
        pipeline.scheduler = default


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout) while sampling; every submodule gets its own mode back."""
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        # Set the flag directly: .train(mode) would recurse and overwrite the children.
        for sub, training in saved:
            sub.training = training


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Sampling must not shift the training's random stream (shuffling, noise, dropout)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _check_device(pipeline: StableDiffusionPipeline, device: torch.device) -> None:
    denoiser = "transformer" if isinstance(pipeline, FluxSamplePipeline) else "unet"
    for name, module in ((denoiser, _denoiser(pipeline)), ("text_encoder", pipeline.text_encoder), ("vae", pipeline.vae)):
        param = next(module.parameters(), None)
        if param is not None and not _same_device(param.device, device):
            raise ValueError(
                f"sampling on {device}, but the {name} is on {param.device}: "
                "move the modules before sampling (sampling never moves training modules)"
            )


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    # There is one CPU: "cpu:0" (accelerate's device in a CPU process group) is "cpu".
    same_index = wanted.type == "cpu" or wanted.index is None or actual.index == wanted.index
    return actual.type == wanted.type and same_index


def _sampler_label(pipeline: StableDiffusionPipeline, prompt: SamplePrompt) -> str:
    return prompt.sampler or sampler_name(pipeline.scheduler)


def _denoiser(pipeline: Any) -> torch.nn.Module:
    """The UNet, or FLUX's transformer."""
    return pipeline.transformer if isinstance(pipeline, FluxSamplePipeline) else pipeline.unet


def _a1111_parameters(prompt: SamplePrompt, sampler: str, guidance: float | None = None) -> str:
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    lines.append(
        f"Steps: {prompt.steps}, Sampler: {sampler}, CFG scale: {prompt.cfg_scale:g}, "
        f"Seed: {prompt.seed}, Size: {prompt.width}x{prompt.height}"
        + (f", Distilled CFG Scale: {guidance:g}" if guidance is not None else "")  # Forge's name for FLUX's guidance
    )
    return "\n".join(lines)
