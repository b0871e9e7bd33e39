"""A family's training objective: what a step draws, how the denoiser is called, what its loss is.

A family's plug-in builds its objective (atelier.plugins.FamilyPlugin.objective):

- DiffusionObjective (SD1.x, SD2.x, SDXL): DDPM noise with sd-scripts' noise options, a
  UNet predicting the noise or v, the loss with min-SNR / debiased / v-pred weights
  (atelier.objective.noise, atelier.objective.losses).
- FlowMatchingObjective (FLUX.1): a straight path from the latents (sigma 0) to the noise
  (sigma 1), the transformer predicting the velocity noise - latents on packed 2x2 patches,
  sd-scripts' flux_train_network.get_noise_pred_and_target (atelier.objective.flow_matching).

Both draw from the batch's own generator, so a batch gets the same draws in any process and
after a resume; the loop calls the same four methods whatever the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from atelier.conditioning.flux_text import FluxText
from atelier.conditioning.unet_call import unet_prediction
from atelier.config.schema import TrainingConfig
from atelier.objective import flow_matching as fm
from atelier.objective.losses import diffusion_loss, training_target
from atelier.objective.noise import noisy_latents, sample_noise, sample_timesteps


@dataclass
class StepInputs:
    """What one batch's denoiser call takes (noisy, timesteps, hidden) and its loss needs."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    hidden: Any  # text conditioning: a tensor (SD1/2), SDXLText, FluxText
    sigmas: torch.Tensor | None = None  # flow matching's noise level per sample [B, 1, 1, 1]

    def shape_key(self) -> tuple:
        """Inputs with equal keys can be concatenated into one denoiser call."""
        return tuple(self.noisy.shape[1:]), text_shape(self.hidden), self.noisy.dtype


def text_shape(hidden: Any) -> tuple:
    if isinstance(hidden, torch.Tensor):
        return tuple(hidden.shape[1:])
    return tuple(tuple(value.shape[1:]) for value in vars(hidden).values())


TimeIds = torch.Tensor | Callable[[], torch.Tensor] | None


