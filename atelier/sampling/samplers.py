"""The diffusers scheduler of each sd-scripts sampler name (atelier.config.samplers lists them).

diffusers is imported when a scheduler is made, not at import time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from atelier.config.samplers import SAMPLERS, normalize_sampler

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Used only when the model's config does not say. diffusers' DDIM default clip_sample=True
# clips latents to [-1, 1], which StableDiffusionPipeline rejects (and turns off, warning).
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {"DDIMScheduler": {"clip_sample": False}}

# diffusers only exports a placeholder that fails on use for these without scipy.
_NEEDS_SCIPY = {"LMSDiscreteScheduler"}


def make_scheduler(sampler: str, scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh diffusers scheduler for an sd-scripts sampler name, built from the model's config."""
    import diffusers

    class_name, overrides = SAMPLERS[normalize_sampler(sampler)]
    if class_name in _NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
        raise ImportError(f"sampler {sampler!r} ({class_name}) needs scipy: pip install scipy")
    scheduler_cls = getattr(diffusers, class_name)
    config = {**_CONFIG_DEFAULTS.get(class_name, {}), **scheduler_config}
    return scheduler_cls.from_config(config, **overrides)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The sd-scripts name of a scheduler `make_scheduler` built (else its class name)."""
    for name, (class_name, overrides) in SAMPLERS.items():
        if type(scheduler).__name__ == class_name and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__
