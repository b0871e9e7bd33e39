"""Aspect-ratio bucketing: bucket sizes, assignment, crops, batches and ss_bucket_info."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from atelier.data.buckets import (
    BucketAssignment,
    BucketManager,
    BucketSettings,
    bucket_batches,
    bucket_counts,
    bucket_info,
    bucket_steps_per_epoch,
    log_bucket_counts,
    make_bucket_resolutions,
    parse_resolution,
    resize_and_crop_to_bucket,
)
from atelier.data.dataset import ImageItem
from atelier.data.schedule import epoch_order, expand_repeats

# What sd-scripts lists for --resolution 512 with its default 256..1024 / 64.
SD_SCRIPTS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip

BUCKETED_512 = BucketSettings((512, 512), enable_bucket=True)


def item(path: Path | str = "x.png", repeats: int = 1) -> ImageItem:
    return ImageItem(Path(path), "caption", "1_x", repeats)


# --- bucket resolutions ---------------------------------------------------------------


def test_resolutions_for_512_match_sd_scripts() -> None:
    assert make_bucket_resolutions((512, 512)) == SD_SCRIPTS_512


@pytest.mark.parametrize("max_reso", [(512, 512), (768, 768), (1024, 1024), (640, 448)])
def test_every_bucket_fits_the_area_and_the_limits(max_reso: tuple[int, int]) -> None:
    resolutions = make_bucket_resolutions(max_reso, 256, 2048, 64)
    side = int(math.sqrt(max_reso[0] * max_reso[1]) // 64) * 64
    assert (side, side) in resolutions
    for width, height in resolutions:
        assert width * height <= max_reso[0] * max_reso[1]
        assert width % 64 == 0 and height % 64 == 0
        assert (height, width) in resolutions  # portrait and landscape alike
        if (width, height) != (side, side):
            assert 256 <= min(width, height) and max(width, height) <= 2048
    assert resolutions == sorted(resolutions)


def test_resolution_smaller_than_min_bucket_gives_only_the_square() -> None:
    assert make_bucket_resolutions((64, 64), 256, 1024, 64) == [(64, 64)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (512, (512, 512)),
        ("512", (512, 512)),
        ("768,512", (768, 512)),
        ("768x512", (768, 512)),
        ([640, 448], (640, 448)),
    ],
)
def test_parse_resolution(value, expected) -> None:
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "0", "1,2,3", [512, -1]])
def test_parse_resolution_rejects_nonsense(value) -> None:
    with pytest.raises(ValueError, match="resolution"):
        parse_resolution(value)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketSettings((512, 512), min_bucket_reso=1024, max_bucket_reso=256)
    with pytest.raises(ValueError, match="bucket_reso_steps"):
        BucketSettings((512, 512), bucket_reso_steps=0)


# --- choosing a bucket ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((512, 512), (512, 512)),
        ((3000, 3000), (512, 512)),
        ((1000, 500), (704, 320)),  # 2.2:1 is nearer 2:1 than 1.67:1 in log ratio
        ((500, 1000), (320, 704)),  # and symmetrically for portraits
        ((4000, 1000), (1024, 256)),
        ((800, 600), (576, 448)),
    ],
)
def test_image_goes_to_the_nearest_aspect_ratio(size, bucket) -> None:
    assert BucketManager(BUCKETED_512).select(size) == bucket


def test_without_bucketing_everything_goes_to_the_resolution() -> None:
    manager = BucketManager(BucketSettings((512, 768), enable_bucket=False))
    assert {manager.select(size) for size in [(10, 10), (4000, 100), (512, 768)]} == {(512, 768)}
    assert manager.resolutions == [(512, 768)]


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((300, 200), (256, 192)),  # small images: own size rounded down, never upscaled
        ((512, 512), (512, 512)),
        ((2000, 1000), (704, 320)),  # large images: shrunk to the training area first
        ((40, 40), (64, 64)),  # below one step a side cannot round down any further
    ],
)
def test_no_upscale_buckets_follow_the_image(size, bucket) -> None:
    manager = BucketManager(BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True))
    assert manager.select(size) == bucket
    assert bucket in manager.resolutions
    assert bucket[0] * bucket[1] <= max(512 * 512, 64 * 64)


def test_no_upscale_never_upscales_images_larger_than_a_step() -> None:
    manager = BucketManager(BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True))
    rng = random.Random(0)
    for _ in range(200):
        size = (rng.randint(64, 3000), rng.randint(64, 3000))
        assert not BucketAssignment(manager.select(size), size).upscaled


def test_assign_reads_sizes_from_the_files_upright(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1000, 500)).save(wide)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (1000, 500)).save(rotated, exif=exif)
    assignments = BucketManager(BUCKETED_512).assign([item(wide, 3), item(rotated)])
    assert [(a.image_size, a.bucket, a.repeats) for a in assignments] == [
        ((1000, 500), (704, 320), 3),
        ((500, 1000), (320, 704), 1),
    ]


def test_assign_checks_the_number_of_sizes() -> None:
    with pytest.raises(ValueError, match="2 sizes for 1 items"):
        BucketManager(BUCKETED_512).assign([item()], [(1, 1), (2, 2)])


# --- resize and crop ----------------------------------------------------------------------


def test_centre_crop_to_bucket() -> None:
    img = Image.new("RGB", (100, 50))
    out, offset = resize_and_crop_to_bucket(img, (64, 64))
    assert out.size == (64, 64)
    assert offset == (32, 0)  # covered at 128x64, centred


def test_random_crop_is_reproducible_and_stays_inside() -> None:
    img = Image.linear_gradient("L").convert("RGB").resize((300, 100))
    offsets = [resize_and_crop_to_bucket(img, (64, 64), True, random.Random(seed))[1] for seed in range(20)]
    assert all(0 <= left <= 128 and top == 0 for left, top in offsets)
    assert len(set(offsets)) > 5
    again = resize_and_crop_to_bucket(img, (64, 64), True, random.Random(3))
    first = resize_and_crop_to_bucket(img, (64, 64), True, random.Random(3))
    assert again[1] == first[1] and again[0].tobytes() == first[0].tobytes()


def test_random_crop_needs_an_rng() -> None:
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop_to_bucket(Image.new("RGB", (10, 10)), (8, 8), random_crop=True)


def test_crop_keeps_the_image_content() -> None:
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (64, 0, 128, 64))  # left half red, right half blue
    out, offset = resize_and_crop_to_bucket(img, (64, 64), True, random.Random(0))
    left_pixel, right_pixel = out.getpixel((0, 32)), out.getpixel((63, 32))
    assert offset[0] in range(65)
    if offset[0] == 0:
        assert left_pixel == (255, 0, 0) and right_pixel == (255, 0, 0)
    if offset[0] == 64:
        assert left_pixel == (0, 0, 255) and right_pixel == (0, 0, 255)


# --- batches and steps ------------------------------------------------------------------


def mixed_assignments() -> list[BucketAssignment]:
    buckets = [(512, 512), (704, 320), (512, 512), (320, 704), (704, 320), (512, 512), (512, 512)]
    return [BucketAssignment(bucket, bucket, repeats=1 + i % 3) for i, bucket in enumerate(buckets)]


def test_batches_never_mix_buckets_and_cover_every_repeat() -> None:
    assignments = mixed_assignments()
    batches = bucket_batches(assignments, batch_size=2, seed=7, epoch=1)
    for batch in batches:
        assert len({assignments[i].bucket for i in batch}) == 1
        assert 1 <= len(batch) <= 2
    seen = Counter(i for batch in batches for i in batch)
    assert seen == {i: a.repeats for i, a in enumerate(assignments)}
    assert len(batches) == bucket_steps_per_epoch(assignments, 2)


def test_batches_are_deterministic_per_seed_and_epoch() -> None:
    assignments = mixed_assignments()
    assert bucket_batches(assignments, 2, 7, 1) == bucket_batches(assignments, 2, 7, 1)
    assert bucket_batches(assignments, 2, 7, 1) != bucket_batches(assignments, 2, 7, 2)
    assert bucket_batches(assignments, 2, 7, 1) != bucket_batches(assignments, 2, 8, 1)


def test_batch_order_mixes_buckets() -> None:
    assignments = [BucketAssignment((64, 64) if i % 2 else (96, 32), (1, 1)) for i in range(40)]
    batches = bucket_batches(assignments, 2, seed=0, epoch=1)
    bucket_sequence = [assignments[batch[0]].bucket for batch in batches]
    # Not all of one bucket, then all of the other.
    changes = sum(1 for a, b in zip(bucket_sequence, bucket_sequence[1:]) if a != b)
    assert changes > 1


def test_one_bucket_gives_the_unbucketed_epoch_order() -> None:
    items = [item(f"{i}.png", repeats=1 + i % 2) for i in range(9)]
    assignments = BucketManager(BucketSettings((64, 64))).assign(items, [(64, 64)] * 9)
    samples = expand_repeats(items)
    order = [samples[i] for i in epoch_order(len(samples), 5, 3)]
    expected = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert bucket_batches(assignments, 4, seed=5, epoch=3) == expected


def test_steps_per_epoch_is_summed_per_bucket() -> None:
    assignments = mixed_assignments()
    counts = bucket_counts(assignments)
    assert counts == {(320, 704): 1, (512, 512): 8, (704, 320): 4}
    # ceil(1/3) + ceil(8/3) + ceil(4/3): more than the ceil(13/3) = 5 of a single bucket
    assert bucket_steps_per_epoch(assignments, 3) == 1 + 3 + 2
    with pytest.raises(ValueError):
        bucket_batches(assignments, 0, 0, 1)


# --- ss_bucket_info -------------------------------------------------------------------------


def test_bucket_info_is_kohya_json() -> None:
    manager = BucketManager(BUCKETED_512)
    sizes = [(512, 512), (1000, 500), (1000, 500), (600, 600)]
    assignments = manager.assign([item(repeats=2)] * 4, sizes)
    info = manager.info(assignments)
    # Numbered by position among all buckets, as sd-scripts does; counts include repeats.
    assert info["buckets"] == {
        str(SD_SCRIPTS_512.index((512, 512))): {"resolution": [512, 512], "count": 4},
        str(SD_SCRIPTS_512.index((704, 320))): {"resolution": [704, 320], "count": 4},
    }
    expected_error = (0 + 2 * abs(704 / 320 - 2) + 0) / 4
    assert info["mean_img_ar_error"] == pytest.approx(expected_error)
    assert json.loads(json.dumps(info)) == info


def test_bucket_info_without_bucketing_has_one_bucket() -> None:
    manager = BucketManager(BucketSettings((64, 64)))
    info = manager.info(manager.assign([item(repeats=3)] * 2, [(64, 64), (128, 64)]))
    assert info["buckets"] == {"0": {"resolution": [64, 64], "count": 6}}
    assert info["mean_img_ar_error"] == pytest.approx(0.5)
    assert bucket_info([])["buckets"] == {}


def test_bucket_counts_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    manager = BucketManager(BUCKETED_512)
    info = manager.info(manager.assign([item(repeats=2)], [(512, 512)]))
    with caplog.at_level(logging.INFO, logger="atelier.data"):
        log_bucket_counts(info)
    assert "bucket 8: resolution (512, 512), count: 2" in caplog.text
    assert "mean ar error" in caplog.text
