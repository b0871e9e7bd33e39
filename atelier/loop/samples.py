"""Sample images during a run: which prompts, when, and the run's grid."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from atelier.config.schema import AtelierConfig
from atelier.data.dataset import DatasetIndex
from atelier.models.architectures import SD1_PIPELINE_SCHEDULER
from atelier.models.loading import BaseModel
from atelier.sampling.generate import build_pipeline, build_sdxl_pipeline, generate_samples
from atelier.sampling.grid import make_grid
from atelier.sampling.manifest import SAMPLES_DIR
from atelier.config.sample_prompts import SampleDefaults, SamplePrompt, load_prompt_file, parse_prompts
from atelier.runtime.signals import stop_asked

log = logging.getLogger(__name__)

GRID = "sample_grid.png"


def sample_prompts(cfg: AtelierConfig, dataset: DatasetIndex) -> list[SamplePrompt]:
    """sampling.prompts, else sampling.prompt_file, else one prompt per concept folder."""
    s = cfg.sampling
    defaults = SampleDefaults(width=s.width, height=s.height, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed)
    if s.prompts:
        prompts = parse_prompts(list(s.prompts), defaults)
    elif s.prompt_file:
        prompts = load_prompt_file(s.prompt_file, defaults)
    else:
        tokens = [folder.class_tokens for folder in dataset.folders if folder.class_tokens]
        prompts = parse_prompts(tokens, defaults)
    prompts = prompts[: s.limit] if s.limit is not None else prompts
    guided = [p.index for p in prompts if p.guidance is not None]
    if guided:
        log.warning("sample prompt(s) %s give --g, the distilled guidance of FLUX models; SD models have none (their "
                    "guidance is the CFG scale, --l), so --g is not used", ", ".join(str(i + 1) for i in guided))
    return prompts


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
        self.prompts = sample_prompts(cfg, dataset)
        self._pipeline = None

    def _get_pipeline(self):
        if self._pipeline is None:
            b = self.base
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
        with self.autocast():
            return generate_samples(
                self._get_pipeline(),
                self.prompts,
                self.dir,
                self.cfg.output.output_name,
                epoch,
                step,
                self.device,
                # SDXL's pipeline always takes the penultimate layers (clip_skip does not apply).
                clip_skip=None if self.base.text_encoder_2 is not None else self.cfg.training.clip_skip,
                should_stop=lambda: stop_asked() is not None,
            )

    def write_grid(self) -> Path | None:
        if not self.prompts:
            return None
        return make_grid(self.dir, self.grid_path, title=self.cfg.output.output_name)
