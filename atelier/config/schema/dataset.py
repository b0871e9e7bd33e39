"""dataset: the training data and how it is fed (sd-scripts' dataset options, same names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

from atelier.config.schema.captions import CaptionOptions
from atelier.config.schema.checks import unresolved
from atelier.config.schema.enums import ResizeInterpolation
from atelier.config.schema.fields import option
from atelier.config.schema.subset import CAPTION_KEYS, SubsetConfig
from atelier.errors import DatasetError

log = logging.getLogger(__name__)

# sd-scripts' --max_token_length choices (null: CLIP's own 75).
SUPPORTED_MAX_TOKEN_LENGTHS = (75, 150, 225)
# Latents are 1/8 of the image.
RESOLUTION_MULTIPLE = 8


@dataclass
class DatasetConfig:
    """The training data and how it is fed (sd-scripts' dataset options, same names).

    __post_init__ checks every value (DatasetError naming the key); the folder itself is
    checked when it is scanned (atelier.data.dataset).
    """

    name: str = option(MISSING, doc="The dataset's name; the default project name.", kohya="names the project folder")
    train_data_dir: Optional[str] = option(
        MISSING, flag="train_data_dir", ss=("ss_dataset_dirs", "ss_tag_frequency"),
        doc="The folder that holds the N_name concept folders (N: repeats); null with dataset.subsets.",
    )
    subsets: List[SubsetConfig] = option(
        default_factory=list,
        doc="Image folders with their own options, instead of train_data_dir's N_name folders: each "
        "{image_dir: <the images' folder>, num_repeats: 1, class_tokens: null (the caption of an image without a "
        "caption file), is_reg: false (regularization images, balanced as reg_data_dir's), caption_extension} and "
        f"any caption option ({', '.join(CAPTION_KEYS)}); a caption option left out is the dataset's. "
        "Augmentations, masks and buckets stay dataset-wide. Set dataset.train_data_dir=null with it "
        "(conf/dataset/subsets.yaml).",
        kohya="sd-scripts' dataset config [[datasets.subsets]] (--dataset_config), same keys; its per-subset "
        "flip_aug / color_aug / random_crop / face_crop_aug_range / alpha_mask / resize_interpolation are "
        "dataset-wide here",
    )
    caption_extension: str = option(".txt", flag="caption_extension", ss="ss_caption_extension",
                                    doc="A caption is <image stem><caption_extension>.",
                                    kohya="sd-scripts' default is .caption")
    resolution: int = option(512, flag="resolution", ss="ss_resolution",
                             doc="The side of the square training area (dataset options: the model's).")
    max_image_pixels: int = option(
        178_956_970, doc="Images whose header declares more pixels are refused before decoding "
        "(atelier.data.images.ImageLimits).",
        kohya="atelier's header check before decoding (PIL's limit by default)",
    )
    max_aspect_ratio: float = option(16.0, doc="Images whose longer side is more than this many times the shorter "
                                     "one are refused before decoding.",
                                     kohya="atelier's header check before decoding")  # fmt: skip
    max_samples_per_epoch: int = option(10_000_000, doc="Images x repeats in one epoch; a folder like "
                                        "`1000000000_x` is a typo, not a plan.",
                                        kohya="atelier's cap on images x repeats")  # fmt: skip
    enable_bucket: bool = option(False, flag="enable_bucket", ss="ss_enable_bucket",
                                 doc="Aspect-ratio buckets (off: every image is cropped to resolution x resolution).")
    min_bucket_reso: int = option(256, flag="min_bucket_reso", ss="ss_min_bucket_reso",
                                  doc="The smallest bucket side (dataset options: the model's).")
    max_bucket_reso: int = option(1024, flag="max_bucket_reso", ss="ss_max_bucket_reso",
                                  doc="The largest bucket side (dataset options: the model's).")
    bucket_reso_steps: int = option(64, flag="bucket_reso_steps",
                                    doc="Bucket sides are multiples of this (dataset options: the model's).")
    bucket_no_upscale: bool = option(False, flag="bucket_no_upscale", ss="ss_bucket_no_upscale",
                                     doc="Small images get a bucket of their own size instead of being upscaled.")
    cache_latents: bool = option(True, flag="cache_latents", ss="ss_cache_latents",
                                 doc="VAE latents encoded once and reused; random_crop and color_aug turn it off.",
                                 kohya="on by default here")
    cache_latents_to_disk: bool = option(False, flag="cache_latents_to_disk",
                                         doc="Keep the latent cache on disk, for the next runs.")
    latent_cache_dir: Optional[str] = option(None, doc="The disk cache's folder (null: "
                                             "<train_data_dir or the first subset's image_dir>/.atelier-latent-cache).",
                                             kohya="sd-scripts writes its .npz caches beside the images")  # fmt: skip
    vae_batch_size: int = option(
        4, flag="vae_batch_size",
        doc="Images per VAE call when latents are encoded (building the cache, or each step without one): more is "
        "faster and takes more memory.",
        kohya="sd-scripts' default is 1",
    )
    cache_text_encoder_outputs: bool = option(
        True, doc="Text-encoder outputs encoded once per distinct caption when the text encoder is not trained "
        "(network.train_unet_only) and captions never change.",
        kohya="train_network.py (SD1/2) has no text-encoder cache; sdxl_train_network.py has",
    )
    max_data_loader_n_workers: int = option(
        0, flag="max_data_loader_n_workers",
        doc="Processes that decode images when latents are encoded per step (0 = in the training process).",
    )
    persistent_data_loader_workers: bool = option(
        True, flag="persistent_data_loader_workers",
        doc="Keep those worker processes from one epoch to the next instead of starting them again each epoch.",
        kohya="atelier's default is true; sd-scripts' is off",
    )
    shuffle_caption: bool = option(False, flag="shuffle_caption", ss="ss_shuffle_caption",
                                   doc="Shuffle the caption's tags every step (after prefix/suffix and dropout).")
    caption_separator: str = option(",", flag="caption_separator", doc="What separates a caption's tags.")
    keep_tokens: int = option(0, flag="keep_tokens", ss="ss_keep_tokens",
                              doc="The first N tags stay in place when shuffling.")
    keep_tokens_separator: str = option("", flag="keep_tokens_separator",
                                        doc="Tags before this separator stay in place when shuffling.")
    secondary_separator: Optional[str] = option(
        None, flag="secondary_separator",
        doc="A separator inside tags (e.g. ;;;) that shuffle and dropout keep together; it becomes "
        "caption_separator afterwards.",
    )
    enable_wildcard: bool = option(
        False, flag="enable_wildcard",
        doc="{a|b|c} in a caption picks one alternative each step ({{ }} are literal braces), and a caption "
        "file's non-blank lines are alternatives, one picked each step (off: its first line).",
        kohya="sd-scripts joins caption_prefix/suffix to the file's first/last line before picking one; here every "
        "line gets both",
    )
    token_warmup_min: int = option(1, flag="token_warmup_min",
                                   doc="Token warmup: the number of shuffled tags a caption keeps at step 0.")
    token_warmup_step: float = option(
        0.0, flag="token_warmup_step",
        doc="Token warmup: the step from which captions keep all their tags, growing linearly from "
        "token_warmup_min (below 1: that fraction of the run's steps; 0: off).",
    )
    caption_prefix: Optional[str] = option(None, flag="caption_prefix", doc="Text put before every caption.")
    caption_suffix: Optional[str] = option(None, flag="caption_suffix", doc="Text put after every caption.")
    caption_dropout_rate: float = option(0.0, flag="caption_dropout_rate", ss="ss_caption_dropout_rate",
                                         doc="The chance a step trains an image with an empty caption.")
    caption_tag_dropout_rate: float = option(0.0, flag="caption_tag_dropout_rate", ss="ss_caption_tag_dropout_rate",
                                             doc="The chance each tag is left out of a step's caption.")
    caption_dropout_every_n_epochs: int = option(
        0, flag="caption_dropout_every_n_epochs", ss="ss_caption_dropout_every_n_epochs",
        doc="Every n-th epoch trains without captions (0: never).",
    )
    max_token_length: Optional[int] = option(
        None, flag="max_token_length", ss="ss_max_token_length",
        doc="75, 150 or 225 tokens (null = 75); longer captions are encoded in 75-token chunks.",
    )
    weighted_captions: bool = option(
        False, flag="weighted_captions",
        doc="Captions may weight words A1111-style: (word) x1.1, [word] /1.1, (word:1.3), \\( for a literal "
        "bracket; each token's text-encoder output is multiplied by its weight. One "
        "bracket per tag: shuffle and tag dropout split captions at caption_separator, breaking '(a, b:1.2)'.",
        kohya="as train_network.py's strategy path: the states are scaled, the caption's mean is not restored "
        "(fine_tune.py's older get_weighted_text_embeddings restored it). sd-scripts writes no ss_* key for it",
    )
    flip_aug: bool = option(False, flag="flip_aug", ss="ss_flip_aug", doc="Flip images horizontally at random.")
    random_crop: bool = option(False, flag="random_crop", ss="ss_random_crop",
                               doc="Crop at a random place instead of the centre.")
    color_aug: bool = option(False, flag="color_aug", ss="ss_color_aug", doc="Shift the hue at random.")
    face_crop_aug_range: Optional[List[float]] = option(
        None, flag="face_crop_aug_range", ss="ss_face_crop_aug_range",
        doc="[low, high], e.g. [2.0, 4.0]: an image named <name>_<cx>_<cy>_<w>_<h> (its face's centre and size, "
        "as sd-scripts' detect_face_rotate.py writes) is scaled so the face is 1/high..1/low of the training "
        "side and cropped around it, at random each step (needs enable_bucket=false; other images are "
        "cropped as usual; the latent cache is then off).",
        kohya="sd-scripts takes it as a string 'low,high'; with cache_latents it is silently not applied there",
    )
    resize_interpolation: Optional[ResizeInterpolation] = option(
        None, flag="resize_interpolation", ss="ss_resize_interpolation",
        doc="The filter that scales images (PIL's of that name; area: PIL's box average). null: Lanczos.",
        kohya="sd-scripts scales with OpenCV but for lanczos (its bilinear/bicubic do not average when shrinking); "
        "its null is area when shrinking, lanczos when enlarging",
    )
    alpha_mask: bool = option(
        False, flag="alpha_mask",
        doc="The images' alpha channel is a loss mask (0..1; images without alpha: all ones): the loss of each "
        "latent pixel is multiplied by it. On by itself, as in sd-scripts; training.masked_loss names it too.",
        kohya="the pixels trained on are the alpha composited on white, as without alpha_mask (sd-scripts trains "
        "the raw RGB under the alpha)",
    )
    conditioning_data_dir: Optional[str] = option(
        None, flag="conditioning_data_dir",
        doc="Loss masks (with training.masked_loss): per training image a mask of the same file stem, its R channel "
        "0..1, in <conditioning_data_dir>/<concept folder>/ or, without that folder, <conditioning_data_dir>/; "
        "a missing mask fails before training.",
        kohya="sd-scripts: a dataset-config subset key (one folder per subset) and a flag",
    )
    reg_data_dir: Optional[str] = option(
        None, flag="reg_data_dir", ss="ss_num_reg_images",
        doc="Regularization images (same N_name layout), balanced to the train images x repeats.",
    )
    prior_loss_weight: float = option(1.0, flag="prior_loss_weight", ss="ss_prior_loss_weight",
                                      doc="The loss weight of the regularization images.")
    validation_split: float = option(
        0.0, flag="validation_split", doc="Validation: this fraction of each concept folder's images is held out.",
        kohya="recent sd-scripts; it holds out images across the dataset, not per concept folder",
    )
    validation_seed: Optional[int] = option(
        None, flag="validation_seed", doc="Picks the held-out images and the validation noise (null: training.seed).",
    )
    validate_every_n_epochs: Optional[int] = option(1, flag="validate_every_n_epochs",
                                                    doc="How often the validation loss is measured.")
    validate_every_n_steps: Optional[int] = option(
        None, flag="validate_every_n_steps",
        doc="Also measure the validation loss every this many steps (a search's pruner hears it sooner).",
    )
    max_validation_steps: Optional[int] = option(
        None, flag="max_validation_steps", ss="ss_max_validation_steps",
        doc="Measure the validation loss on the first n batches of held-out images only (batches of "
        "train_batch_size images of one size, each at every validation timestep); null: all of them.",
    )

    def __post_init__(self) -> None:
        """Raise DatasetError naming the first bad `dataset.*` value."""
        if unresolved(self.resolution) or unresolved(self.min_bucket_reso):
            return  # built with its defaults (the model's, by interpolation): checked once resolved
        problem = max_token_length_problem(self.max_token_length)
        if problem:
            raise DatasetError(f"dataset.{problem}")
        for name, minimum in (("resolution", 1), ("min_bucket_reso", 1), ("bucket_reso_steps", 1),
                              ("max_data_loader_n_workers", 0), ("max_image_pixels", 1),
                              ("max_samples_per_epoch", 1), ("vae_batch_size", 1)):  # fmt: skip
            if getattr(self, name) < minimum:
                raise DatasetError(f"dataset.{name} must be at least {minimum}, got {getattr(self, name)}")
        if self.resolution % RESOLUTION_MULTIPLE:
            fixed = max(RESOLUTION_MULTIPLE, round(self.resolution / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
            raise DatasetError(
                f"dataset.resolution={self.resolution}: {self.resolution} is not a multiple of "
                f"{RESOLUTION_MULTIPLE} (the latents are 1/8 of the image); pass e.g. dataset.resolution={fixed}"
            )
        if not self.max_aspect_ratio >= 1:  # also refuses NaN
            raise DatasetError(f"dataset.max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        if self.max_bucket_reso < self.min_bucket_reso:
            raise DatasetError(f"dataset.max_bucket_reso ({self.max_bucket_reso}) must not be below "
                               f"dataset.min_bucket_reso ({self.min_bucket_reso})")  # fmt: skip
        if self.prior_loss_weight < 0:
            raise DatasetError(f"dataset.prior_loss_weight must not be negative, got {self.prior_loss_weight}")
        if not 0.0 <= self.validation_split < 1.0:
            raise DatasetError(f"dataset.validation_split must be at least 0 and below 1, got {self.validation_split}")
        if self.validate_every_n_epochs is not None and self.validate_every_n_epochs < 1:
            raise DatasetError(f"dataset.validate_every_n_epochs must be at least 1, got {self.validate_every_n_epochs}")
        if self.validate_every_n_steps is not None and self.validate_every_n_steps < 1:
            raise DatasetError(f"dataset.validate_every_n_steps must be at least 1, got {self.validate_every_n_steps}")
        if self.max_validation_steps is not None and self.max_validation_steps < 1:
            # sd-scripts would measure nothing (min(0, batches) = 0 batches) and log no validation loss.
            raise DatasetError(f"dataset.max_validation_steps must be at least 1 (null: every validation batch), "
                               f"got {self.max_validation_steps}")
        if self.max_validation_steps is not None and not self.validation_split:
            raise DatasetError(f"dataset.max_validation_steps={self.max_validation_steps} caps the validation batches, "
                               "and dataset.validation_split is 0 (nothing is held out): set it (e.g. 0.2) or drop "
                               "dataset.max_validation_steps")
        caption_options(self)  # CaptionOptions' own rules (its messages start with the key)
        check_subsets(self)
        check_face_crop_aug_range(self)
        check_weighted_captions(self)
        if self.alpha_mask and self.conditioning_data_dir:
            raise DatasetError("dataset.alpha_mask and dataset.conditioning_data_dir both give loss masks (sd-scripts "
                               "uses one per subset): keep one of them")  # fmt: skip


def check_subsets(d: DatasetConfig) -> None:
    """One source of training images; subsets' own values checked, naming `dataset.subsets[i]`."""
    if unresolved(d.train_data_dir):
        return  # ??? : the missing-value error names it when it is read
    train = [s for s in d.subsets if not s.is_reg]
    if d.subsets and not train:
        raise DatasetError("dataset.subsets holds only regularization subsets (is_reg: true): add a subset of "
                           "training images (is_reg: false)")
    if train and d.train_data_dir is not None:
        raise DatasetError(
            f"dataset.train_data_dir={d.train_data_dir} and dataset.subsets both give training images: set "
            "dataset.train_data_dir=null to train on the subsets (dataset=subsets does), or drop dataset.subsets"
        )
    if not d.subsets and d.train_data_dir is None:
        raise DatasetError("dataset.train_data_dir is null and dataset.subsets is empty: give the folder of "
                           "N_name concept folders as dataset.train_data_dir, or the image folders as dataset.subsets")
    base = caption_options(d)
    names: dict[str, int] = {}
    for i, subset in enumerate(d.subsets):
        problem = subset.problem()
        if problem:
            raise DatasetError(f"dataset.subsets[{i}].{problem}")
        try:
            captions = subset.captions(base)
        except ValueError as err:  # its messages start with the key
            raise DatasetError(f"dataset.subsets[{i}].{err}") from None
        check_weighted_captions(d, captions, f"dataset.subsets[{i}]")
        # ss_dataset_dirs, ss_tag_frequency and the validation split key folders by name.
        name = Path(str(subset.image_dir)).expanduser().name
        if name in names:
            raise DatasetError(
                f"dataset.subsets[{names[name]}].image_dir and dataset.subsets[{i}].image_dir are both folders "
                f"named '{name}': the metadata (ss_dataset_dirs) and the validation split tell folders apart by "
                "name; rename one of them"
            )
        names[name] = i


def check_face_crop_aug_range(d: DatasetConfig) -> None:
    """Two sizes, low <= high, and no bucketing: sd-scripts crops faces only without buckets."""
    aug_range = d.face_crop_aug_range
    if aug_range is None:
        return
    if len(aug_range) != 2 or not 0 < aug_range[0] <= aug_range[1]:
        raise DatasetError(f"dataset.face_crop_aug_range must be [low, high] with 0 < low <= high (the face is scaled "
                           f"to 1/high..1/low of the training side), got {list(aug_range)}; e.g. [2.0, 4.0]")
    if d.enable_bucket:
        raise DatasetError("dataset.face_crop_aug_range crops at the resolution, without buckets (sd-scripts "
                           "ignores it with buckets): set dataset.enable_bucket=false or drop face_crop_aug_range")


def check_weighted_captions(d: DatasetConfig, captions: CaptionOptions | None = None, where: str = "dataset") -> None:
    """A separator made of weight syntax would be read as brackets, not split at."""
    if not d.weighted_captions:
        return
    captions = captions or caption_options(d)
    for name in ("caption_separator", "keep_tokens_separator", "secondary_separator"):
        value = getattr(captions, name) or ""
        if any(char in value for char in "()[]\\"):
            raise DatasetError(f"{where}.{name}={value!r} holds a bracket or backslash, which "
                               "dataset.weighted_captions reads as weight syntax: pick another "
                               f"{name} or set dataset.weighted_captions=false")


def max_token_length_problem(value: int | None) -> str | None:
    """What is wrong with a max_token_length (None: nothing); the one rule, also for tokenize_long."""
    if value is None or value in SUPPORTED_MAX_TOKEN_LENGTHS:
        return None
    return f"max_token_length must be 75, 150 or 225 ({', '.join(map(str, SUPPORTED_MAX_TOKEN_LENGTHS))}; null for 75), got {value}"


def caption_options(d: DatasetConfig) -> CaptionOptions:
    """The caption options of `d`, checked (DatasetError naming the key)."""
    try:
        return CaptionOptions(
            shuffle_caption=d.shuffle_caption,
            caption_separator=d.caption_separator,
            keep_tokens=d.keep_tokens,
            keep_tokens_separator=d.keep_tokens_separator or "",
            caption_prefix=d.caption_prefix,
            caption_suffix=d.caption_suffix,
            caption_dropout_rate=d.caption_dropout_rate,
            caption_tag_dropout_rate=d.caption_tag_dropout_rate,
            caption_dropout_every_n_epochs=d.caption_dropout_every_n_epochs,
            secondary_separator=d.secondary_separator or None,
            enable_wildcard=d.enable_wildcard,
            token_warmup_min=d.token_warmup_min,
            token_warmup_step=d.token_warmup_step,
        )
    except ValueError as err:  # its messages start with the option's name
        raise DatasetError(f"dataset.{err}") from None


def max_token_length(d: DatasetConfig) -> int:
    return d.max_token_length or 75


def cache_latents_wanted(d: DatasetConfig) -> bool:
    """sd-scripts: cache_latents_to_disk implies cache_latents."""
    return bool(d.cache_latents or d.cache_latents_to_disk)
