"""Checks of a composed config that Hydra's schema cannot make; no torch (a launcher runs them)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from atelier.errors import ConfigError  # raised by the checks below (and imported from here)

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
