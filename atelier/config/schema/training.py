"""training: run length, batch, precision, noise and timesteps, loss, speed switches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from atelier.config.schema.enums import (
    Attention,
    HuberSchedule,
    LossType,
    MixedPrecision,
)
from atelier.config.schema.checks import at_least
from atelier.config.schema.flow_matching import FlowMatchingOptions
from atelier.config.schema.fields import option
from atelier.errors import ConfigError

if TYPE_CHECKING:
    from atelier.config.schema.dataset import DatasetConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig(FlowMatchingOptions):  # FLUX's options: atelier/config/schema/flow_matching.py
    seed: int = option(42, flag="seed", ss="ss_seed", doc="Seeds the weights' init, the noise and the data order.")
    max_train_epochs: Optional[int] = option(10, flag="max_train_epochs", ss="ss_num_epochs",
                                             doc="The run's length in epochs, unless max_train_steps is set.")
    max_train_steps: Optional[int] = option(
        None, flag="max_train_steps", ss="ss_max_train_steps",
        doc="When set, caps the run (max_train_epochs is then ignored).",
        kohya="sd-scripts lets max_train_epochs win when both are set; here steps win, and export-kohya gives it "
        "only --max_train_steps",
    )
    train_batch_size: int = option(2, flag="train_batch_size", ss="ss_batch_size_per_device",
                                   doc="Images per step (per process).")
    gradient_accumulation_steps: int = option(1, flag="gradient_accumulation_steps",
                                              ss="ss_gradient_accumulation_steps",
                                              doc="Steps whose gradients add up before each optimizer step.")
    gradient_checkpointing: bool = option(False, flag="gradient_checkpointing", ss="ss_gradient_checkpointing",
                                          doc="Recompute activations in the backward pass: less memory, slower.")
    mixed_precision: MixedPrecision = option(MixedPrecision.no, flag="mixed_precision", ss="ss_mixed_precision",
                                             doc="Autocast the forward pass to fp16 or bf16.",
                                             kohya="also given to accelerate launch")
    # sd-scripts' experimental full-precision-reduced training (train_network.py: network.to(weight_dtype)).
    full_bf16: bool = option(
        False, flag="full_bf16",
        doc="Keep the network's weights, gradients and optimizer state in bf16 too, not only the forward pass "
        "(less memory, coarser updates; needs mixed_precision=bf16).",
    )
    full_fp16: bool = option(
        False, flag="full_fp16", ss="ss_full_fp16",
        doc="Keep the network's weights, gradients and optimizer state in fp16 (loss scaling unscales fp16 "
        "gradients; needs mixed_precision=fp16, a CUDA GPU). Prone to overflow: bf16 is the safer choice.",
        kohya="sd-scripts writes ss_full_fp16 False on every run; here the key is written when it is on",
    )
    # sd-scripts' fp8 storage of the frozen base weights (train_network.py: unet.to(float8_e4m3fn)).
    fp8_base: bool = option(
        False, flag="fp8_base", ss="ss_fp8_base",
        doc="Keep the frozen UNet's and text encoders' Linear/Conv weights in fp8 (half the memory of bf16), "
        "cast up to the mixed_precision dtype where they are used; needs mixed_precision=bf16 or fp16.",
    )
    fp8_base_unet: bool = option(
        False, flag="fp8_base_unet", ss="ss_fp8_base_unet",
        doc="fp8 storage for the UNet only (the text encoders keep the mixed_precision dtype), even with fp8_base.",
    )
    resume_from: Optional[str] = option(
        None, flag="resume",
        doc="A training state file to train on from, in a new run dir: <output_name>-state.pt "
        "(output.save_state_on_train_end), a kept <output_name>-<epoch>-state.pt, or a run's training_state.pt. "
        "The network, optimizer (its learning rates included), schedule position, RNGs and step count go on from "
        "it; the config may differ (more epochs, ...), the network's kind and shape may not.",
        kohya="sd-scripts' --resume takes a state folder",
    )
    # Where the run starts counting (atelier/loop/run_start.py), as train_network.py reads them.
    initial_epoch: Optional[int] = option(
        None, flag="initial_epoch",
        doc="Number the run's epochs from this one (1: as without it): it trains the epochs from this one to the "
        "last, each whole, its steps counted from 0, so it is shorter. With skip_until_initial_step it starts at this "
        "epoch's first step instead. The learning-rate schedule starts at 0 (unless resume_from gives its position).",
    )
    initial_step: Optional[int] = option(
        None, flag="initial_step",
        doc="As initial_epoch, from the epoch this step (counted over all epochs, 0: the first) falls in; with "
        "skip_until_initial_step the run starts at this very step.",
        kohya="sd-scripts lets initial_step win when both are given; here both is an error",
    )
    skip_until_initial_step: bool = option(
        False, flag="skip_until_initial_step",
        doc="Start at initial_step (or initial_epoch's first step) and count on from it to the run's end, on the "
        "data an unbroken run would train from there (the epochs before are drawn, not loaded or trained).",
        kohya="sd-scripts skips the epochs before without drawing them, and counts steps as batches with "
        "gradient_accumulation_steps > 1",
    )
    cpu: bool = option(False, flag="cpu", doc="Train on the CPU even when a GPU is there.",
                       kohya="an accelerate launch option")
    num_processes: int = option(
        1, flag="num_processes",
        doc="Data-parallel processes for this one run (one per GPU in CUDA_VISIBLE_DEVICES, or on the CPU with "
        "gloo). Each trains train_batch_size images a step, so a step sees num_processes x train_batch_size x "
        "gradient_accumulation_steps images.",
        kohya="an accelerate launch option",
    )
    clip_skip: int = option(1, flag="clip_skip", ss="ss_clip_skip",
                            doc="Condition on the text encoder's n-th last layer (1: the last).")
    min_snr_gamma: Optional[float] = option(None, flag="min_snr_gamma", ss="ss_min_snr_gamma",
                                            doc="Min-SNR loss weighting: min(SNR, gamma) / SNR (null: off).")
    noise_offset: float = option(0.0, flag="noise_offset", ss="ss_noise_offset",
                                 doc="Adds noise_offset x N(0,1) per latent channel to the noise (0: off).")
    noise_offset_random_strength: bool = option(
        False, flag="noise_offset_random_strength", ss="ss_noise_offset_random_strength",
        doc="Each batch uses an offset drawn uniformly from 0..noise_offset instead of noise_offset itself.",
    )
    max_grad_norm: float = option(1.0, flag="max_grad_norm", ss="ss_max_grad_norm",
                                  doc="Clip the gradients' norm to this (0: no clipping).")
    adaptive_noise_scale: Optional[float] = option(
        None, flag="adaptive_noise_scale", ss="ss_adaptive_noise_scale",
        doc="noise_offset grows by adaptive_noise_scale x |mean of each latent channel| (needs noise_offset).",
    )
    multires_noise_iterations: Optional[int] = option(
        None, flag="multires_noise_iterations", ss="ss_multires_noise_iterations",
        doc="Multi-resolution (pyramid) noise: this many coarser noise levels, each weighted by discount^i.",
    )
    multires_noise_discount: float = option(0.3, flag="multires_noise_discount", ss="ss_multires_noise_discount",
                                            doc="The weight ratio of successive pyramid noise levels.")
    ip_noise_gamma: Optional[float] = option(
        None, flag="ip_noise_gamma", ss="ss_ip_noise_gamma",
        doc="Input perturbation: the latents are noised with noise + gamma x N(0,1); the target stays noise.",
    )
    ip_noise_gamma_random_strength: bool = option(
        False, flag="ip_noise_gamma_random_strength", ss="ss_ip_noise_gamma_random_strength",
        doc="Each batch uses a gamma drawn uniformly from 0..ip_noise_gamma instead of ip_noise_gamma itself.",
    )
    zero_terminal_snr: bool = option(
        False, flag="zero_terminal_snr", ss="ss_zero_terminal_snr",
        doc="Rescale the training noise schedule so the last timestep has SNR 0 (meant for v-prediction).",
    )
    min_timestep: Optional[int] = option(None, flag="min_timestep",
                                         doc="Timesteps are drawn from [min_timestep, max_timestep) (null: 0).")
    max_timestep: Optional[int] = option(None, flag="max_timestep",
                                         doc="The end of that range (null: num_train_timesteps).")
    debiased_estimation_loss: bool = option(
        False, flag="debiased_estimation_loss", ss="ss_debiased_estimation",
        doc="Weight each sample by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v-prediction).",
    )
    scale_v_pred_loss_like_noise_pred: bool = option(
        False, flag="scale_v_pred_loss_like_noise_pred",
        doc="v-prediction only: weight each sample by SNR/(SNR+1), so the loss scales like an eps-prediction loss.",
    )
    v_pred_like_loss: Optional[float] = option(
        None, flag="v_pred_like_loss",
        doc="eps-prediction only: add this times a v-prediction-like loss, loss x (1 + value x (SNR+1)/SNR).",
    )
    loss_type: LossType = option(LossType.l2, flag="loss_type", ss="ss_loss_type",
                                 doc="The loss between prediction and target (atelier.objective.losses).")
    huber_schedule: HuberSchedule = option(HuberSchedule.snr, flag="huber_schedule", ss="ss_huber_schedule",
                                           doc="How huber_c varies with the timestep.")
    huber_c: float = option(0.1, flag="huber_c", ss="ss_huber_c",
                            doc="huber / smooth_l1 threshold, scheduled per timestep by huber_schedule.")
    huber_scale: float = option(1.0, flag="huber_scale", ss="ss_huber_scale", doc="Multiplies huber_c.",
                                kohya="recent sd-scripts; left out at its default 1.0 for older ones")
    masked_loss: bool = option(
        False, flag="masked_loss",
        doc="Multiply the loss by a mask (0 = ignored, 1 = trained): dataset.alpha_mask or "
        "dataset.conditioning_data_dir gives it; the mean stays over all pixels (sd-scripts' apply_masked_loss).",
    )
    attention: Attention = option(Attention.sdpa, flag="sdpa",
                                  doc="The UNet's attention kernel (atelier.loop.speed logs what it did).",
                                  kohya="xformers: --xformers; math: neither switch")
    channels_last: bool = option(False, doc="UNet weights and activations in NHWC memory format (faster "
                                 "convolutions on GPUs).", kohya="sd-scripts has no channels_last switch")  # fmt: skip
    torch_compile: bool = option(False, flag="torch_compile", doc="torch.compile the UNet (LoRA included).")
    dynamo_backend: str = option("inductor", flag="dynamo_backend", doc="torch.compile's backend.")
    torch_compile_mode: Optional[str] = option(
        None, doc='torch.compile\'s mode: inductor\'s "default", "reduce-overhead", "max-autotune", ...',
        kohya="sd-scripts' --torch_compile uses torch.compile's default mode",
    )
    fused_optimizer: bool = option(
        False, doc="AdamW's fused CUDA kernel (optimizer.args fused=True) when the run is on a GPU; ignored with "
        "a log line on a CPU or for other optimizers.",
        kohya="pass optimizer_args fused=True to sd-scripts (AdamW, SGD)",
    )
    allow_tf32: bool = option(False, doc="TF32 matmuls/convolutions on Ampere+ NVIDIA GPUs; a logged no-op elsewhere.",
                              kohya="sd-scripts leaves torch's TF32 defaults")
    reuse_base_model: bool = option(
        True, doc="Jobs of a sweep run in one process (the default launcher) load the base model once and each "
        "get fresh modules over its weights (atelier.runtime.reuse), and share their cached latents.",
        kohya="atelier's in-process sweeps; sd-scripts trains one run per process",
    )
    suggest_lr: bool = option(
        False, doc="After training, turn the logged d*lr of an adaptive optimizer into lr_suggestion.json "
        "(experiment=lr_find sets it; atelier.loop.lr_find).",
        kohya="atelier's lr finder (experiment=lr_find): reads the logged d*lr into lr_suggestion.json",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("train_batch_size", "gradient_accumulation_steps", "clip_skip", "num_processes"):
            at_least(f"training.{key}", getattr(self, key), 1)
        # The run's length (atelier.data.plan): steps win when both are set.
        if self.max_train_steps is not None:
            at_least("training.max_train_steps", self.max_train_steps, 1)
        elif self.max_train_epochs is not None:
            at_least("training.max_train_epochs", self.max_train_epochs, 1)
        else:
            raise ConfigError("set training.max_train_epochs or training.max_train_steps")
        # sd-scripts ignores a random strength whose range is 0..0 without a word.
        if self.noise_offset_random_strength and not self.noise_offset:
            raise ConfigError("training.noise_offset_random_strength draws the offset from 0..training.noise_offset, "
                              "which is 0: set training.noise_offset (e.g. 0.1) or drop the random strength")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise ConfigError("training.ip_noise_gamma_random_strength draws gamma from 0..training.ip_noise_gamma, "
                              "which is not set: set training.ip_noise_gamma (e.g. 0.1) or drop the random strength")
        for full, precision in (("full_bf16", MixedPrecision.bf16), ("full_fp16", MixedPrecision.fp16)):
            if getattr(self, full) and self.mixed_precision != precision:
                # sd-scripts asserts the same (train_network.py); the network's dtype is the autocast one.
                raise ConfigError(f"training.{full} keeps the network in {precision.value}: it needs "
                                  f"training.mixed_precision={precision.value} (got {self.mixed_precision.value})")
        for name in ("fp8_base", "fp8_base_unet"):
            if getattr(self, name) and self.mixed_precision == MixedPrecision.no:
                # sd-scripts asserts the same: the weights are used in the autocast dtype.
                raise ConfigError(f"training.{name} stores the base weights in fp8 and computes in the "
                                  "mixed_precision dtype: set training.mixed_precision=bf16 (or fp16 on a GPU)")
        if self.resume_from is not None and not Path(self.resume_from).expanduser().is_file():
            raise ConfigError(f"training.resume_from={self.resume_from}: no such file; give a training state file "
                              "(<output_name>-state.pt, <output_name>-<epoch>-state.pt or training_state.pt)")
        check_run_start(self)
        if self.v_pred_like_loss is not None and self.v_pred_like_loss < 0:
            raise ConfigError(f"training.v_pred_like_loss must not be negative (a negative loss weight), got "
                              f"{self.v_pred_like_loss}; use e.g. 0.1, or null for off")

    def check_precision(self, cuda_available: bool) -> None:
        """fp16 needs a CUDA GPU (the trainer asks, with what it found)."""
        if not self.cpu and self.mixed_precision == MixedPrecision.fp16 and not cuda_available:
            raise ConfigError("training.mixed_precision=fp16 needs a CUDA GPU; on a CPU use bf16 or no")


def check_run_start(t: TrainingConfig) -> None:
    """initial_epoch / initial_step / skip_until_initial_step (where the run is past them is checked
    against its plan: atelier.loop.run_start)."""
    if t.initial_epoch is not None:
        at_least("training.initial_epoch", t.initial_epoch, 1)
    if t.initial_step is not None:
        at_least("training.initial_step", t.initial_step, 0)
    if t.initial_epoch is not None and t.initial_step is not None:
        raise ConfigError(f"training.initial_epoch={t.initial_epoch} and training.initial_step={t.initial_step} both "
                          "say where the run starts (sd-scripts lets the step win): drop one")
    if t.skip_until_initial_step and t.initial_epoch is None and t.initial_step is None:
        raise ConfigError("training.skip_until_initial_step skips to training.initial_step or initial_epoch, and "
                          "neither is set: set one (training.resume_from continues at its state's step by itself)")


def check_noise_options(t: TrainingConfig, v_parameterization: bool) -> None:
    """The noise and loss options together (AtelierConfig checks them: some need the model's
    prediction type): combinations sd-scripts refuses, or that would give an infinite loss weight."""
    if t.adaptive_noise_scale is not None and not t.noise_offset:
        raise ConfigError(
            "training.adaptive_noise_scale scales training.noise_offset, which is 0: set "
            "training.noise_offset (e.g. 0.05) or drop adaptive_noise_scale"
        )
    if t.multires_noise_iterations is not None and t.multires_noise_iterations < 0:
        raise ConfigError(f"training.multires_noise_iterations must be >= 0, got {t.multires_noise_iterations}")
    check_v_pred_loss_options(t, v_parameterization)
    if t.zero_terminal_snr and not v_parameterization:
        if t.debiased_estimation_loss:
            raise ConfigError(
                "training.debiased_estimation_loss with training.zero_terminal_snr needs "
                "model.v_parameterization=true: the last timestep has SNR 0 and its eps weight "
                "1/sqrt(SNR) is infinite"
            )
        log.warning(
            "training.zero_terminal_snr without model.v_parameterization: the last timestep is pure "
            "noise, which an eps-prediction model predicts trivially (sd-scripts warns the same)"
        )


# sd-scripts' SD noise and loss options that FLUX's flow matching has no use for (its FLUX script
# draws plain noise and leaves the loss unweighted by SNR: flux_train_network.py).
DDPM_ONLY = ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
             "min_snr_gamma", "zero_terminal_snr", "min_timestep", "max_timestep", "debiased_estimation_loss",
             "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "clip_skip")  # fmt: skip


def check_flow_matching_run(t: TrainingConfig, label: str) -> None:
    """A flow-matching family (FLUX.1) refuses the DDPM-only options above when set."""
    defaults = TrainingConfig()
    for key in DDPM_ONLY:
        if getattr(t, key) != getattr(defaults, key):
            raise ConfigError(f"training.{key}={getattr(t, key)}: an SD (DDPM) noise/loss option; {label} trains "
                              "with flow matching, which has no use for it (sd-scripts' FLUX script ignores it): drop "
                              "it; FLUX's own options are training.timestep_sampling, discrete_flow_shift, ...")
    if t.loss_type in (LossType.huber, LossType.smooth_l1) and t.huber_schedule == HuberSchedule.snr:
        raise ConfigError(f"training.huber_schedule=snr reads a DDPM schedule's SNR, which {label}'s flow matching "
                          "does not have: set training.huber_schedule=constant or exponential")


def check_v_pred_loss_options(t: TrainingConfig, v_parameterization: bool) -> None:
    """sd-scripts' rules for the two v-prediction loss scalings (train_util.verify_training_args)."""
    if t.scale_v_pred_loss_like_noise_pred and not v_parameterization:
        raise ConfigError("training.scale_v_pred_loss_like_noise_pred needs model.v_parameterization=true (it scales "
                          "a v-prediction loss); drop it for an eps-prediction model")
    if t.v_pred_like_loss and v_parameterization:
        raise ConfigError("training.v_pred_like_loss adds a v-prediction-like loss to an eps-prediction model; with "
                          "model.v_parameterization=true the loss already is one: drop training.v_pred_like_loss")
    if t.v_pred_like_loss and t.zero_terminal_snr:
        raise ConfigError("training.v_pred_like_loss with training.zero_terminal_snr: the last timestep has SNR 0 "
                          "and its weight (SNR+1)/SNR is infinite; drop one of the two")


def check_masked_loss(t: TrainingConfig, d: DatasetConfig) -> None:
    """training.masked_loss needs masks; dataset.conditioning_data_dir is read only with it (sd-scripts
    accepts the subset key only with --masked_loss). dataset.alpha_mask masks by itself, as there."""
    if t.masked_loss and not (d.alpha_mask or d.conditioning_data_dir):
        raise ConfigError("training.masked_loss multiplies the loss by a mask, and none is given: set "
                          "dataset.alpha_mask=true (the images' alpha) or dataset.conditioning_data_dir=<folder of "
                          "masks>, or drop training.masked_loss")  # fmt: skip
    if d.conditioning_data_dir and not t.masked_loss:
        raise ConfigError(f"dataset.conditioning_data_dir={d.conditioning_data_dir} holds loss masks, used only with "
                          "training.masked_loss: set training.masked_loss=true or drop the key")  # fmt: skip
