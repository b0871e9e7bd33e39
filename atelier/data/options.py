"""The dataset config as the data layer's option objects (the config's own checks have run)."""

from __future__ import annotations

from enum import Enum

from atelier.config.schema import DatasetConfig
from atelier.data.buckets import BucketSettings
from atelier.data.images import ImageLimits


def image_limits(d: DatasetConfig) -> ImageLimits:
    """dataset.max_image_pixels / max_aspect_ratio, as the scanner checks each image header."""
    return ImageLimits(max_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio)


def resize_interpolation(d: DatasetConfig) -> str | None:
    """dataset.resize_interpolation's name (a key of atelier.data.images.RESAMPLING), None for the default."""
    value = d.resize_interpolation
    return value.value if isinstance(value, Enum) else value


def face_crop_range(d: DatasetConfig) -> tuple[float, float] | None:
    """dataset.face_crop_aug_range as (low, high); checked by DatasetConfig."""
    aug_range = d.face_crop_aug_range
    return None if aug_range is None else (float(aug_range[0]), float(aug_range[1]))


def bucket_settings(d: DatasetConfig) -> BucketSettings:
    """The same settings `atelier dataset check` builds from its --enable-bucket ... flags."""
    return BucketSettings.from_options(d)
