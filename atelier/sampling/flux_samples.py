"""FLUX.1 sample images, rendered as sd-scripts renders them while training a FLUX LoRA.

sd-scripts: library/flux_train_utils.py, sample_image_inference / denoise / get_schedule
(commit 48d368f). Per prompt line (atelier.config.sample_prompts):

- size: ``--w`` / ``--h`` rounded down to a multiple of 16, at least 64:
  ``max(64, h - h % 16)`` (16 = the AE's 8x times FLUX's 2x2 patch).
- ``--s`` steps; ``--d`` seed: the noise is drawn *packed*, as sd-scripts draws it,
  ``randn(1, tokens, 64)`` with a generator seeded by ``--d`` (here a CPU generator, so the image does
  not depend on the device; sd-scripts seeds one on the training device).
- ``--g``: the distilled guidance, embedded by a guidance-distilled transformer (dev; schnell has
  no guidance embedder and none is passed). sd-scripts' default: 3.5 (``prompt_dict.get("guidance_scale", 3.5)``).
- ``--l``: real CFG with the negative prompt ``--n``, only when scale != 1.0 (sd-scripts'
  default scale for FLUX is 1.0: no CFG, the negative prompt is not used). Both texts go through
  the transformer in one batch [negative, positive] and
  ``pred = neg + (pos - neg) * scale``, as sd-scripts' denoise does.
- ``--ss``: FLUX has one sampler, Euler on the flow ODE; sd-scripts ignores sample_sampler for
  FLUX (the line is commented out). Atelier warns once (flux_prompt_warnings) and uses Euler.
- A1111 weights: sd-scripts' FLUX sampler has none; a weighted prompt's text is used as it is
  written (brackets included), with a one-time warning.

Schedule (get_schedule): with n steps and L image tokens (the packed latent's count),

    t_i = i-th of linspace(1, 0, n + 1)
    mu  = 0.5 + (1.15 - 0.5) * (L - 256) / (4096 - 256)        (get_lin_function)
    sigma_i = e^mu / (e^mu + (1 / t_i - 1))                     (time_shift, sigma = 1)

and Euler: ``x <- x + (sigma_{i+1} - sigma_i) * v``, the transformer told the timestep sigma_i
(diffusers' FluxTransformer2DModel multiplies it by 1000 as BFL's model does).
The family's own scheduler, FlowMatchEulerDiscreteScheduler with dynamic shifting
(atelier.models.flux_architectures.FLUX1_PIPELINE_SCHEDULER), gives exactly this schedule from
``set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)`` (its time shift is the same formula, it
appends the final 0 that sd-scripts' shifted t_n = 0 gives) and steps Euler the same way.

Where diffusers' FluxPipeline.__call__ and sd-scripts differ, this follows sd-scripts (so it
runs its own loop on the FluxPipeline's modules instead of calling the pipeline):
- CFG: diffusers runs true CFG only when true_cfg_scale > 1 *and* a negative prompt is given,
  in two separate transformer calls; sd-scripts whenever scale != 1.0, the empty negative too.
- Noise: diffusers draws [1, 16, h/8, w/8] and packs it; sd-scripts draws the packed tokens.
- T5 mask: diffusers' pipeline never masks T5's padding; sd-scripts with apply_t5_attn_mask
  gives the mask to T5 and to every attention of the transformer (txt tokens then image
  tokens, the image all ones). diffusers' FluxTransformer2DModel takes such a mask:
  ``joint_attention_kwargs={"attention_mask": mask [B, 1, 1, txt + img] bool}`` reaches
  FluxAttnProcessor's ``attention_mask`` (scaled_dot_product_attention's attn_mask) in the
  double and the single blocks alike.
- L (the shift's token count): both use the packed latent's token count; sd-scripts computes
  it as (h // 16) * (w // 16), which is that count for FLUX.1's AE (8x). For a model whose AE
  scales otherwise (the tiny test model's AE is 4x) the token count is used.
- Pixels: sd-scripts' ``uint8(127.5 * (clamp(x, -1, 1) + 1))`` (truncating), not diffusers' rounding.
- Schedule: sd-scripts shifts dynamically for every FLUX.1 model, schnell too; so does this,
  whatever the given config's use_dynamic_shifting says.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image

from atelier.config.sample_prompts import SamplePrompt
from atelier.data.caption_weights import has_weight_syntax
from atelier.models.flux_architectures import FLUX1_PIPELINE_SCHEDULER
from atelier.conditioning.flux_text import FluxCaptionEncoder, FluxText, FluxTextOptions
from atelier.objective.flow_matching import unpack_latents
from atelier.objective.steps import flux_call

logger = logging.getLogger(__name__)

FLUX_SIZE_MULTIPLE = 16  # sd-scripts: height - height % 16
FLUX_MIN_SIZE = 64
DEFAULT_GUIDANCE = 3.5  # sd-scripts: prompt_dict.get("guidance_scale", 3.5)
DEFAULT_CFG_SCALE = 1.0  # sd-scripts: prompt_dict.get("scale", 1.0): no CFG
DEFAULT_T5_MAX_LENGTH = 512  # FLUX.1-dev's; schnell is trained with 256
CLIP_MAX_LENGTH = 77  # sd-scripts' FluxTokenizeStrategy: clip_l(text, max_length=77)
FLUX_SAMPLER = "euler"  # the one sampler: Euler on the flow ODE (FlowMatchEulerDiscreteScheduler)
EULER_NAMES = ("euler", "k_euler")  # per-prompt --ss names that mean it


class FluxSamplePipeline(FluxPipeline):
    """diffusers' FluxPipeline around the training modules, rendering as sd-scripts does.

    `t5_max_length` and `apply_t5_attn_mask` are the run's (sd-scripts' --t5xxl_max_token_length,
    --apply_t5_attn_mask); build_flux_pipeline sets them.
    """

    t5_max_length: int = DEFAULT_T5_MAX_LENGTH
    apply_t5_attn_mask: bool = False

    def resolve(self, prompt: SamplePrompt) -> SamplePrompt:
        """The prompt as rendered: see resolve_flux_prompt."""
        return resolve_flux_prompt(prompt)

    def render(self, prompt: SamplePrompt) -> Image.Image:
        """One image for a prompt resolve() gave."""
        return render_flux_prompt(self, prompt)


def build_flux_pipeline(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    scheduler_config: Mapping[str, Any] = FLUX1_PIPELINE_SCHEDULER,
    *,
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
    apply_t5_attn_mask: bool = False,
) -> FluxSamplePipeline:
    """A FLUX pipeline around the given (unwrapped, possibly LoRA-patched) modules: CLIP-L and T5
    as text_encoders[0] / [1]; nothing is copied or moved. The scheduler is flow-match Euler from
    `scheduler_config`, dynamic shifting on (sd-scripts shifts for every FLUX.1 model)."""
    if len(text_encoders) != 2 or len(tokenizers) != 2:
        raise ValueError("FLUX samples need CLIP-L and T5 (two text encoders and two tokenizers)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**scheduler_config, "use_dynamic_shifting": True})
    pipeline = FluxSamplePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        transformer=transformer,
    )
    pipeline.t5_max_length = int(t5_max_length)
    pipeline.apply_t5_attn_mask = bool(apply_t5_attn_mask)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def flux_size(size: int) -> int:
    """sd-scripts' FLUX sample size: max(64, size - size % 16)."""
    return max(FLUX_MIN_SIZE, size - size % FLUX_SIZE_MULTIPLE)


