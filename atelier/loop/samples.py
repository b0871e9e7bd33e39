"""Sample images during a run: which prompts, when, and the run's grid."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from atelier.config.schema import AtelierConfig
from atelier.config.schema.sampling import SamplingConfig
from atelier.data.dataset import DatasetIndex
from atelier.models.architectures import SD1_PIPELINE_SCHEDULER
from atelier.models.flux_architectures import FLUX1_PIPELINE_SCHEDULER
from atelier.models.loading import BaseModel
from atelier.families import family_of
from atelier.sampling.flux_samples import DEFAULT_CFG_SCALE as FLUX_DEFAULT_CFG_SCALE
from atelier.sampling.flux_samples import build_flux_pipeline, flux_prompt_warnings
from atelier.sampling.generate import build_pipeline, build_sdxl_pipeline, generate_samples
from atelier.sampling.grid import make_grid
from atelier.sampling.manifest import SAMPLES_DIR
from atelier.config.sample_prompts import SampleDefaults, SamplePrompt, load_prompt_file, parse_prompts
from atelier.runtime.signals import stop_asked

log = logging.getLogger(__name__)

GRID = "sample_grid.png"


def sample_prompts(cfg: AtelierConfig, dataset: DatasetIndex, flux: bool = False) -> list[SamplePrompt]:
    """sampling.prompts, else sampling.prompt_file, else one prompt per concept folder.

    `flux`: the prompts of a FLUX.1 model: a prompt without --l takes sd-scripts' FLUX default
    scale 1.0 (no CFG) unless sampling.cfg_scale was changed from its SD default; --g is FLUX's
    guidance; what FLUX reads otherwise is warned of once (flux_prompt_warnings).
    """
    s = cfg.sampling
    cfg_scale = s.cfg_scale
    if flux and cfg_scale == _SCHEMA_DEFAULTS["cfg_scale"]:
        cfg_scale = FLUX_DEFAULT_CFG_SCALE
    defaults = SampleDefaults(width=s.width, height=s.height, steps=s.steps, cfg_scale=cfg_scale, seed=s.seed)
    if s.prompts:
        prompts = parse_prompts(list(s.prompts), defaults)
    elif s.prompt_file:
        prompts = load_prompt_file(s.prompt_file, defaults)
    else:
        tokens = [folder.class_tokens for folder in dataset.folders if folder.class_tokens]
        prompts = parse_prompts(tokens, defaults)
    prompts = prompts[: s.limit] if s.limit is not None else prompts
    if flux:
        # sampling.sampler's default (ddim) is no choice the user made: warned of only when set.
        sampler = None if s.sampler == _SCHEMA_DEFAULTS["sampler"] else str(s.sampler)
        flux_prompt_warnings(prompts, sampler)
        return prompts
    guided = [p.index for p in prompts if p.guidance is not None]
    if guided:
        log.warning("sample prompt(s) %s give --g, the distilled guidance of FLUX models; SD models have none (their "
                    "guidance is the CFG scale, --l), so --g is not used", ", ".join(str(i + 1) for i in guided))
    return prompts


_SCHEMA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}


@contextlib.contextmanager
def modules_on(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """The modules on `device` for the block (text encoders moved off it after caching their
    outputs: atelier.loop.build.offload_text_encoders), then back where each was."""
    away = [(m, p.device) for m in modules for p in [next(m.parameters(), None)] if p is not None and p.device != device]
    for module, _ in away:
        module.to(device)
    try:
        yield
    finally:
        for module, home in away:
            module.to(home)


class SampleWriter:
    def __init__(
        self,
        cfg: AtelierConfig,
        base: BaseModel,
        dataset: DatasetIndex,
        run_dir: Path,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
    ):
        self.cfg = cfg
        self.autocast = autocast
        self.base = base
        self.device = device
        self.dir = run_dir / SAMPLES_DIR
        self.grid_path = run_dir / GRID
        self.flux = family_of(base.version).denoiser == "FluxTransformer2DModel"
        self.prompts = sample_prompts(cfg, dataset, flux=self.flux)
        self._pipeline = None

    def _get_pipeline(self):
        if self._pipeline is None:
            b = self.base
            if self.flux:
                # FLUX.1's inference scheduler (flow-match Euler, shifted by size), not the training one.
                t = self.cfg.training
                self._pipeline = build_flux_pipeline(b.unet, b.vae, b.text_encoders, b.tokenizers, FLUX1_PIPELINE_SCHEDULER,
                                                     t5_max_length=t.t5_tokens(b.variant),
                                                     apply_t5_attn_mask=t.apply_t5_attn_mask)  # fmt: skip
                return self._pipeline
            # Inference schedulers want SD's pipeline settings, not the training DDPM's.
            config = {**SD1_PIPELINE_SCHEDULER, "prediction_type": b.noise_scheduler.config.prediction_type}
            sampler = self.cfg.sampling.sampler
            if b.text_encoder_2 is not None:
                self._pipeline = build_sdxl_pipeline(b.unet, b.vae, b.text_encoders, b.tokenizers, config, sampler)
            else:
                self._pipeline = build_pipeline(b.unet, b.vae, b.text_encoder, b.tokenizer, config, sampler)
        return self._pipeline

    def generate(self, epoch: int | None, step: int) -> list[Path]:
        """The samples after `epoch` (None: after `step`, mid-epoch)."""
        if not self.prompts:
            return []
        log.info("sampling %d prompt(s) at %s", len(self.prompts), f"epoch {epoch}" if epoch is not None else f"step {step}")
        # Mixed precision: the VAE is float32 while the UNet may be half precision.
        with self.autocast(), modules_on(self.base.text_encoders, self.device):
            return generate_samples(
                self._get_pipeline(),
                self.prompts,
                self.dir,
                self.cfg.output.output_name,
                epoch,
                step,
                self.device,
                # SDXL's pipeline always takes the penultimate layers (clip_skip does not apply).
                # FLUX reads CLIP-L's pooled output: clip_skip does not apply either.
                clip_skip=None if self.base.text_encoder_2 is not None else self.cfg.training.clip_skip,
                should_stop=lambda: stop_asked() is not None,
            )

    def write_grid(self) -> Path | None:
        if not self.prompts:
            return None
        return make_grid(self.dir, self.grid_path, title=self.cfg.output.output_name)
