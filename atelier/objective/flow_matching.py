"""The flow-matching objective of FLUX.1 training, as sd-scripts trains it.

sd-scripts' options with its names and formulas (library/flux_train_utils.py:
get_noisy_model_input_and_timesteps, apply_model_prediction_type, time_shift,
get_lin_function; library/sd3_train_utils.py: FlowMatchEulerDiscreteScheduler,
compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3; library/flux_utils.py:
pack_latents, unpack_latents, prepare_img_ids; flux_train_network.get_noise_pred_and_target).

Rectified flow: x_sigma = (1 - sigma) * x_0 + sigma * noise, sigma in [0, 1] (1 = pure noise),
the model predicts the velocity noise - x_0, the timestep it is told is 1000 * sigma.
Every random draw takes an explicit CPU generator, so a run's noise stream depends only on its
seed (needed for resume) and not on the device; sd-scripts draws from the global RNG.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000  # sd-scripts' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
# "uniform" and "none" are the same: uniform density, weight 1 (sd-scripts' --weighting_scheme).
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")

# sd-scripts' argument defaults (add_flux_train_arguments, train_util.add_sd_models_arguments).
DEFAULT_TIMESTEP_SAMPLING = "sigma"
DEFAULT_SIGMOID_SCALE = 1.0
DEFAULT_DISCRETE_FLOW_SHIFT = 3.0
DEFAULT_MODEL_PREDICTION_TYPE = "sigma_scaled"
DEFAULT_GUIDANCE_SCALE = 3.5
DEFAULT_WEIGHTING_SCHEME = "uniform"
DEFAULT_LOGIT_MEAN = 0.0
DEFAULT_LOGIT_STD = 1.0
DEFAULT_MODE_SCALE = 1.29
# BFL's resolution-dependent shift: mu = 0.5 at 256 image tokens, 1.15 at 4096, linear between.
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096


def _check_choice(option: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{option}={value!r} is not one of: {', '.join(valid)}")
    return value


def _broadcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with like's number of dims (sd-scripts' sigmas.view(-1, 1, 1, 1))."""
    if per_sample.ndim == like.ndim:
        return per_sample
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))


# --- shifts and the discrete schedule ---------------------------------------------------------


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """e^mu / (e^mu + (1/t - 1)^sigma): moves t in (0, 1) towards 1 (more noise) for mu > 0;
    t = 0 stays 0, t = 1 stays 1 (sd-scripts' flux_train_utils.time_shift, BFL's sampling.py)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def lin_function(
    x1: float = BASE_SEQ_LEN, y1: float = BASE_SHIFT, x2: float = MAX_SEQ_LEN, y2: float = MAX_SHIFT
) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): x -> m*x + b, m = (y2-y1)/(x2-x1), b = y1 - m*x1
    (sd-scripts' flux_train_utils.get_lin_function)."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def flux_shift_mu(latent_height: int, latent_width: int) -> float:
    """mu of timestep_sampling=flux_shift: lin_function(256, 0.5, 4096, 1.15) at the image's token
    count (h//2) * (w//2), h, w the unpacked latent's size (each token a 2x2 latent patch).
    1024x1024 px (128x128 latent, 4096 tokens): 1.15; 512x512 px (1024 tokens): 0.63.
    sd-scripts: get_noisy_model_input_and_timesteps, "flux_shift" branch."""
    return lin_function()((latent_height // 2) * (latent_width // 2))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * s / (1 + (shift - 1) * s): SD3's timestep shift, = time_shift(ln shift, 1, s);
    shift > 1 moves sigmas towards 1 (sd-scripts' "shift" sampling, FlowMatchEulerDiscreteScheduler)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(
    shift: float = DEFAULT_DISCRETE_FLOW_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas), each [num_train_timesteps], descending: the training table of
    sd-scripts' sd3_train_utils.FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift):
    s_i = (N - i) / N for i = 0..N-1 (1 down to 1/N, no 0), sigma = shift_sigmas(s, shift),
    timestep = N * sigma."""
    # float32 linspace like numpy's there, so the table matches sd-scripts' to the bit
    s = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0) / num_train_timesteps
    sigmas = shift_sigmas(s, shift)
    return sigmas * num_train_timesteps, sigmas


# --- timestep sampling ------------------------------------------------------------------------


