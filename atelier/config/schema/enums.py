"""The closed choices of the config: each a str Enum, so a member compares equal to its YAML
spelling and OmegaConf refuses any other value at compose time."""

from __future__ import annotations

from enum import Enum

from atelier.config.network_kinds import KINDS


class ModelVersion(str, Enum):
    sd1 = "sd1"
    sd2 = "sd2"
    sdxl = "sdxl"
    flux1 = "flux1"


# network.module: one member per entry of atelier.config.network_kinds.KINDS (documented there).
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


class ResizeInterpolation(str, Enum):
    """sd-scripts' --resize_interpolation choices (atelier.data.images.RESAMPLING: the PIL filter of each)."""

    lanczos = "lanczos"
    nearest = "nearest"
    bilinear = "bilinear"
    linear = "linear"
    bicubic = "bicubic"
    cubic = "cubic"
    area = "area"


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


# FLUX.1's flow-matching options (sd-scripts' add_flux_train_arguments, atelier.objective.flow_matching).
class TimestepSampling(str, Enum):
    sigma = "sigma"
    uniform = "uniform"
    sigmoid = "sigmoid"
    shift = "shift"
    flux_shift = "flux_shift"


class ModelPredictionType(str, Enum):
    raw = "raw"
    additive = "additive"
    sigma_scaled = "sigma_scaled"


class WeightingScheme(str, Enum):
    sigma_sqrt = "sigma_sqrt"
    logit_normal = "logit_normal"
    mode = "mode"
    cosmap = "cosmap"
    none = "none"
    uniform = "uniform"


class TrainBlocks(str, Enum):
    """FLUX: which transformer blocks a LoRA trains (sd-scripts' lora_flux network_args train_blocks)."""

    all = "all"
    single = "single"
    double = "double"
