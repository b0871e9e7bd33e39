"""The `dataset:` config checked and turned into the data layer's option objects.

Every bad value raises DatasetError with a message that starts with its key, e.g.
"dataset.max_token_length must be 75, 150 or 225 ...", before any model is loaded.
"""

from __future__ import annotations


from atelier.config.schema import DatasetConfig
from atelier.conditioning.text_chunks import SUPPORTED_MAX_TOKEN_LENGTHS
from atelier.data.buckets import BucketSettings
from atelier.data.caption_ops import CaptionOptions
from atelier.data.errors import DatasetError
from atelier.data.images import ImageLimits

KEY = "dataset"


def check_dataset_options(d: DatasetConfig) -> None:
    """Raise DatasetError naming the first bad `dataset.*` value."""
    if d.max_token_length is not None and d.max_token_length not in SUPPORTED_MAX_TOKEN_LENGTHS:
        raise DatasetError(f"{KEY}.max_token_length must be 75, 150 or 225 (or null for 75), got {d.max_token_length}")
    _at_least(d, "resolution", 1)
    _at_least(d, "min_bucket_reso", 1)
    _at_least(d, "bucket_reso_steps", 1)
    _at_least(d, "max_data_loader_n_workers", 0)
    _at_least(d, "max_image_pixels", 1)
    _at_least(d, "max_samples_per_epoch", 1)
    if not d.max_aspect_ratio >= 1:  # also refuses NaN
        raise DatasetError(f"{KEY}.max_aspect_ratio must be at least 1, got {d.max_aspect_ratio}")
    if d.max_bucket_reso < d.min_bucket_reso:
        raise DatasetError(
            f"{KEY}.max_bucket_reso ({d.max_bucket_reso}) must not be below {KEY}.min_bucket_reso ({d.min_bucket_reso})"
        )
    if d.prior_loss_weight < 0:
        raise DatasetError(f"{KEY}.prior_loss_weight must not be negative, got {d.prior_loss_weight}")
    if not 0.0 <= d.validation_split < 1.0:
        raise DatasetError(f"{KEY}.validation_split must be at least 0 and below 1, got {d.validation_split}")
    if d.validate_every_n_epochs is not None:
        _at_least(d, "validate_every_n_epochs", 1)
    caption_options(d)
    bucket_settings(d)


def _at_least(d: DatasetConfig, name: str, minimum: int) -> None:
    value = getattr(d, name)
    if value < minimum:
        raise DatasetError(f"{KEY}.{name} must be at least {minimum}, got {value}")


def image_limits(d: DatasetConfig) -> ImageLimits:
    """The dataset.max_image_pixels / max_aspect_ratio checks, as the scanner takes them."""
    return ImageLimits(max_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio)


def caption_options(d: DatasetConfig) -> CaptionOptions:
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
        )
    except ValueError as err:  # its messages start with the option's name
        raise DatasetError(f"{KEY}.{err}") from None


def bucket_settings(d: DatasetConfig) -> BucketSettings:
    """The same settings `atelier dataset check` builds from its --enable-bucket ... flags."""
    try:
        return BucketSettings.from_options(d)
    except ValueError as err:
        raise DatasetError(f"{KEY}.{err}") from None


def max_token_length(d: DatasetConfig) -> int:
    return d.max_token_length or 75


def cache_latents_wanted(d: DatasetConfig) -> bool:
    """sd-scripts: cache_latents_to_disk implies cache_latents."""
    return bool(d.cache_latents or d.cache_latents_to_disk)


__all__ = ["bucket_settings", "cache_latents_wanted", "caption_options", "check_dataset_options", "max_token_length"]