def resolve_flux_prompt(prompt: SamplePrompt) -> SamplePrompt:
    """The prompt with what FLUX renders: its size rounded (flux_size), --g or 3.5, sampler
    "euler". File names, samples.json and the PNG's parameters then say what was rendered."""
    return dataclasses.replace(
        prompt,
        width=flux_size(prompt.width),
        height=flux_size(prompt.height),
        guidance=DEFAULT_GUIDANCE if prompt.guidance is None else prompt.guidance,
        sampler=FLUX_SAMPLER,
    )


def flux_prompt_warnings(prompts: Sequence[SamplePrompt], sampler: str | None = None) -> None:
    """Warn once per run of what FLUX sampling reads otherwise than SD's: a sampler other than
    Euler (`sampler`: sampling.sampler, when the run names one), sizes off the 16 px grid,
    weighted prompts (read as plain text)."""
    if sampler is not None and sampler not in EULER_NAMES:
        logger.warning("sampling.sampler=%s: FLUX has one sampler, flow-match Euler; it is used "
                       "(sd-scripts ignores sample_sampler for FLUX)", sampler)  # fmt: skip
    other = [p for p in prompts if p.sampler is not None and p.sampler not in EULER_NAMES]
    if other:
        logger.warning("sample prompt(s) %s: --ss %s: FLUX has one sampler, flow-match Euler; it is used "
                       "(sd-scripts ignores --ss for FLUX)", _numbers(other),
                       ", ".join(dict.fromkeys(str(p.sampler) for p in other)))  # fmt: skip
    off_grid = [p for p in prompts if (p.width, p.height) != (flux_size(p.width), flux_size(p.height))]
    if off_grid:
        logger.warning("sample prompt(s) %s: FLUX renders sizes in multiples of %d px (at least %d): "
                       "rounded down as sd-scripts does", _numbers(off_grid), FLUX_SIZE_MULTIPLE,
                       FLUX_MIN_SIZE)  # fmt: skip
    weighted = [p for p in prompts if has_weight_syntax(p.prompt) or has_weight_syntax(p.negative_prompt)]
    if weighted:
        logger.warning("sample prompt(s) %s use A1111 weights ( (word:1.2), [word] ); sd-scripts' FLUX "
                       "sampler has none: the text is read as written, brackets included",
                       _numbers(weighted))  # fmt: skip


def _numbers(prompts: Sequence[SamplePrompt]) -> str:
    return ", ".join(str(p.index + 1) for p in prompts)


def shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """mu of the resolution-dependent shift: the line through (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift) at the image's token count (sd-scripts' get_lin_function
    with its defaults 256 / 0.5, 4096 / 1.15, FLUX.1's scheduler config's numbers)."""
    x1, y1 = config["base_image_seq_len"], config["base_shift"]
    x2, y2 = config["max_image_seq_len"], config["max_shift"]
    return y1 + (y2 - y1) * (image_seq_len - x1) / (x2 - x1)


def set_flux_schedule(scheduler: FlowMatchEulerDiscreteScheduler, steps: int, image_seq_len: int,
                      device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """Set `scheduler` to sd-scripts' get_schedule(steps, image_seq_len) and return its sigmas
    (steps + 1 values, 1 down to 0; see the module docstring)."""
    # linspace(1, 1/n, n) is sd-scripts' linspace(1, 0, n + 1) less its 0, which the scheduler appends.
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=shift_mu(image_seq_len, scheduler.config), device=device)
    return scheduler.sigmas


def encode_flux_text(pipeline: FluxPipeline, text: str, t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
                     apply_t5_attn_mask: bool = False) -> FluxText:  # fmt: skip
    """One text as training encodes captions (atelier.conditioning.flux_text): CLIP-L's pooled
    output (77 tokens) and T5's states padded to t5_max_length, T5 given the mask with apply_t5_attn_mask."""
    encoder = FluxCaptionEncoder([pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder,
                                 pipeline.text_encoder_2], options=FluxTextOptions(t5_max_length, apply_t5_attn_mask))
    return encoder([text])


def render_flux_prompt(pipeline: FluxSamplePipeline, prompt: SamplePrompt) -> Image.Image:
    """One image for a resolved prompt (resolve_flux_prompt), sd-scripts' sample_image_inference
    and denoise on diffusers' modules; its noise depends only on the prompt's seed."""
    transformer, vae = pipeline.transformer, pipeline.vae
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    scale = float(prompt.cfg_scale)
    texts = [encode_flux_text(pipeline, prompt.prompt, pipeline.t5_max_length, pipeline.apply_t5_attn_mask)]
    if scale != 1.0:  # sd-scripts: CFG (the negative, "" if none) only when scale != 1.0
        texts.insert(0, encode_flux_text(pipeline, prompt.negative_prompt, pipeline.t5_max_length,
                                         pipeline.apply_t5_attn_mask))  # fmt: skip
    batch = len(texts)
    text = FluxText(torch.cat([t.t5 for t in texts]).to(dtype), torch.cat([t.pooled for t in texts]).to(dtype),
                    torch.cat([t.t5_mask for t in texts]))  # fmt: skip

    # Packed latent tokens: one per 2x2 patch of the AE's latent (h / (2 * vae_scale_factor) rows).
    patch = 2 * pipeline.vae_scale_factor
    rows, cols = prompt.height // patch, prompt.width // patch
    generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
    # sd-scripts: randn(1, h//16 * w//16, 16 * 2 * 2), drawn packed.
    x = torch.randn(1, rows * cols, transformer.config.in_channels, generator=generator).to(device, dtype)
    guidance = None
    if transformer.config.guidance_embeds:  # schnell has no guidance embedder
        guidance = float(prompt.guidance if prompt.guidance is not None else DEFAULT_GUIDANCE)

    scheduler = pipeline.scheduler
    sigmas = set_flux_schedule(scheduler, prompt.steps, rows * cols, device)
    for i, t in enumerate(scheduler.timesteps):
        # sd-scripts passes t_curr = sigma as the timestep.
        pred = flux_call(transformer, x.expand(batch, -1, -1), rows, cols, text, sigmas[i].expand(batch).to(dtype),
                         guidance, pipeline.apply_t5_attn_mask)  # fmt: skip
        if batch == 2:
            negative, positive = pred.chunk(2)
            pred = negative + (positive - negative) * scale
        x = scheduler.step(pred, t, x, return_dict=False)[0]  # x + (sigma_next - sigma) * pred
    return _decode(vae, x, rows, cols)


def _decode(vae: torch.nn.Module, tokens: torch.Tensor, rows: int, cols: int) -> Image.Image:
    latents = unpack_latents(tokens, rows, cols)
    # The AE's latent space: z = (x - shift) * scale on encoding (BFL's AutoEncoder.decode undoes it).
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(latents.to(next(vae.parameters()).dtype), return_dict=False)[0]
    pixels = pixels.clamp(-1, 1).permute(0, 2, 3, 1)
    return Image.fromarray((127.5 * (pixels + 1.0)).float().cpu().numpy().astype(np.uint8)[0])


__all__ = [
    "DEFAULT_CFG_SCALE", "DEFAULT_GUIDANCE", "DEFAULT_T5_MAX_LENGTH", "FLUX_SAMPLER", "FluxSamplePipeline",
    "build_flux_pipeline", "encode_flux_text", "flux_prompt_warnings", "flux_size",
    "render_flux_prompt", "resolve_flux_prompt", "set_flux_schedule", "shift_mu",
]  # fmt: skip
