"""Small helpers the schema's `__post_init__` checks share; each check names its key and the fix.

A schema dataclass checks its own fields in `__post_init__` (OmegaConf.to_object calls it at the
config boundary, atelier.config.typed), so a bad value fails before any model is loaded.
Values still holding an interpolation (a dataclass built with its defaults, e.g. when the
schemas are registered) are not checked: they are checked once they are resolved.
"""

from __future__ import annotations

import math
from typing import Any

from atelier.errors import ConfigError


def unresolved(value: Any) -> bool:
    """An interpolation (e.g. "${dataset.resolution}") or ??? that is not a value yet."""
    return isinstance(value, str) and (value.startswith("${") or value == "???")


def at_least(key: str, value: Any, minimum: int) -> None:
    if value is not None and not unresolved(value) and value < minimum:
        raise ConfigError(f"'{key}' must be at least {minimum}, got {value}")


def finite_rate(key: str, value: Any) -> None:
    """A learning rate: finite and >= 0 (0 is a rate: the part stays as it is)."""
    if value is not None and not (math.isfinite(float(value)) and float(value) >= 0):
        raise ConfigError(f"'{key}' must be a finite number >= 0, got {value}: pass e.g. {key}=1e-4")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name of ours (project, output.output_name), or None."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name in (".", "..") or name.startswith("."):
        return "starts with '.' (a hidden file, or a parent folder)"
    if "\0" in name:
        return "holds a NUL character"
    return None


def check_name(key: str, value: Any) -> None:
    """`project` and `output.output_name` are names, not paths: a separator, `..`, an empty or
    hidden name would write outside the run dir (or a hidden file)."""
    if value is None or unresolved(value):
        return
    problem = name_problem(str(value))
    if problem:
        raise ConfigError(
            f"{key}={value!r} {problem}: it is a name, not a path (files go into the run dir). "
            f"Pass a plain name such as {key}=my_lora; choose the folder with hydra.run.dir / hydra.sweep.dir."
        )
