"""What the model is asked to denoise: the noise, the timesteps and the noisy latents.

sd-scripts' options with its names and formulas (library/custom_train_functions.py and
train_util.get_noise_noisy_latents_and_timesteps). Random draws take an explicit
generator, so a run's noise stream depends only on its seed (needed for resume).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


log = logging.getLogger(__name__)


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
    noise_offset_random_strength: bool = False,
) -> torch.Tensor:
    """Gaussian noise like `latents`, then (in sd-scripts' order) offset noise and multires noise.

    noise_offset adds a per-(sample, channel) constant shift of std noise_offset;
    adaptive_noise_scale raises that std by scale * |channel mean of the latents|.
    noise_offset_random_strength: the batch's offset is U(0, 1) * noise_offset, one draw per batch.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        offset = random_strength(generator, noise_offset) if noise_offset_random_strength else noise_offset
        noise = noise + offset_noise(latents, generator, offset, adaptive_noise_scale)
    if multires_noise_iterations:
        noise = multires_noise(noise, generator, multires_noise_iterations, multires_noise_discount)
    return noise.to(latents.device, latents.dtype)


def random_strength(generator: torch.Generator, maximum: float) -> float:
    """U(0, 1) * maximum, one draw for the whole batch (sd-scripts' torch.rand(1) * value in
    train_util.get_noise_noisy_latents_and_timesteps, for noise_offset and ip_noise_gamma)."""
    return torch.rand((), generator=generator).item() * maximum


def offset_noise(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float, adaptive_noise_scale: float | None = None
) -> torch.Tensor:
    """[B, C, 1, 1] shifts: offset * N(0, 1), offset = noise_offset + scale * |latent channel mean| (>= 0)."""
    b, c = latents.shape[:2]
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        channel_mean = latents.detach().float().cpu().mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(noise_offset + adaptive_noise_scale * channel_mean, min=0.0)
    return offset * torch.randn((b, c, 1, 1), generator=generator, dtype=torch.float32)


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid noise: add noise drawn at sizes shrinking by a random 2-4x per level, upsampled
    and weighted by discount^level, then rescale the whole batch to unit std."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for level in range(iterations):
        r = 2.0 + 2.0 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype)
        noise += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**level
        if hn == 1 or wn == 1:
            break  # the coarsest level is 1 pixel wide
    return noise / noise.std()


def timestep_range(scheduler: DDPMScheduler, min_timestep: int | None, max_timestep: int | None) -> tuple[int, int]:
    """[low, high) to draw training timesteps from; ValueError naming the key when out of range."""
    total = scheduler.config.num_train_timesteps
    low = 0 if min_timestep is None else min_timestep
    high = total if max_timestep is None else max_timestep
    if not 0 <= low <= high <= total:
        raise ValueError(
            f"training.min_timestep={min_timestep} / training.max_timestep={max_timestep}: need "
            f"0 <= min_timestep <= max_timestep <= {total} (the model's num_train_timesteps)"
        )
    if low == high == total:
        raise ValueError(f"training.min_timestep = training.max_timestep must be below {total}")
    return low, high


def sample_timesteps(
    batch_size: int,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Uniform timesteps in [min_timestep, max_timestep); the single value when they are equal."""
    low, high = timestep_range(scheduler, min_timestep, max_timestep)
    if low == high:
        return torch.full((batch_size,), high, dtype=torch.long)
    return torch.randint(low, high, (batch_size,), generator=generator)


def noisy_latents(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
) -> torch.Tensor:
    """The model input x_t. With ip_noise_gamma (input perturbation) the latents are noised with
    noise + gamma * N(0, 1) while the target stays `noise`; ip_noise_gamma_random_strength makes
    gamma U(0, 1) * ip_noise_gamma, drawn once per batch before the perturbation (sd-scripts' order)."""
    if ip_noise_gamma:
        gamma = random_strength(generator, ip_noise_gamma) if ip_noise_gamma_random_strength else ip_noise_gamma
        extra = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        noise = noise + gamma * extra.to(noise.device, noise.dtype)
    return scheduler.add_noise(latents, noise, timesteps)


def with_zero_terminal_snr(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The same schedule with betas rescaled so the last timestep has SNR 0 (Lin et al. 2023,
    arXiv:2305.08891; diffusers' rescale_betas_zero_snr is the same rescaling as sd-scripts')."""
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


__all__ = [
    "multires_noise",
    "noisy_latents",
    "offset_noise",
    "random_strength",
    "sample_noise",
    "sample_timesteps",
    "timestep_range",
    "with_zero_terminal_snr",
]
