"""The content-keyed latent cache: hits, misses, disk persistence, corruption, flips."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from atelier.data.dataset import ImageItem
from atelier.data.latent_cache import (
    DEFAULT_CACHE_DIR_NAME,
    LatentCache,
    can_cache_latents,
    default_cache_dir,
    vae_fingerprint,
)

BUCKET = (64, 64)  # the tiny VAE downsamples by 2: latents are [4, 32, 32]


@pytest.fixture(scope="module")
def vae(tiny_model_path: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_path / "vae").eval()


class EncodeCounter:
    """Wraps vae.encode to count the images that go through the VAE."""

    def __init__(self, vae) -> None:
        self.images = 0
        self._encode = vae.encode

    def __call__(self, pixels, *args, **kwargs):
        self.images += pixels.shape[0]
        return self._encode(pixels, *args, **kwargs)


@pytest.fixture
def counter(vae, monkeypatch: pytest.MonkeyPatch) -> EncodeCounter:
    counting = EncodeCounter(vae)
    monkeypatch.setattr(vae, "encode", counting)
    return counting


def gradient_image(path: Path, size=(80, 64), colour=(255, 0, 0)) -> Path:
    """An image whose left and right differ, so a flip changes it."""
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    img.paste(colour, (0, 0, size[0] // 3, size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_items(folder: Path, count: int = 3) -> list[ImageItem]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    return [
        ImageItem(gradient_image(folder / f"img{i}.png", colour=colours[i % 4]), "caption", "1_x", 1)
        for i in range(count)
    ]


def test_memory_cache_hits_without_calling_the_vae(vae, counter: EncodeCounter, tmp_path: Path) -> None:
    items = make_items(tmp_path)
    cache = LatentCache(vae, None, to_disk=False, batch_size=2)
    stats = cache.build(items, [BUCKET] * 3, progress=False)
    assert (stats.encoded, counter.images) == (3, 3)
    latent = cache.get(0)
    assert latent.shape == (4, 32, 32) and latent.dtype == torch.float32
    assert cache.get_batch([0, 2]).shape == (2, 4, 32, 32)

    again = cache.build(items, [BUCKET] * 3, progress=False)
    assert (again.memory_hits, again.encoded, counter.images) == (3, 0, 3)
    assert torch.equal(cache.get(0), latent)


def test_latents_depend_only_on_content_not_on_order(vae, tmp_path: Path) -> None:
    items = make_items(tmp_path)
    forward = LatentCache(vae, None, False)
    forward.build(items, [BUCKET] * 3, progress=False)
    backward = LatentCache(vae, None, False, batch_size=1)
    backward.build(items[::-1], [BUCKET] * 3, progress=False)
    assert torch.allclose(forward.get(0), backward.get(2), atol=1e-5)
    assert not torch.allclose(forward.get(0), forward.get(1))


def test_edited_image_is_encoded_again(vae, counter: EncodeCounter, tmp_path: Path) -> None:
    items = make_items(tmp_path)
    cache = LatentCache(vae, tmp_path / "cache", to_disk=True)
    cache.build(items, [BUCKET] * 3, progress=False)
    before = cache.get(1).clone()
    gradient_image(items[1].path, colour=(255, 255, 255))  # the user edits the image in place

    stats = cache.build(items, [BUCKET] * 3, progress=False)
    assert (stats.memory_hits, stats.encoded) == (2, 1)
    assert counter.images == 4
    assert not torch.allclose(cache.get(1), before)


def test_bucket_change_is_a_miss(vae, tmp_path: Path) -> None:
    items = make_items(tmp_path, 1)
    cache = LatentCache(vae, None, False)
    cache.build(items, [BUCKET], progress=False)
    stats = cache.build(items, [(96, 64)], progress=False)
    assert stats.encoded == 1
    assert cache.get(0).shape == (4, 32, 48)


def test_disk_cache_survives_a_new_cache_object(vae, counter: EncodeCounter, tmp_path: Path) -> None:
    items = make_items(tmp_path / "data")
    cache_dir = default_cache_dir(tmp_path / "data")
    first = LatentCache(vae, cache_dir, to_disk=True)
    first.build(items, [BUCKET] * 3, progress=False)
    files = sorted(cache_dir.iterdir())
    assert len(files) == 3 and all(path.suffix == ".safetensors" for path in files)  # no temp files left

    second = LatentCache(vae, cache_dir, to_disk=True)
    stats = second.build(items, [BUCKET] * 3, progress=False)
    assert (stats.disk_hits, stats.encoded, counter.images) == (3, 0, 3)
    for i in range(3):
        assert torch.equal(second.get(i), first.get(i))


def test_corrupt_cache_file_is_re_encoded_with_a_warning(
    vae, counter: EncodeCounter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = make_items(tmp_path, 2)
    cache_dir = tmp_path / "cache"
    LatentCache(vae, cache_dir, to_disk=True).build(items, [BUCKET] * 2, progress=False)
    original = LatentCache(vae, cache_dir, to_disk=True)
    original.build(items, [BUCKET] * 2, progress=False)
    victim = sorted(cache_dir.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated by a crash or a full disk

    fresh = LatentCache(vae, cache_dir, to_disk=True)
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        stats = fresh.build(items, [BUCKET] * 2, progress=False)
    assert (stats.corrupt, stats.encoded, stats.disk_hits) == (1, 1, 1)
    assert "unusable" in caplog.text and victim.name in caplog.text
    for i in range(2):
        assert torch.allclose(fresh.get(i), original.get(i), atol=1e-5)
    # The re-encoded latent replaced the broken file.
    assert LatentCache(vae, cache_dir, to_disk=True).build(items, [BUCKET] * 2, progress=False).disk_hits == 2


def test_flipped_latent_encodes_the_flipped_image(vae, tmp_path: Path) -> None:
    items = make_items(tmp_path, 1)
    mirrored = tmp_path / "mirrored" / "img.png"
    mirrored.parent.mkdir()
    ImageOps.mirror(Image.open(items[0].path)).save(mirrored)

    # Posterior means: a sample's noise is seeded by its key, which differs between the two files.
    cache = LatentCache(vae, tmp_path / "cache", to_disk=True, flip_aug=True, sample_posterior=False)
    stats = cache.build(items, [BUCKET], progress=False)
    assert stats.encoded == 2 and len(list((tmp_path / "cache").iterdir())) == 2
    reference = LatentCache(vae, None, False, sample_posterior=False)
    reference.build([ImageItem(mirrored, "", "1_x", 1)], [BUCKET], progress=False)

    flipped = cache.get(0, flipped=True)
    assert torch.allclose(flipped, reference.get(0), atol=1e-5)
    assert not torch.allclose(flipped, torch.flip(cache.get(0), dims=[-1]), atol=1e-3)
    assert cache.get_batch([0, 0], [False, True]).shape == (2, 4, 32, 32)


def test_get_errors(vae, tmp_path: Path) -> None:
    cache = LatentCache(vae, None, False)
    with pytest.raises(KeyError, match="build"):
        cache.get(0)
    with pytest.raises(ValueError, match="flip_aug"):
        cache.get(0, flipped=True)
    with pytest.raises(ValueError, match="cache_dir"):
        LatentCache(vae, None, to_disk=True)
    with pytest.raises(ValueError, match="buckets"):
        cache.build(make_items(tmp_path, 2), [BUCKET], progress=False)


def test_vae_fingerprint_follows_the_encoder_weights(vae) -> None:
    import copy

    base = vae_fingerprint(vae)
    assert vae_fingerprint(vae) == base
    decoder_tuned = copy.deepcopy(vae)
    with torch.no_grad():
        decoder_tuned.decoder.conv_out.bias.add_(1.0)
    assert vae_fingerprint(decoder_tuned) == base  # the latents would be identical
    encoder_tuned = copy.deepcopy(vae)
    with torch.no_grad():
        encoder_tuned.encoder.conv_in.bias.add_(1e-3)
    assert vae_fingerprint(encoder_tuned) != base


def test_can_cache_latents() -> None:
    assert can_cache_latents(random_crop=False, color_aug=False) == (True, "")
    allowed, reason = can_cache_latents(random_crop=True, color_aug=False)
    assert not allowed and "random_crop" in reason and "disabled" in reason
    allowed, reason = can_cache_latents(random_crop=True, color_aug=True)
    assert not allowed and "random_crop and color_aug" in reason


def test_default_cache_dir_is_skipped_by_the_dataset_scan(tmp_path: Path) -> None:
    from atelier.data.dataset import scan_dataset

    items = make_items(tmp_path / "1_x", 1)
    (default_cache_dir(tmp_path) / "junk.png").parent.mkdir()
    assert default_cache_dir(tmp_path).name == DEFAULT_CACHE_DIR_NAME
    index = scan_dataset(tmp_path)
    assert [item.path for item in index.items] == [items[0].path.resolve()]
    assert not any(DEFAULT_CACHE_DIR_NAME in warning for warning in index.warnings)
