"""Targets, loss functions and loss weighting for the denoising objective.

sd-scripts' options with its names and formulas (train_util.conditional_loss,
get_huber_threshold_if_needed; custom_train_functions.apply_snr_weight,
scale_v_prediction_loss_like_noise_prediction, add_v_prediction_like_loss,
apply_debiased_estimation, apply_masked_loss). The noise and timesteps are drawn in atelier.objective.noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from atelier.config.schema import HuberSchedule, LossType

# sd-scripts caps the SNR here for the debiased weight (SNR is ~infinite at t=0).
DEBIASED_SNR_CAP = 1000.0


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
    # min(SNR, g) / SNR -> 1 as SNR -> 0 (the last timestep with training.zero_terminal_snr).
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s))


def v_pred_scale(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR+1), SNR capped at 1000 (sd-scripts' get_snr_scale): the ratio of an eps-prediction
    loss to the v-prediction loss of the same error, 0 where SNR is 0."""
    s = torch.clamp(snr(scheduler, timesteps), max=DEBIASED_SNR_CAP)
    return s / (s + 1)


def scale_v_pred_like_noise_pred_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """scale_v_pred_loss_like_noise_pred: weight = SNR/(SNR+1), so a v-prediction loss weighs the
    timesteps as an eps-prediction loss does (sd-scripts' scale_v_prediction_loss_like_noise_prediction)."""
    return v_pred_scale(scheduler, timesteps)


def v_pred_like_loss_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, amount: float) -> torch.Tensor:
    """v_pred_like_loss: loss + amount * loss * (SNR+1)/SNR, i.e. weight = 1 + amount / (SNR/(SNR+1))
    (sd-scripts' add_v_prediction_like_loss); infinite where SNR is 0 (TrainingConfig refuses
    zero_terminal_snr with it)."""
    return 1.0 + amount / v_pred_scale(scheduler, timesteps)


def debiased_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1/sqrt(SNR) for eps-, 1/(SNR+1) for v-prediction,
    SNR capped at 1000 as in sd-scripts."""
    s = torch.clamp(snr(scheduler, timesteps), max=DEBIASED_SNR_CAP)
    if scheduler.config.prediction_type == "v_prediction":
        return 1.0 / (s + 1)
    return 1.0 / torch.sqrt(s)


def huber_threshold(
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    schedule: HuberSchedule | str,
    huber_c: float,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """The huber/smooth_l1 threshold per sample [B], as sd-scripts' huber_schedule computes it.

    constant: huber_c * scale; exponential: scale * huber_c^(t/T) (scale at t=0, huber_c*scale
    at t=T); snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1-abar)/abar)
    (sd-scripts leaves huber_scale out of this one).
    """
    schedule = HuberSchedule(schedule)
    t = timesteps.float()
    if schedule == HuberSchedule.constant:
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == HuberSchedule.exponential:
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: LossType | str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per element. huber: 2c(sqrt(d^2+c^2)-c) (~ d^2 for |d| << c, ~ 2c|d| beyond);
    smooth_l1: 2(sqrt(d^2+c^2)-c) (~ d^2/c, then ~ 2|d|). `huber_c` is [B]."""
    loss_type = LossType(loss_type)
    if loss_type == LossType.l2:
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == LossType.l1:
        return F.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type.value} needs huber_c")
    c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss_type == LossType.huber else 2 * root


def apply_masked_loss(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_loss: loss[b, c, y, x] * m[b, y, x], m the mask (0..1) area-averaged to the loss's size
    (sd-scripts' custom_train_functions.apply_masked_loss).

    `mask` is [B, H, W] or [B, 1, H, W] at any size (pixels or latents); every channel of a
    sample shares it. The caller then takes the plain mean, as sd-scripts does: a masked-out
    element counts as a zero, so a half-masked image weighs about half as much (not a mean
    over the unmasked area).
    """
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[0] != loss.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, H, W] or [B, 1, H, W] for a loss of {tuple(loss.shape)}, "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    mask = mask.to(loss.device, loss.dtype)
    if tuple(mask.shape[2:]) != tuple(loss.shape[2:]):
        mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    return loss * mask


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
    *,
    loss_type: LossType | str = LossType.l2,
    huber_schedule: HuberSchedule | str = HuberSchedule.snr,
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
    debiased_estimation: bool = False,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: float | None = None,
    masks: torch.Tensor | None = None,
    weighting: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss (loss_type), optionally min-SNR, v-prediction-like and debiased weighted
    (sd-scripts' post_process_loss order), averaged over the batch.

    `weighting` (FLUX's sigma_scaled loss weight, [B, 1, 1, 1]) multiplies the elementwise loss
    before the masks, where sd-scripts' train_network.py applies it.

    `weights` [B] scales each sample's loss before the mean (sd-scripts' loss_weights:
    1 for train images, prior_loss_weight for regularization images). `masks` [B, H, W]
    (0..1) weigh each element first (apply_masked_loss: training.masked_loss, dataset.alpha_mask).
    """
    timesteps = timesteps.to(pred.device)
    threshold = None
    if LossType(loss_type) in (LossType.huber, LossType.smooth_l1):
        threshold = huber_threshold(scheduler, timesteps, huber_schedule, huber_c, huber_scale)
    loss = elementwise_loss(pred.float(), target.float(), loss_type, threshold)
    if weighting is not None:
        loss = loss * weighting.to(loss.device)
    if masks is not None:
        loss = apply_masked_loss(loss, masks)
    loss = loss.mean(dim=(1, 2, 3))
    if weights is not None:
        if weights.shape != loss.shape:
            raise ValueError(f"weights must have one value per sample {tuple(loss.shape)}, got {tuple(weights.shape)}")
        loss = loss * weights.to(loss.device, loss.dtype)
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler, timesteps, min_snr_gamma).to(loss.device)
    if scale_v_pred_loss_like_noise_pred:
        loss = loss * scale_v_pred_like_noise_pred_weight(scheduler, timesteps).to(loss.device)
    if v_pred_like_loss:
        loss = loss * v_pred_like_loss_weight(scheduler, timesteps, v_pred_like_loss).to(loss.device)
    if debiased_estimation:
        loss = loss * debiased_weight(scheduler, timesteps).to(loss.device)
    return loss.mean()
