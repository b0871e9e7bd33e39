"""Aspect-ratio bucketing as sd-scripts does it.

Every image goes to a bucket: a (width, height) near the training resolution's area
whose aspect ratio is close to the image's. The image is scaled to cover its bucket
and cropped to it, and a batch only ever holds images of one bucket.

With bucketing off, every image goes to the one bucket of the configured resolution,
so the trainer keeps a single code path either way.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from atelier.data.images import crop_at, resize_to_cover, upright_size
from atelier.data.schedule import steps_per_epoch

logger = logging.getLogger("atelier.data")

Resolution = tuple[int, int]  # (width, height) in pixels


class _TrainImage(Protocol):
    path: Path
    repeats: int


def parse_resolution(value: int | str | Sequence[int]) -> Resolution:
    """(width, height) from `512`, `"512"`, `"512,768"` or `[512, 768]` (sd-scripts' --resolution)."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace("x", ",").split(",") if part.strip()]
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"resolution must be like 512 or 512,768, got {value!r}") from None
    elif isinstance(value, int):
        numbers = [value]
    else:
        numbers = [int(number) for number in value]
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) < 1:
        raise ValueError(f"resolution must be one or two positive sizes (width,height), got {value!r}")
    return numbers[0], numbers[1]


def make_bucket_resolutions(
    max_reso: Resolution, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Resolution]:
    """Bucket sizes whose area is at most max_reso's, sides in [min_size, max_size], sorted."""
    if divisible < 1:
        raise ValueError(f"bucket_reso_steps must be at least 1, got {divisible}")
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(square, square)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, (max_area // width) // divisible * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


@dataclass(frozen=True)
class BucketSettings:
    """The dataset options of sd-scripts that decide the buckets."""

    resolution: Resolution
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_options(cls, options: Any) -> BucketSettings:
        """From anything holding sd-scripts' option names as attributes: the dataset config,
        or the parsed flags of `atelier dataset check`."""
        return cls(
            resolution=parse_resolution(options.resolution),
            enable_bucket=options.enable_bucket,
            min_bucket_reso=options.min_bucket_reso,
            max_bucket_reso=options.max_bucket_reso,
            bucket_reso_steps=options.bucket_reso_steps,
            bucket_no_upscale=options.bucket_no_upscale,
        )

    def __post_init__(self) -> None:
        if self.bucket_reso_steps < 1:
            raise ValueError(f"bucket_reso_steps must be at least 1, got {self.bucket_reso_steps}")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(
                f"min_bucket_reso ({self.min_bucket_reso}) must not exceed max_bucket_reso ({self.max_bucket_reso})"
            )
        if min(self.resolution) < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def suggested_bucket_bounds(resolution: Resolution) -> tuple[int, int, int]:
    """(min_bucket_reso, max_bucket_reso, bucket_reso_steps) that give several buckets at this
    resolution: half and twice its side, in steps of a quarter side (at most 64, sd-scripts' step).

    At 512 px this is sd-scripts' 256, 1024, 64; at 64 px, 32, 128, 16.
    """
    side = int(math.sqrt(resolution[0] * resolution[1]))
    step = max(8, min(64, side // 4 // 8 * 8))
    return max(step, side // 2 // step * step), side * 2 // step * step, step


def single_bucket_warning(settings: BucketSettings, key_prefix: str = "dataset.") -> str | None:
    """A warning when bucketing is on but its bounds leave one bucket (every image cropped square).

    Names the keys and values that would work; None when bucketing is off, makes buckets from
    the image sizes (bucket_no_upscale), or gives several buckets.
    """
    if not settings.enable_bucket or settings.bucket_no_upscale:
        return None
    s = settings
    buckets = make_bucket_resolutions(s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps)
    if len(buckets) > 1:
        return None
    low, high, step = suggested_bucket_bounds(s.resolution)
    (width, height), = buckets
    return (
        f"{key_prefix}enable_bucket=true gives a single {width}x{height} bucket: {key_prefix}min_bucket_reso={s.min_bucket_reso}, "
        f"{key_prefix}max_bucket_reso={s.max_bucket_reso} and {key_prefix}bucket_reso_steps={s.bucket_reso_steps} do not fit "
        f"resolution {s.resolution[0]}x{s.resolution[1]}, so every image is cropped to it. For aspect buckets set "
        f"{key_prefix}min_bucket_reso={low} {key_prefix}max_bucket_reso={high} {key_prefix}bucket_reso_steps={step}"
    )


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes; kept in item order, one per dataset item."""

    bucket: Resolution
    image_size: Resolution
    repeats: int = 1

    @property
    def ar_error(self) -> float:
        """Bucket aspect ratio minus image aspect ratio (signed, as sd-scripts logs it)."""
        return self.bucket[0] / self.bucket[1] - self.image_size[0] / self.image_size[1]

    @property
    def upscaled(self) -> bool:
        """True when covering the bucket needs enlarging the image (blurrier training data)."""
        return self.bucket[0] > self.image_size[0] or self.bucket[1] > self.image_size[1]


class BucketManager:
    """Chooses each image's bucket from its size."""

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        self._resolutions: set[Resolution] = set(self._predefined())

    def _predefined(self) -> list[Resolution]:
        s = self.settings
        if not s.enable_bucket:
            return [s.resolution]
        if s.bucket_no_upscale:
            return []  # buckets are made from the image sizes as they come
        return make_bucket_resolutions(s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps)

    @property
    def resolutions(self) -> list[Resolution]:
        """Every bucket so far, sorted; bucket_info numbers buckets by this order."""
        return sorted(self._resolutions)

    def select(self, image_size: Resolution) -> Resolution:
        width, height = image_size
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {image_size}")
        s = self.settings
        if not s.enable_bucket:
            return s.resolution
        if s.bucket_no_upscale:
            bucket = self._fit_without_upscale(width, height)
            self._resolutions.add(bucket)
            return bucket
        return _nearest_aspect(self._resolutions, width / height)

    def _fit_without_upscale(self, width: int, height: int) -> Resolution:
        # Larger images shrink to the training area first; then both sides round down
        # to the step, so the crop never needs pixels the image does not have.
        step = self.settings.bucket_reso_steps
        scale = min(1.0, math.sqrt(self.settings.max_area / (width * height)))
        # A side below one step cannot round down; that one image is upscaled slightly.
        bucket_w = max(step, int(width * scale) // step * step)
        bucket_h = max(step, int(height * scale) // step * step)
        return bucket_w, bucket_h

    def assign(
        self, items: Sequence[_TrainImage], sizes: Sequence[Resolution] | None = None
    ) -> list[BucketAssignment]:
        """One assignment per item, in item order; sizes are read from the files unless given."""
        if sizes is None:
            sizes = [upright_size(item.path) for item in items]
        if len(sizes) != len(items):
            raise ValueError(f"got {len(sizes)} sizes for {len(items)} items")
        return [BucketAssignment(self.select(size), size, item.repeats) for item, size in zip(items, sizes)]

    def info(self, assignments: Sequence[BucketAssignment]) -> dict[str, Any]:
        return bucket_info(assignments, self.resolutions)


def _nearest_aspect(resolutions: set[Resolution], aspect: float) -> Resolution:
    # Log-ratio distance treats 2:1 and 1:2 as equally far from 1:1; ties go to the
    # first bucket in sorted order so the choice never depends on set ordering.
    target = math.log(aspect)
    return min(sorted(resolutions), key=lambda reso: abs(math.log(reso[0] / reso[1]) - target))


def resize_and_crop_to_bucket(
    img: Image.Image,
    bucket: Resolution,
    random_crop: bool = False,
    rng: random.Random | None = None,
    interpolation: str | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale img to cover the bucket (with dataset.resize_interpolation's filter), crop it to the
    bucket; returns (image, (left, top)).

    The crop is centred unless random_crop, which draws the offset from rng. The
    offset is what SDXL's crop conditioning needs.
    """
    width, height = bucket
    covered = resize_to_cover(img, width, height, interpolation)
    spare_x, spare_y = covered.width - width, covered.height - height
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return crop_at(covered, width, height, left, top), (left, top)


def bucket_batches(
    assignments: Sequence[BucketAssignment], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """One epoch's batches of item indices (each item `repeats` times); no batch mixes buckets.

    Shuffled within each bucket, then the batch order is shuffled, all from a generator
    seeded with seed + epoch: a resumed run gets the same batches for that epoch. With
    a single bucket this is exactly schedule.epoch_order cut into batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    batches: list[list[int]] = []
    by_bucket = _samples_by_bucket(assignments)
    for bucket in sorted(by_bucket):
        samples = by_bucket[bucket]
        shuffled = [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    if len(by_bucket) > 1:
        # Consecutive batches of one shuffled bucket are already in random order.
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _samples_by_bucket(assignments: Sequence[BucketAssignment]) -> dict[Resolution, list[int]]:
    by_bucket: dict[Resolution, list[int]] = {}
    for index, assignment in enumerate(assignments):
        by_bucket.setdefault(assignment.bucket, []).extend([index] * assignment.repeats)
    return by_bucket


def bucket_counts(assignments: Sequence[BucketAssignment]) -> dict[Resolution, int]:
    """{bucket: images x repeats}, buckets sorted."""
    counts: Counter[Resolution] = Counter()
    for assignment in assignments:
        counts[assignment.bucket] += assignment.repeats
    return dict(sorted(counts.items()))


def bucket_steps_per_epoch(assignments: Sequence[BucketAssignment], batch_size: int) -> int:
    """Batches in one epoch: sum over buckets of ceil(samples in bucket / batch_size)."""
    return sum(steps_per_epoch(count, batch_size) for count in bucket_counts(assignments).values())


def mean_ar_error(assignments: Sequence[BucketAssignment]) -> float:
    """Mean |aspect ratio error| over images (not repeats), as sd-scripts reports it."""
    if not assignments:
        return 0.0
    return sum(abs(assignment.ar_error) for assignment in assignments) / len(assignments)


def bucket_info(
    assignments: Sequence[BucketAssignment], resolutions: Sequence[Resolution] | None = None
) -> dict[str, Any]:
    """sd-scripts' `ss_bucket_info`: {"buckets": {"i": {"resolution", "count"}}, "mean_img_ar_error"}.

    A bucket's number is its index in `resolutions` (the manager's buckets, as
    sd-scripts numbers them) or else among the buckets in use; counts include repeats.
    """
    counts = bucket_counts(assignments)
    numbering = sorted(resolutions) if resolutions is not None else list(counts)
    buckets = {
        str(number): {"resolution": list(reso), "count": counts[reso]}
        for number, reso in enumerate(numbering)
        if counts.get(reso)
    }
    return {"buckets": buckets, "mean_img_ar_error": mean_ar_error(assignments)}


def log_bucket_counts(info: dict[str, Any], log: logging.Logger = logger) -> None:
    """Log each bucket's size the way sd-scripts does at dataset setup."""
    log.info("number of images (including repeats) per bucket:")
    for number, bucket in info["buckets"].items():
        width, height = bucket["resolution"]
        log.info("bucket %s: resolution (%d, %d), count: %d", number, width, height, bucket["count"])
    log.info("mean ar error (without repeats): %.4f", info["mean_img_ar_error"])


__all__ = [
    "BucketAssignment",
    "BucketManager",
    "BucketSettings",
    "Resolution",
    "bucket_batches",
    "bucket_counts",
    "bucket_info",
    "bucket_steps_per_epoch",
    "log_bucket_counts",
    "make_bucket_resolutions",
    "mean_ar_error",
    "parse_resolution",
    "resize_and_crop_to_bucket",
    "single_bucket_warning",
    "suggested_bucket_bounds",
]
