"""Noise, timesteps, targets and loss weighting for the denoising objective.

Random draws take an explicit generator so a run's noise stream depends only on
its seed (needed for resume and for training several adapters side by side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; noise_offset adds a per-channel constant shift."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        b, c = latents.shape[:2]
        noise += noise_offset * torch.randn((b, c, 1, 1), generator=generator, dtype=torch.float32)
    return noise.to(latents.device, latents.dtype)


def sample_timesteps(batch_size: int, scheduler: DDPMScheduler, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023), as sd-scripts applies it."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped / s


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, optionally min-SNR weighted, averaged over the batch.

    `weights` [B] scales each sample's loss before the mean (sd-scripts' loss_weights:
    1 for train images, prior_loss_weight for regularization images).
    """
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler, timesteps.to(loss.device), min_snr_gamma).to(loss.device)
    if weights is not None:
        if weights.shape != loss.shape:
            raise ValueError(f"weights must have one value per sample {tuple(loss.shape)}, got {tuple(weights.shape)}")
        loss = loss * weights.to(loss.device, loss.dtype)
    return loss.mean()
