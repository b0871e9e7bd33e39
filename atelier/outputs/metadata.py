"""ss_* and modelspec.* metadata for kohya LoRA files (all values are strings)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from omegaconf import DictConfig

from atelier.config.schema import ModelVersion, part_learning_rates
from atelier.network.spec import kohya_module, kohya_network_args

BASE_MODEL_VERSIONS = {
    (ModelVersion.sd1, False): "sd_v1",
    (ModelVersion.sd2, False): "sd_v2",
    (ModelVersion.sd2, True): "sd_v2_v",
    (ModelVersion.sdxl, False): "sdxl_base_v1-0",
}
MODELSPEC_ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sd_v2_v": "stable-diffusion-v2-768-v",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
}


def _str(value: Any) -> str:
    return "None" if value is None else str(value)


def base_model_version(version: ModelVersion | str, v_parameterization: bool) -> str:
    version = ModelVersion(version)
    return BASE_MODEL_VERSIONS.get((version, v_parameterization), f"{version.value}{'_v' if v_parameterization else ''}")


def training_metadata(
    cfg: DictConfig,
    *,
    base_model_name: str,
    optimizer_name: str,
    dataset_dirs: dict[str, dict[str, int]],
    tag_frequency: dict[str, dict[str, int]],
    num_train_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    started_at: float,
    num_reg_images: int = 0,
    bucket_info: dict[str, Any] | None = None,
    cache_latents: bool = True,
) -> dict[str, str]:
    """Metadata known when training starts; `checkpoint_metadata` adds the rest.

    num_reg_images: reg images x repeats (sd-scripts' count); bucket_info: as
    atelier.data.buckets.bucket_info; cache_latents: whether latents were cached.
    """
    t, net, opt = cfg.training, cfg.network, cfg.optimizer
    base_version = base_model_version(cfg.model.version, cfg.model.v_parameterization)
    res = cfg.dataset.resolution
    rates = part_learning_rates(opt)
    unet_lr = None if net.train_text_encoder_only else rates.unet
    te_lr = None if net.train_unet_only else rates.text_encoder
    meta = {
        "ss_output_name": cfg.output.output_name,
        "ss_network_module": kohya_module(net),
        "ss_network_dim": net.dim,
        "ss_network_alpha": net.alpha,
        "ss_network_dropout": net.dropout,
        "ss_network_args": json.dumps(kohya_network_args(net)),
        "ss_scale_weight_norms": net.scale_weight_norms,
        "ss_network_weights": net.weights,
        "ss_base_model_version": base_version,
        "ss_v2": cfg.model.version == ModelVersion.sd2,
        "ss_v_parameterization": cfg.model.v_parameterization,
        "ss_sd_model_name": base_model_name,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": te_lr,
        "ss_optimizer": optimizer_name,
        "ss_lr_scheduler": cfg.scheduler.type.value if hasattr(cfg.scheduler.type, "value") else cfg.scheduler.type,
        "ss_lr_scheduler_num_cycles": cfg.scheduler.num_cycles,
        "ss_lr_scheduler_power": cfg.scheduler.power,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_batch_size_per_device": t.train_batch_size,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_mixed_precision": t.mixed_precision.value if hasattr(t.mixed_precision, "value") else t.mixed_precision,
        "ss_seed": t.seed,
        "ss_clip_skip": t.clip_skip,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_noise_offset": t.noise_offset or None,
        **noise_and_loss_metadata(t),
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_resolution": f"({res}, {res})",
        **dataset_metadata(cfg.dataset, bucket_info, cache_latents),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_started_at": started_at,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURES.get(base_version, base_version)}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if cfg.model.version == ModelVersion.sdxl
        else "diffusers",
        "modelspec.title": cfg.output.output_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if cfg.model.v_parameterization else "epsilon",
    }
    if not net.weights:
        del meta["ss_network_weights"]
    if t.min_timestep is not None or t.max_timestep is not None:
        # sd-scripts' get_sai_model_spec: the range trained on, the missing end filled in.
        low = 0 if t.min_timestep is None else t.min_timestep
        high = 1000 if t.max_timestep is None else t.max_timestep
        meta["modelspec.timestep_range"] = f"{low},{high}"
    return {k: _str(v) for k, v in meta.items()}


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def noise_and_loss_metadata(t: Any) -> dict[str, Any]:
    """sd-scripts' keys for the noise and loss options of TrainingConfig (train_network.py)."""
    return {
        "ss_adaptive_noise_scale": t.adaptive_noise_scale,
        "ss_multires_noise_iterations": t.multires_noise_iterations,
        "ss_multires_noise_discount": t.multires_noise_discount,
        "ss_ip_noise_gamma": t.ip_noise_gamma,
        "ss_zero_terminal_snr": t.zero_terminal_snr,
        "ss_debiased_estimation": bool(t.debiased_estimation_loss),
        "ss_loss_type": _value(t.loss_type),
        "ss_huber_schedule": _value(t.huber_schedule),
        "ss_huber_c": t.huber_c,
        "ss_huber_scale": t.huber_scale,
    }


def dataset_metadata(d: Any, bucket_info: dict[str, Any] | None, cache_latents: bool) -> dict[str, Any]:
    """sd-scripts' dataset keys; bucket sizes are None with bucketing off, as there."""
    bucketing = bool(d.enable_bucket)
    meta = {
        "ss_enable_bucket": bucketing,
        "ss_min_bucket_reso": d.min_bucket_reso if bucketing else None,
        "ss_max_bucket_reso": d.max_bucket_reso if bucketing else None,
        "ss_bucket_no_upscale": d.bucket_no_upscale if bucketing else None,
        "ss_cache_latents": cache_latents,
        "ss_caption_extension": d.caption_extension,
        "ss_keep_tokens": d.keep_tokens,
        "ss_shuffle_caption": d.shuffle_caption,
        "ss_caption_dropout_rate": d.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": d.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": d.caption_tag_dropout_rate,
        "ss_max_token_length": d.max_token_length,
        "ss_flip_aug": d.flip_aug,
        "ss_color_aug": d.color_aug,
        "ss_random_crop": d.random_crop,
        "ss_prior_loss_weight": d.prior_loss_weight,
    }
    if bucket_info is not None:
        meta["ss_bucket_info"] = json.dumps(bucket_info)
    return meta


def checkpoint_metadata(base: dict[str, str], *, epoch: int, steps: int, finished_at: float) -> dict[str, str]:
    return {
        **base,
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_training_finished_at": str(finished_at),
        "modelspec.date": datetime.fromtimestamp(finished_at, timezone.utc).isoformat(timespec="seconds"),
    }
