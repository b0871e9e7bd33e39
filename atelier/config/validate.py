"""Checks of a composed config that Hydra's schema cannot make; no torch (a launcher runs them)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

# What to say when a mandatory key was left at ???.
MISSING_HINTS = {
    "model.path": "a diffusers folder or a single-file .safetensors checkpoint, e.g. model.path=/models/sd15",
    "dataset.train_data_dir": "the folder holding N_concept subfolders, e.g. dataset.train_data_dir=/data/mychar",
}


class ConfigError(ValueError):
    """A config that composes but cannot be trained; the message names the key."""


def validate(cfg: DictConfig) -> None:
    """Fail before any work on values Hydra's schema cannot check."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key
        hint = MISSING_HINTS.get(key, f"{key}=<value>")
        raise ConfigError(f"'{key}' must be set for this config: pass {hint}") from None
    if cfg.network.train_unet_only and cfg.network.train_text_encoder_only:
        raise ConfigError("network.train_unet_only and network.train_text_encoder_only cannot both be true")
    for key in ("network.dim", "training.train_batch_size", "training.gradient_accumulation_steps",
                "training.clip_skip", "training.num_processes"):  # fmt: skip
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
