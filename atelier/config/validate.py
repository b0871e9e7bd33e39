"""Checks of a composed config before it is typed; no torch (a launcher runs them).

The rules about values live on the schema dataclasses (their `__post_init__`, run by
atelier.config.typed.run_config); here only what must be known about the DictConfig
itself: every mandatory ??? key set, and the file-name rule of the keys Hydra builds
paths from (the run-dir guard checks it before the run dir is made).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from atelier.config.schema.checks import check_name
from atelier.errors import ConfigError  # raised by the checks (and imported from here)

# What to say when a mandatory key was left at ???.
MISSING_HINTS = {
    "model.path": "a diffusers folder or a single-file .safetensors checkpoint, e.g. model.path=/models/sd15",
    "dataset.train_data_dir": "the folder holding N_concept subfolders, e.g. dataset.train_data_dir=/data/mychar",
}


# Config values that become file or folder names inside a run dir (or the outputs/ tree).
NAME_KEYS = ("project", "output.output_name")


def check_names(cfg: DictConfig) -> None:
    """The file-name rule of `project` and `output.output_name` (atelier.config.schema.checks), on a
    composed config: the run-dir guard checks it before Hydra or the run writes anything."""
    for key in NAME_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
        if value is None and key == "project":
            continue
        check_name(key, "" if value is None else str(value))


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
