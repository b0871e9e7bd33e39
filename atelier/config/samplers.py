"""The `sampling.sampler` and `--ss` choices: sampler names as kohya sd-scripts'
--sample_sampler knows them, each with the diffusers scheduler it means
(atelier.sampling.samplers makes it). Plain data: no diffusers import."""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, config overrides)
# Overrides are what diffusers itself would switch to at run time (with a warning each time).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
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

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def normalize_sampler(name: str) -> str:
    """Lower-case, validated sampler name; ValueError listing the valid names otherwise."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return key
