"""Sample images during a run: which prompts, when, and the run's grid."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from atelier.config.schema import AtelierConfig
from atelier.data.dataset import DatasetIndex
from atelier.models.loading import BaseModel
from atelier.plugins import FamilyPlugin, plugin_of
from atelier.sampling.generate import generate_samples
from atelier.sampling.grid import make_grid
from atelier.sampling.manifest import SAMPLES_DIR
from atelier.config.sample_prompts import SampleDefaults, SamplePrompt, load_prompt_file, parse_prompts
from atelier.runtime.signals import stop_asked

log = logging.getLogger(__name__)

GRID = "sample_grid.png"


def sample_prompts(cfg: AtelierConfig, dataset: DatasetIndex, plugin: FamilyPlugin) -> list[SamplePrompt]:
    """sampling.prompts, else sampling.prompt_file, else one prompt per concept folder; a prompt
    without --l takes the family's CFG scale, and what its sampler reads otherwise is warned of
    once (FamilyPlugin.sample_cfg_scale / check_sample_prompts)."""
    s = cfg.sampling
    defaults = SampleDefaults(width=s.width, height=s.height, steps=s.steps, cfg_scale=plugin.sample_cfg_scale(s.cfg_scale),
                              seed=s.seed)  # fmt: skip
    if s.prompts:
        prompts = parse_prompts(list(s.prompts), defaults)
    elif s.prompt_file:
        prompts = load_prompt_file(s.prompt_file, defaults)
    else:
        tokens = [folder.class_tokens for folder in dataset.folders if folder.class_tokens]
        prompts = parse_prompts(tokens, defaults)
    prompts = prompts[: s.limit] if s.limit is not None else prompts
    plugin.check_sample_prompts(prompts, s)
    return prompts


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
        self.plugin = plugin_of(base.version)
        self.prompts = sample_prompts(cfg, dataset, self.plugin)
        self._pipeline = None

    def _get_pipeline(self):
        if self._pipeline is None:
            self._pipeline = self.plugin.sample_pipeline(self.base, self.cfg)
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
                clip_skip=self.plugin.sample_clip_skip(self.cfg.training),
                should_stop=lambda: stop_asked() is not None,
            )

    def write_grid(self) -> Path | None:
        if not self.prompts:
            return None
        return make_grid(self.dir, self.grid_path, title=self.cfg.output.output_name)
