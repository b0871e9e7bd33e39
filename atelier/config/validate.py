"""Checks of a composed config that Hydra's schema cannot make; no torch (a launcher runs them)."""

from __future__ import annotations

import logging
import math
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from atelier.errors import ConfigError, MissingFileError  # raised by the checks below (and imported from here)

log = logging.getLogger(__name__)

LEARNING_RATE_KEYS = ("optimizer.learning_rate", "optimizer.unet_lr", "optimizer.text_encoder_lr")
# Latents are 1/8 of the image.
RESOLUTION_MULTIPLE = 8

# What to say when a mandatory key was left at ???.
MISSING_HINTS = {
    "model.path": "a diffusers folder or a single-file .safetensors checkpoint, e.g. model.path=/models/sd15",
    "dataset.train_data_dir": "the folder holding N_concept subfolders, e.g. dataset.train_data_dir=/data/mychar",
}


# Config values that become file or folder names inside a run dir (or the outputs/ tree).
NAME_KEYS = ("project", "output.output_name")


def check_names(cfg: DictConfig) -> None:
    """`project` and `output.output_name` are names, not paths: a separator, `..`, an empty or
    hidden name would write outside the run dir (or a hidden file), so they fail here, before
    Hydra or the run writes anything."""
    for key in NAME_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
        if value is None and key == "project":
            continue
        problem = name_problem(str(value) if value is not None else "")
        if problem:
            raise ConfigError(
                f"{key}={value!r} {problem}: it is a name, not a path (files go into the run dir). "
                f"Pass a plain name such as {key}=my_lora; choose the folder with hydra.run.dir / hydra.sweep.dir."
            )


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name of ours, or None."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name in (".", "..") or name.startswith("."):
        return "starts with '.' (a hidden file, or a parent folder)"
    if "\0" in name:
        return "holds a NUL character"
    return None


def check_required(cfg: DictConfig) -> None:
    """Mandatory keys (???) are set: named here, before Hydra resolves a path built from them
    (hydra.run.dir holds ${project} = the dataset folder's name)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
        # An interpolation to a missing value names the key it was resolving; the message the missing one.
        key = err.full_key
        if isinstance(err, InterpolationToMissingValueError):
            missing = str(err).split("Missing mandatory value: ")[-1].splitlines()[0].strip()
            if missing and " " not in missing:
                key = missing
        hint = MISSING_HINTS.get(key, f"{key}=<value>")
        raise ConfigError(f"'{key}' must be set for this config: pass {hint}") from None


def validate(cfg: DictConfig) -> None:
    """Fail before any work on values Hydra's schema cannot check."""
    check_required(cfg)
    check_names(cfg)
    if cfg.network.train_unet_only and cfg.network.train_text_encoder_only:
        raise ConfigError("network.train_unet_only and network.train_text_encoder_only cannot both be true")
    for key in ("network.dim", "training.train_batch_size", "training.gradient_accumulation_steps",
                "training.clip_skip", "training.num_processes"):  # fmt: skip
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
    check_numbers(cfg)
    check_sampling(cfg)


def check_numbers(cfg: DictConfig) -> None:
    """Learning rates finite and >= 0; network.alpha > 0 (a warning: sd-scripts trains with it);
    dataset.resolution a multiple of 8 (64 for SDXL): the latents are 1/8 of the image."""
    for key in LEARNING_RATE_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not (math.isfinite(float(value)) and float(value) >= 0):
            raise ConfigError(f"'{key}' must be a finite number >= 0, got {value}: pass e.g. {key}=1e-4")
    alpha = OmegaConf.select(cfg, "network.alpha")
    if alpha is not None and not float(alpha) > 0:
        # Kept a warning: alpha 0 or negative is legal in sd-scripts (0 means alpha = dim there).
        log.warning("network.alpha=%s: the LoRA's scale alpha/dim is %s; usual values are 1 to network.dim",
                    alpha, "0 (it learns nothing)" if float(alpha) == 0 else "negative")
    resolution = OmegaConf.select(cfg, "dataset.resolution")
    sizes = [int(n) for n in re.findall(r"\d+", str(resolution))] if resolution is not None else []
    for size in sizes:
        if size % RESOLUTION_MULTIPLE:
            fixed = max(RESOLUTION_MULTIPLE, round(size / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
            raise ConfigError(
                f"dataset.resolution={resolution}: {size} is not a multiple of {RESOLUTION_MULTIPLE} (the latents "
                f"are 1/8 of the image); pass e.g. dataset.resolution={fixed}"
            )
    if str(getattr(OmegaConf.select(cfg, "model.version"), "value", "")) == "sdxl" and any(n % 64 for n in sizes):
        log.warning("dataset.resolution=%s: SDXL buckets step by 64; a multiple of 64 suits it best", resolution)


def check_sampling(cfg: DictConfig) -> None:
    """sampling.sampler and the prompt lines are parsed now, so a typo fails before training
    rather than after it (when the LoRA would not be written)."""
    from atelier.sampling.prompts import SampleDefaults, load_prompt_file, parse_prompts
    from atelier.sampling.samplers import normalize_sampler

    s = cfg.get("sampling")
    if s is None:
        return
    try:
        normalize_sampler(str(s.sampler))
    except ValueError as err:
        raise ConfigError(f"sampling.sampler: {err}") from None
    defaults = SampleDefaults(width=s.width, height=s.height, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed)
    try:
        if s.prompts:
            parse_prompts(list(s.prompts), defaults)
        elif s.prompt_file:
            load_prompt_file(s.prompt_file, defaults)
    except FileNotFoundError as err:
        raise MissingFileError(f"{err}: pass an existing .txt file, or sampling.prompt_file=null") from None
    except ValueError as err:
        key = "sampling.prompts" if s.prompts else "sampling.prompt_file"
        raise ConfigError(f"{key}: {err}") from None
