"""Typed schemas for every config group.

Each YAML option under conf/<group>/ extends one of these dataclasses (see
`register_schemas`), so a typo'd key or a wrong type fails at compose time,
before any model is loaded. Field names follow kohya sd-scripts where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, NamedTuple, Optional

from omegaconf import MISSING, SI

from atelier.network.kinds import KINDS


class ModelVersion(str, Enum):
    sd1 = "sd1"
    sd2 = "sd2"
    sdxl = "sdxl"


# network.module: one member per entry of atelier.network.kinds.KINDS (documented there).
NetworkModule = Enum("NetworkModule", [(name, name) for name in KINDS], type=str, module=__name__)


class OptimizerType(str, Enum):
    AdamW = "AdamW"
    AdamW8bit = "AdamW8bit"
    Prodigy = "Prodigy"
    Lion = "Lion"
    Adafactor = "Adafactor"
    DAdaptAdam = "DAdaptAdam"
    Lion8bit = "Lion8bit"
    SGDNesterov = "SGDNesterov"
    # Needs optimizer.train()/eval() around training and sampling; the trainer does it.
    AdamWScheduleFree = "AdamWScheduleFree"


class SchedulerType(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    cosine_with_min_lr = "cosine_with_min_lr"
    inverse_sqrt = "inverse_sqrt"
    warmup_stable_decay = "warmup_stable_decay"
    piecewise_constant = "piecewise_constant"


class LossType(str, Enum):
    """sd-scripts' --loss_type."""

    l2 = "l2"
    l1 = "l1"
    huber = "huber"
    smooth_l1 = "smooth_l1"


class HuberSchedule(str, Enum):
    """How huber_c varies with the timestep (sd-scripts' --huber_schedule)."""

    constant = "constant"
    exponential = "exponential"
    snr = "snr"


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Attention(str, Enum):
    """The UNet's attention kernel (sd-scripts: --sdpa, --xformers; neither = math)."""

    sdpa = "sdpa"  # torch scaled_dot_product_attention (flash / memory-efficient kernels)
    math = "math"  # plain matmul + softmax (diffusers AttnProcessor)
    xformers = "xformers"  # needs the xformers package (CUDA)


class SavePrecision(str, Enum):
    float = "float"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class ModelConfig:
    name: str = MISSING
    # A diffusers folder or a single-file .safetensors checkpoint (sd-scripts:
    # --pretrained_model_name_or_path). Null when `builtin` names an embedded model.
    path: Optional[str] = MISSING
    builtin: Optional[str] = None
    # Local diffusers folder (configs + tokenizer) used to load a single-file
    # checkpoint offline.
    config: Optional[str] = None
    vae: Optional[str] = None
    # Pickled checkpoints (.ckpt/.pt/.bin) can run code when loaded; they are
    # refused unless this is true (and even then read with torch's weights-only loader).
    allow_pickle: bool = False
    version: ModelVersion = ModelVersion.sd1
    v_parameterization: bool = False
    # The resolution the model was trained at; the dataset's default.
    resolution: int = 512
    # Aspect-bucket bounds that suit that resolution: the dataset's defaults (conf/dataset/*.yaml
    # read them as ${model.min_bucket_reso} ...). sd-scripts' values fit 512-1024 px models; a
    # 64 px model needs smaller ones, or bucketing collapses to a single bucket.
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64


@dataclass
class NetworkConfig:
    module: NetworkModule = NetworkModule.lora
    dim: int = 8
    alpha: float = 4.0
    train_unet_only: bool = False
    train_text_encoder_only: bool = False
    # A kohya LoRA file to start from (sd-scripts: --network_weights); its
    # per-module rank and alpha replace `dim` and `alpha`. Its kind must match `module`.
    weights: Optional[str] = None
    # Rank / alpha of the 3x3 convs of ResnetBlock2D, Downsample2D, Upsample2D
    # (null: those blocks are not trained). conv_alpha null = 1.0, as in sd-scripts.
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    # Neuron dropout on the rank activations (sd-scripts --network_dropout; lora/locon).
    dropout: Optional[float] = None
    # Drop ranks / whole modules at random in each training step (network_args).
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    # LoKr: Kronecker factor of each layer's dimensions (-1: the most balanced split).
    factor: int = -1
    # DyLoRA: ranks learnt together per step; dim must be a multiple (null = 1).
    unit: Optional[int] = None
    # Cap the norm of every module's update after each optimizer step (sd-scripts
    # --scale_weight_norms; 1.0 is the usual value). Null: off.
    scale_weight_norms: Optional[float] = None


@dataclass
class OptimizerConfig:
    type: OptimizerType = MISSING
    learning_rate: float = 1e-4
    # The UNet's / text encoder's own rate; null means learning_rate, and 0 is a rate (that
    # part stays as it is). Read through part_learning_rates.
    unet_lr: Optional[float] = None
    text_encoder_lr: Optional[float] = None
    # Passed to the optimizer's constructor (sd-scripts: --optimizer_args).
    args: Dict[str, Any] = field(default_factory=dict)