def timestep_density(
    weighting_scheme: str,
    batch_size: int,
    generator: torch.Generator,
    logit_mean: float = DEFAULT_LOGIT_MEAN,
    logit_std: float = DEFAULT_LOGIT_STD,
    mode_scale: float = DEFAULT_MODE_SCALE,
) -> torch.Tensor:
    """u in [0, 1] per sample [B], the position in the schedule to train (SD3 paper 3.1,
    arXiv:2403.03206; sd-scripts' compute_density_for_timestep_sampling):
    logit_normal: sigmoid(N(logit_mean, logit_std)); mode: 1 - u - s*(cos^2(pi*u/2) - 1 + u),
    u ~ U(0, 1), s = mode_scale; otherwise U(0, 1)."""
    _check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (batch_size,), generator=generator))
    u = torch.rand((batch_size,), generator=generator)
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(
    timestep_sampling: str,
    batch_size: int,
    generator: torch.Generator,
    latent_size: tuple[int, int] | None = None,
    sigmoid_scale: float = DEFAULT_SIGMOID_SCALE,
    discrete_flow_shift: float = DEFAULT_DISCRETE_FLOW_SHIFT,
    weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME,
    logit_mean: float = DEFAULT_LOGIT_MEAN,
    logit_std: float = DEFAULT_LOGIT_STD,
    mode_scale: float = DEFAULT_MODE_SCALE,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), each float32 [B], timesteps = num_train_timesteps * sigmas, as
    sd-scripts' get_noisy_model_input_and_timesteps draws them per timestep_sampling:

    uniform: sigma ~ U(0, 1). sigmoid: sigmoid(sigmoid_scale * N(0, 1)).
    shift: shift_sigmas(sigmoid(sigmoid_scale * N(0, 1)), discrete_flow_shift).
    flux_shift: time_shift(flux_shift_mu(*latent_size), 1, sigmoid(sigmoid_scale * N(0, 1))),
    latent_size the unpacked latent's (height, width).
    sigma: u = timestep_density(weighting_scheme, ...), index = floor(u * N) into the descending
    flow_match_schedule(discrete_flow_shift) table; sigma and timestep are that entry (u near 0
    is the noisiest). Only this mode uses weighting_scheme / logit_* / mode_scale for sampling.
    """
    _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
    _check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)  # a typo fails in every mode
    if timestep_sampling == "sigma":
        u = timestep_density(weighting_scheme, batch_size, generator, logit_mean, logit_std, mode_scale)
        # sd-scripts indexes with (u * N).long() unclamped; u can reach 1 (mode at u = 0, a
        # float32 sigmoid of a large normal), which there is an IndexError: take the last entry.
        indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
        timesteps, sigmas = flow_match_schedule(discrete_flow_shift, num_train_timesteps)
        return sigmas[indices], timesteps[indices]
    if timestep_sampling == "uniform":
        sigmas = torch.rand((batch_size,), generator=generator)
    else:
        sigmas = torch.sigmoid(sigmoid_scale * torch.randn((batch_size,), generator=generator))
        if timestep_sampling == "shift":
            sigmas = shift_sigmas(sigmas, discrete_flow_shift)
        elif timestep_sampling == "flux_shift":
            if latent_size is None:
                raise ValueError("timestep_sampling='flux_shift' needs latent_size (the latent's height, width)")
            sigmas = time_shift(flux_shift_mu(*latent_size), 1.0, sigmas)
    return sigmas, sigmas * num_train_timesteps


# --- model input, target, prediction and weighting --------------------------------------------


def flow_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) like latents. sd-scripts' FLUX training draws plain noise (torch.randn_like in
    flux_train_network.get_noise_pred_and_target): no noise_offset or multires noise there."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return noise.to(latents.device, latents.dtype)


def noisy_model_input(
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
) -> torch.Tensor:
    """x_sigma = (1 - sigma) * latents + sigma * noise, sigmas [B] broadcast over the latent.

    ip_noise_gamma (input perturbation, arXiv:2301.11706): noise -> noise + gamma * xi, xi ~ N(0, 1),
    in the input only (the target keeps `noise`); with ip_noise_gamma_random_strength gamma is
    U(0, 1) * ip_noise_gamma, one draw per batch. Draw order as sd-scripts' FLUX path: xi, then
    the strength (the SD path in atelier.objective.noise draws the strength first).
    """
    s = _broadcast(sigmas.to(latents.device, torch.float32), latents)
    if ip_noise_gamma:
        if generator is None:
            raise ValueError("ip_noise_gamma needs a generator (its perturbation is a random draw)")
        xi = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        gamma = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            gamma = torch.rand((), generator=generator).item() * ip_noise_gamma
        noise = noise.float() + gamma * xi
    noisy = (1.0 - s) * latents.float() + s * noise.float()
    return noisy.to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """noise - latents: the velocity d x_sigma / d sigma (flux_train_network: target = noise - latents)."""
    return noise - latents


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """The per-sample loss weight, shaped like sigmas (sd-scripts' compute_loss_weighting_for_sd3):
    sigma_sqrt: sigma^-2 (the name is sd-scripts'); cosmap: 2 / (pi * (1 - 2 sigma + 2 sigma^2));
    logit_normal, mode, none, uniform: 1 (those shape the sampling in sample_sigmas instead)."""
    _check_choice("weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def apply_model_prediction_type(
    model_pred: torch.Tensor,
    noisy_input: torch.Tensor,
    sigmas: torch.Tensor,
    model_prediction_type: str = DEFAULT_MODEL_PREDICTION_TYPE,
    weighting_scheme: str = DEFAULT_WEIGHTING_SCHEME,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction to compare with the target, loss weighting or None), sd-scripts'
    flux_train_utils.apply_model_prediction_type:

    raw: model_pred, None. additive: model_pred + noisy_input, None.
    sigma_scaled: model_pred * (-sigma) + noisy_input and loss_weighting(weighting_scheme, sigma)
    ([B, 1, 1, 1]); a velocity v gives x_sigma - sigma * v, the x_0 estimate (SD3's
    "precondition_outputs" form).
    """
    _check_choice("model_prediction_type", model_prediction_type, MODEL_PREDICTION_TYPES)
    if model_prediction_type == "raw":
        return model_pred, None
    if model_prediction_type == "additive":
        return model_pred + noisy_input, None
    s = _broadcast(sigmas.to(model_pred.device), model_pred)
    return model_pred * (-s) + noisy_input, loss_weighting(weighting_scheme, s)


def noisy_input_and_timesteps(
    latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    timestep_sampling: str = DEFAULT_TIMESTEP_SAMPLING,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    **sampling: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy input, timesteps [B], sigmas [B, 1, 1, 1]) for unpacked latents [B, C, H, W]:
    sample_sigmas (latent_size = (H, W); `sampling` its keyword options: sigmoid_scale,
    discrete_flow_shift, weighting_scheme, logit_mean, logit_std, mode_scale) then
    noisy_model_input, in the order sd-scripts' get_noisy_model_input_and_timesteps draws them.
    Timesteps stay float32 (sd-scripts casts them to the weight dtype; the transformer is given
    timesteps / 1000)."""
    latent_size = (latents.shape[-2], latents.shape[-1])
    sigmas, timesteps = sample_sigmas(timestep_sampling, latents.shape[0], generator, latent_size, **sampling)
    noisy = noisy_model_input(latents, noise, sigmas, generator, ip_noise_gamma, ip_noise_gamma_random_strength)
    return noisy, timesteps.to(latents.device), _broadcast(sigmas.to(latents.device), latents)


# --- FLUX's token layout ----------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4]: one token per 2x2 patch, row-major over patches, features
    ordered (c, py, px) (sd-scripts' flux_utils.pack_latents, einops
    "b c (h ph) (w pw) -> b (h w) (c ph pw)")."""
    b, c, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: the latent's size {height}x{width} must be even")
    x = latents.reshape(b, c, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (height // 2) * (width // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, packed_height: int, packed_width: int) -> torch.Tensor:
    """[B, h*w, C*4] -> [B, C, 2h, 2w], pack_latents' inverse (sd-scripts' flux_utils.unpack_latents);
    h, w = packed_height, packed_width (the latent's size // 2)."""
    b, n, features = tokens.shape
    if n != packed_height * packed_width or features % 4:
        raise ValueError(f"tokens {tuple(tokens.shape)} are not {packed_height}x{packed_width} packed 2x2 patches")
    x = tokens.reshape(b, packed_height, packed_width, features // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, packed_height * 2, packed_width * 2)


def img_ids(batch_size: int, packed_height: int, packed_width: int) -> torch.Tensor:
    """[B, h*w, 3] float32 position ids of the image tokens: (0, row, column) of each 2x2 patch,
    in pack_latents' order (sd-scripts' flux_utils.prepare_img_ids; FLUX's RoPE reads axes 1, 2)."""
    ids = torch.zeros(packed_height, packed_width, 3)
    ids[..., 1] = torch.arange(packed_height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(packed_width, dtype=torch.float32)[None, :]
    return ids.reshape(1, packed_height * packed_width, 3).repeat(batch_size, 1, 1)


def txt_ids(batch_size: int, seq_len: int) -> torch.Tensor:
    """[B, seq_len, 3] zeros: the T5 tokens' position ids (sd-scripts' strategy_flux
    FluxTextEncodingStrategy.encode_tokens: torch.zeros(B, L, 3)); text has no 2-D position."""
    return torch.zeros(batch_size, seq_len, 3)


def guidance_vector(
    batch_size: int, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, device: torch.device | str | None = None
) -> torch.Tensor:
    """[B] float32 filled with guidance_scale: the embedded guidance FLUX.1-dev (guidance-distilled)
    takes as input; schnell has no guidance embedder and ignores it (flux_train_network:
    torch.full((bsz,), float(args.guidance_scale)))."""
    return torch.full((batch_size,), float(guidance_scale), device=device)


__all__ = [
    "MODEL_PREDICTION_TYPES",
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLINGS",
    "WEIGHTING_SCHEMES",
    "apply_model_prediction_type",
    "flow_match_schedule",
    "flow_noise",
    "flow_target",
    "flux_shift_mu",
    "guidance_vector",
    "img_ids",
    "lin_function",
    "loss_weighting",
    "noisy_input_and_timesteps",
    "noisy_model_input",
    "pack_latents",
    "sample_sigmas",
    "shift_sigmas",
    "time_shift",
    "timestep_density",
    "txt_ids",
    "unpack_latents",
]