class Objective(Protocol):
    scheduler: Any  # the family's noise scheduler (its num_train_timesteps bounds the timesteps)

    def draw(self, latents: torch.Tensor, generator: torch.Generator, hidden: Any) -> StepInputs:
        """The batch's noise, timesteps and noisy latents (in this order from `generator`)."""

    def predict(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: Any,
                time_ids: TimeIds = None) -> torch.Tensor:  # fmt: skip
        """The denoiser's output, shaped like `noisy`."""

    def loss(self, inputs: StepInputs, pred: torch.Tensor, weights: torch.Tensor | None,
             masks: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """The batch's mean loss (weights: per sample; masks: per pixel)."""

    def at_timesteps(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> StepInputs:
        """Fixed draws (validation): the noisy latents at given integer timesteps in [0, 1000)."""

    def plain_target(self, inputs: StepInputs) -> torch.Tensor:
        """What an unweighted loss compares the prediction with (the validation loss)."""


class DiffusionObjective:
    """SD's DDPM objective with sd-scripts' options (the code the SD families always ran)."""

    def __init__(self, t: TrainingConfig, scheduler: Any):
        self.t, self.scheduler = t, scheduler

    def draw(self, latents: torch.Tensor, generator: torch.Generator, hidden: Any = None) -> StepInputs:
        t = self.t
        noise = sample_noise(latents, generator, t.noise_offset, t.adaptive_noise_scale, t.multires_noise_iterations,
                             t.multires_noise_discount, t.noise_offset_random_strength)  # fmt: skip
        timesteps = sample_timesteps(len(latents), self.scheduler, generator, t.min_timestep,
                                     t.max_timestep).to(latents.device)  # fmt: skip
        noisy = noisy_latents(self.scheduler, latents, noise, timesteps, generator, t.ip_noise_gamma,
                              t.ip_noise_gamma_random_strength)  # fmt: skip
        return StepInputs(latents, noise, timesteps, noisy, hidden)

    def predict(self, model, noisy, timesteps, hidden, time_ids: TimeIds = None) -> torch.Tensor:
        return unet_prediction(model, noisy, timesteps, hidden, time_ids)

    def loss(self, inputs: StepInputs, pred, weights=None, masks=None) -> torch.Tensor:
        t = self.t
        target = training_target(self.scheduler, inputs.latents, inputs.noise, inputs.timesteps)
        return diffusion_loss(
            pred, target, self.scheduler, inputs.timesteps, t.min_snr_gamma, weights,
            loss_type=t.loss_type, huber_schedule=t.huber_schedule, huber_c=t.huber_c,
            huber_scale=t.huber_scale, debiased_estimation=t.debiased_estimation_loss,
            scale_v_pred_loss_like_noise_pred=t.scale_v_pred_loss_like_noise_pred, v_pred_like_loss=t.v_pred_like_loss,
            masks=masks,
        )  # fmt: skip

    def at_timesteps(self, latents, noise, timesteps) -> StepInputs:
        return StepInputs(latents, noise, timesteps, self.scheduler.add_noise(latents, noise, timesteps), None)

    def plain_target(self, inputs: StepInputs) -> torch.Tensor:
        return training_target(self.scheduler, inputs.latents, inputs.noise, inputs.timesteps)


class FlowMatchingObjective:
    """FLUX.1's rectified flow, as sd-scripts trains it (flux_train_network.py)."""

    def __init__(self, t: TrainingConfig, scheduler: Any, guidance_embeds: bool):
        self.t, self.scheduler = t, scheduler
        # schnell has no guidance input; dev is given training.guidance_scale at every step.
        self.guidance = t.guidance_scale if guidance_embeds else None

    def draw(self, latents: torch.Tensor, generator: torch.Generator, hidden: Any = None) -> StepInputs:
        t = self.t
        noise = fm.flow_noise(latents, generator)
        noisy, timesteps, sigmas = fm.noisy_input_and_timesteps(
            latents, noise, generator, t.timestep_sampling.value, t.ip_noise_gamma, t.ip_noise_gamma_random_strength,
            sigmoid_scale=t.sigmoid_scale, discrete_flow_shift=t.discrete_flow_shift,
            weighting_scheme=t.weighting_scheme.value, logit_mean=t.logit_mean, logit_std=t.logit_std,
            mode_scale=t.mode_scale,
        )  # fmt: skip
        return StepInputs(latents, noise, timesteps, noisy, hidden, sigmas)

    def predict(self, model, noisy, timesteps, hidden: FluxText, time_ids: TimeIds = None) -> torch.Tensor:
        return flux_prediction(model, noisy, timesteps, hidden, self.guidance, self.t.apply_t5_attn_mask)

    def loss(self, inputs: StepInputs, pred, weights=None, masks=None) -> torch.Tensor:
        t = self.t
        pred, weighting = fm.apply_model_prediction_type(pred, inputs.noisy, inputs.sigmas,
                                                         t.model_prediction_type.value, t.weighting_scheme.value)
        return diffusion_loss(pred, self.plain_target(inputs), self.scheduler, inputs.timesteps, None, weights,
                              loss_type=t.loss_type, huber_schedule=t.huber_schedule, huber_c=t.huber_c,
                              huber_scale=t.huber_scale, masks=masks, weighting=weighting)  # fmt: skip

    def at_timesteps(self, latents, noise, timesteps) -> StepInputs:
        sigmas = timesteps.float() / fm.NUM_TRAIN_TIMESTEPS
        noisy = fm.noisy_model_input(latents, noise, sigmas)
        return StepInputs(latents, noise, timesteps.float(), noisy, None, sigmas.view(-1, 1, 1, 1))

    def plain_target(self, inputs: StepInputs) -> torch.Tensor:
        return fm.flow_target(inputs.latents, inputs.noise)


def flux_prediction(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: FluxText,
    guidance: float | None,
    apply_t5_attn_mask: bool = False,
) -> torch.Tensor:
    """The FLUX transformer's velocity for unpacked noisy latents [B, C, H, W] at timesteps in
    [0, 1000]: flux_call on their 2x2 patches, unpacked again (sd-scripts' get_noise_pred_and_target)."""
    _, _, h, w = noisy.shape
    out = flux_call(transformer, fm.pack_latents(noisy), h // 2, w // 2, text,
                    timesteps.to(noisy.device) / fm.NUM_TRAIN_TIMESTEPS, guidance, apply_t5_attn_mask)  # fmt: skip
    return fm.unpack_latents(out, h // 2, w // 2)


def flux_call(
    transformer: torch.nn.Module,
    packed: torch.Tensor,
    rows: int,
    cols: int,
    text: FluxText,
    sigmas: torch.Tensor,
    guidance: float | None,
    apply_t5_attn_mask: bool = False,
) -> torch.Tensor:
    """The transformer on packed latent tokens [B, rows * cols, C * 4] at noise levels `sigmas` [B]
    (timestep / 1000), with their position ids, the guidance vector for a guidance-distilled model
    (None: schnell, no guidance input), and with apply_t5_attn_mask the text's padding masked out of
    the joint attention (sd-scripts' txt_attention_mask; the sequence is text first, then image)."""
    b, device = packed.shape[0], packed.device
    kwargs: dict[str, Any] = {}
    if guidance is not None:
        kwargs["guidance"] = fm.guidance_vector(b, guidance, device)
    if apply_t5_attn_mask:
        keys = torch.cat([text.t5_mask.to(device).bool(), torch.ones(b, packed.shape[1], dtype=torch.bool,
                                                                     device=device)], dim=1)  # fmt: skip
        kwargs["joint_attention_kwargs"] = {"attention_mask": keys[:, None, None, :]}
    return transformer(
        hidden_states=packed,
        encoder_hidden_states=text.t5,
        pooled_projections=text.pooled,
        timestep=sigmas,
        img_ids=fm.img_ids(1, rows, cols)[0].to(device),  # 2-D ids: diffusers' form
        txt_ids=fm.txt_ids(1, text.t5.shape[1])[0].to(device),
        return_dict=False,
        **kwargs,
    )[0]


__all__ = ["DiffusionObjective", "FlowMatchingObjective", "Objective", "StepInputs", "flux_call", "flux_prediction",
           "text_shape"]