class PartLearningRates(NamedTuple):
    unet: float
    text_encoder: float


def part_learning_rates(opt: OptimizerConfig) -> PartLearningRates:
    """The rates the UNet and text-encoder parts of a network train at, derived here only
    (the optimizer's groups, ss_unet_lr / ss_text_encoder_lr). `is None`, not `or`: a rate
    of 0 is set, not missing."""
    return PartLearningRates(
        unet=opt.learning_rate if opt.unet_lr is None else opt.unet_lr,
        text_encoder=opt.learning_rate if opt.text_encoder_lr is None else opt.text_encoder_lr,
    )


@dataclass
class SchedulerConfig:
    type: SchedulerType = MISSING
    # Warmup as a step count, or as a fraction of the total steps (set one).
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None
    # cosine_with_restarts: restarts; cosine_with_min_lr / warmup_stable_decay: half-cosines
    # (sd-scripts: --lr_scheduler_num_cycles).
    num_cycles: int = 1
    # polynomial (sd-scripts: --lr_scheduler_power).
    power: float = 1.0
    # cosine_with_min_lr, warmup_stable_decay: the final lr as a fraction of the start lr
    # (sd-scripts: --lr_scheduler_min_lr_ratio).
    min_lr_ratio: Optional[float] = None
    # warmup_stable_decay: length of the decay phase, as steps or a fraction of the total
    # (set one; sd-scripts: --lr_decay_steps).
    decay_steps: int = 0
    decay_ratio: Optional[float] = None
    # inverse_sqrt: lr = lr0 / sqrt((step + timescale - warmup) / timescale) after warmup
    # (null: the warmup steps, or 10000 without warmup; sd-scripts: --lr_scheduler_timescale).
    timescale: Optional[int] = None
    # piecewise_constant: diffusers' rules "mult:until_step,...,final_mult", e.g.
    # "1:100,0.5:200,0.1" (sd-scripts: --lr_scheduler_args step_rules=...).
    step_rules: Optional[str] = None


@dataclass
class DatasetConfig:
    """The training data and how it is fed (sd-scripts' dataset options, same names).

    Checked at the start of a run by atelier.train.dataset_options, which names the
    key of any bad value.
    """

    name: str = MISSING
    train_data_dir: str = MISSING
    caption_extension: str = ".txt"
    resolution: int = 512
    # Images whose header declares more pixels, or a longer side more than this many times
    # the shorter one, are refused before decoding (atelier.data.images.ImageLimits).
    max_image_pixels: int = 178_956_970
    max_aspect_ratio: float = 16.0
    # Images x repeats in one epoch; a folder like `1000000000_x` is a typo, not a plan.
    max_samples_per_epoch: int = 10_000_000
    # Aspect-ratio buckets (off: every image is cropped to resolution x resolution).
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    # VAE latents encoded once and reused; random_crop and color_aug turn it off.
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    # Default for the disk cache: <train_data_dir>/.atelier-latent-cache
    latent_cache_dir: Optional[str] = None
    # Text-encoder outputs encoded once per distinct caption when the text encoder
    # is not trained (network.train_unet_only) and captions never change.
    cache_text_encoder_outputs: bool = True
    # Processes that decode images when latents are encoded per step (0 = in the
    # training process); sd-scripts: --max_data_loader_n_workers.
    max_data_loader_n_workers: int = 0
    # Keep those worker processes from one epoch to the next instead of starting them
    # again each epoch (sd-scripts: --persistent_data_loader_workers, off there by default).
    persistent_data_loader_workers: bool = True
    # Captions, processed every step in this order: prefix/suffix, dropout, shuffle.
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    # 75, 150 or 225 tokens (null = 75); longer captions are encoded in 75-token chunks.
    max_token_length: Optional[int] = None
    # Augmentations.
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    # Regularization images (same N_name layout), balanced to the train images x repeats.
    reg_data_dir: Optional[str] = None
    prior_loss_weight: float = 1.0
    # Validation: this fraction of each concept folder's images is held out.
    validation_split: float = 0.0
    # Null: training.seed. Picks the held-out images and the validation noise.
    validation_seed: Optional[int] = None
    validate_every_n_epochs: Optional[int] = 1


