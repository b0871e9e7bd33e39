"""The dataset config as the data layer's option objects (the config's own checks have run)."""

from __future__ import annotations

from atelier.config.schema import DatasetConfig
from atelier.data.buckets import BucketSettings
from atelier.data.images import ImageLimits


def image_limits(d: DatasetConfig) -> ImageLimits:
    """dataset.max_image_pixels / max_aspect_ratio, as the scanner checks each image header."""
    return ImageLimits(max_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio)


def bucket_settings(d: DatasetConfig) -> BucketSettings:
    """The same settings `atelier dataset check` builds from its --enable-bucket ... flags."""
    return BucketSettings.from_options(d)
