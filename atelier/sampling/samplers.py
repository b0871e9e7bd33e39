"""Sampler names as kohya sd-scripts' --sample_sampler knows them, mapped to diffusers schedulers.

diffusers is imported lazily so that prompt parsing (which validates --ss) stays cheap.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (diffusers scheduler class, config overrides)
# Overrides are what diffusers itself would switch to at run time (with a warning each time).
_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # The algorithm is always set explicitly: a config taken from another DPM-Solver
    # scheduler would otherwise carry its algorithm over.
    "dpmsolver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "lower_order_final": True}),
}

# Used only when the model's config does not say. diffusers' DDIM default clip_sample=True
# clips latents to [-1, 1], which StableDiffusionPipeline rejects (and turns off, warning).
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {"DDIMScheduler": {"clip_sample": False}}

SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)

# diffusers only exports a placeholder that fails on use for these without scipy.
_NEEDS_SCIPY = {"LMSDiscreteScheduler"}


def normalize_sampler(name: str) -> str:
    """Lower-case, validated sampler name; ValueError listing the valid names otherwise."""
    key = name.strip().lower()
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return key


def make_scheduler(sampler: str, scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh diffusers scheduler for an sd-scripts sampler name, built from the model's config."""
    import diffusers

    class_name, overrides = _SAMPLERS[normalize_sampler(sampler)]
    if class_name in _NEEDS_SCIPY and importlib.util.find_spec("scipy") is None:
        raise ImportError(f"sampler {sampler!r} ({class_name}) needs scipy: pip install scipy")
    scheduler_cls = getattr(diffusers, class_name)
    config = {**_CONFIG_DEFAULTS.get(class_name, {}), **scheduler_config}
    return scheduler_cls.from_config(config, **overrides)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The sd-scripts name of a scheduler `make_scheduler` built (else its class name)."""
    for name, (class_name, overrides) in _SAMPLERS.items():
        if type(scheduler).__name__ == class_name and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__