@dataclass
class TrainingConfig:
    seed: int = 42
    # max_train_steps, when set, caps the run; otherwise max_train_epochs sets it.
    max_train_epochs: Optional[int] = 10
    max_train_steps: Optional[int] = None
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = MixedPrecision.no
    cpu: bool = False
    # Data-parallel processes for this one run (one per GPU in CUDA_VISIBLE_DEVICES, or
    # on the CPU with gloo). Each trains train_batch_size images a step, so a step sees
    # num_processes x train_batch_size x gradient_accumulation_steps images.
    num_processes: int = 1
    clip_skip: int = 1
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    # Noise and timesteps (sd-scripts' names and formulas; atelier.train.noise).
    # noise_offset grows by adaptive_noise_scale * |mean of each latent channel| (needs noise_offset).
    adaptive_noise_scale: Optional[float] = None
    # Multi-resolution (pyramid) noise: this many coarser noise levels, each weighted by discount^i.
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    # Input perturbation: the latents are noised with noise + gamma * N(0,1); the target stays noise.
    ip_noise_gamma: Optional[float] = None
    # Rescale the training noise schedule so the last timestep has SNR 0 (meant for v-prediction).
    zero_terminal_snr: bool = False
    # Timesteps are drawn from [min_timestep, max_timestep) (null: 0 and num_train_timesteps).
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    # Loss (atelier.train.losses).
    # Weight each sample by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v-prediction).
    debiased_estimation_loss: bool = False
    loss_type: LossType = LossType.l2
    # huber / smooth_l1 threshold: huber_c scheduled per timestep by huber_schedule, times huber_scale.
    huber_schedule: HuberSchedule = HuberSchedule.snr
    huber_c: float = 0.1
    huber_scale: float = 1.0
    # Speed (atelier.train.speed; each logs what it did, or why it does nothing here).
    attention: Attention = Attention.sdpa
    # UNet weights and activations in NHWC memory format (faster convolutions on GPUs).
    channels_last: bool = False
    # torch.compile the UNet (LoRA included); backend and mode as torch.compile takes them
    # (sd-scripts: --torch_compile, --dynamo_backend; mode: inductor's "default",
    # "reduce-overhead", "max-autotune", ...).
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    torch_compile_mode: Optional[str] = None
    # AdamW's fused CUDA kernel (optimizer.args fused=True) when the run is on a GPU;
    # ignored with a log line on a CPU or for other optimizers.
    fused_optimizer: bool = False
    # TF32 matmuls/convolutions on Ampere+ NVIDIA GPUs; a logged no-op elsewhere.
    allow_tf32: bool = False
    # Jobs of a sweep run in one process (the default launcher) load the base model once
    # and each get fresh modules over its weights (atelier.train.reuse), and share their
    # cached latents.
    reuse_base_model: bool = True
    # After training, turn the logged d*lr of an adaptive optimizer into lr_suggestion.json
    # (experiment=lr_find sets it; atelier.train.lr_find).
    suggest_lr: bool = False


@dataclass
class SamplingConfig:
    # Lines in sd-scripts syntax: "prompt --n negative --w 512 --h 512 --s 20 --l 7 --d 1".
    prompts: List[str] = field(default_factory=list)
    prompt_file: Optional[str] = None
    # Use only the first N prompts (debug runs).
    limit: Optional[int] = None
    # null: only after the last step.
    sample_every_n_epochs: Optional[int] = 5
    sampler: str = "ddim"
    # A prompt's --w / --h win over these.
    width: int = SI("${dataset.resolution}")
    height: int = SI("${dataset.resolution}")
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 1234


@dataclass
class OutputConfig:
    # The LoRA file's name (<output_name>.safetensors, -<epoch> for intermediate ones);
    # a name, not a path.
    output_name: str = SI("${project}")
    # An intermediate LoRA every n epochs (null: only the final one).
    save_every_n_epochs: Optional[int] = 5
    save_precision: SavePrecision = SavePrecision.float
    # Keep the training state (weights, optimizer, scheduler, RNGs, data position) in
    # training_state.pt, so a job started again in the same run dir continues from it.
    # Saved every n epochs / n steps and when the job gets SIGTERM, SIGUSR1 or SIGUSR2;
    # deleted when the run finishes.
    save_state: bool = True
    save_state_every_n_epochs: Optional[int] = 1
    save_state_every_n_steps: Optional[int] = None


@dataclass
class AtelierConfig:
    # Groups all studies of one dataset under outputs/<project>/ (default: the dataset's name).
    project: str = SI("${dataset.name}")
    # Set by a recipe (conf/experiment/); names the folder of its sweeps.
    recipe: Optional[str] = None
    # Re-running into the same run dir / hydra.sweep.dir: resume=true keeps finished runs
    # (a sweep skips its finished jobs, and runs the jobs whose config changed as new jobs).
    resume: bool = False
    # A run dir that holds a finished run, or a run of another config, is refused
    # (atelier/outputs/guard.py); overwrite=true moves its files into replaced-<time>/ first.
    overwrite: bool = False
    model: ModelConfig = MISSING
    network: NetworkConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    dataset: DatasetConfig = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ConfigStore name -> schema. A YAML option extends its group's schema with
# `defaults: [/schema/<group>@_here_, _self_]`.
SCHEMAS = {
    "atelier": AtelierConfig,
    "model": ModelConfig,
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "dataset": DatasetConfig,
    "training": TrainingConfig,
    "sampling": SamplingConfig,
    "output": OutputConfig,
}


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
