"""VAE latents of the training images, cached in memory and optionally on disk.

Every latent is stored under a content key: the sha256 of the image file's bytes,
the bucket, the crop, the flip and the VAE's identity. An edited image, another
bucket or another VAE gives another key, so a stale latent is never used; the
disk cache can be shared by runs and survives them.

A cached latent is one sample of the VAE posterior drawn with noise seeded from its
key, so it depends only on what went in, never on the order of encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import torch
from PIL import ImageOps
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from tqdm.auto import tqdm

from atelier.data.buckets import Resolution, resize_and_crop_to_bucket
from atelier.errors import DatasetError
from atelier.data.images import open_rgb, to_tensor
from atelier.utils.atomic import atomic_path

logger = logging.getLogger("atelier.data")

# Bump when preprocessing or the stored format changes: old entries then stop matching.
CACHE_FORMAT = "atelier-latents-1"
DEFAULT_CACHE_DIR_NAME = ".atelier-latent-cache"  # dot folder: scan_dataset skips it
_TENSOR_NAME = "latent"
# Only centre crops are cached; random crops change every step (see can_cache_latents).
_CROP_MODE = "center"


class _Image(Protocol):
    path: Path


def can_cache_latents(random_crop: bool, color_aug: bool, face_crop: bool = False) -> tuple[bool, str]:
    """(allowed, reason): augmentations that change the pixels every step rule out a cache."""
    named = (("random_crop", random_crop), ("color_aug", color_aug), ("face_crop_aug_range", face_crop))
    per_step = [name for name, enabled in named if enabled]
    if not per_step:
        return True, ""
    names = " and ".join(per_step)
    verb = "changes" if len(per_step) == 1 else "change"
    return False, (
        f"Latent caching is disabled: {names} {verb} the image pixels every step, so each step "
        f"must run the VAE on its own augmented image. Turn off {names} to cache latents "
        "(faster training), or keep it and accept per-step VAE encoding."
    )


def default_cache_dir(dataset_root: Path) -> Path:
    return Path(dataset_root) / DEFAULT_CACHE_DIR_NAME


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and of the weights that encode (encoder + quant_conv).

    Decoder-only fine-tunes (e.g. sd-vae-ft-mse) encode identically and share entries.
    """
    digest = hashlib.sha256()
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("encoder.", "quant_conv.")):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_key(image_sha256: str, bucket: Resolution, flipped: bool, vae_id: str, sample_posterior: bool,
               interpolation: str | None = None) -> str:  # fmt: skip
    """The content key; dataset.resize_interpolation is a part only when set, so the keys (and the
    posterior noise seeded from them) of the default filter are those of older caches."""
    parts = [
        CACHE_FORMAT,
        image_sha256,
        f"{bucket[0]}x{bucket[1]}",
        _CROP_MODE,
        "flip" if flipped else "noflip",
        "sample" if sample_posterior else "mean",
        vae_id,
        *([f"resize:{interpolation}"] if interpolation is not None else []),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    encoded: int = 0
    corrupt: int = 0

    def __sub__(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class _Job:
    index: int
    flipped: bool


class LatentCache:
    """Latents per dataset item (and per flip), built once, then read with get()."""

    def __init__(
        self,
        vae: torch.nn.Module,
        cache_dir: Path | None,
        to_disk: bool,
        *,
        flip_aug: bool = False,
        batch_size: int = 4,
        device: torch.device | str | None = None,
        sample_posterior: bool = True,
        shared: dict[str, torch.Tensor] | None = None,
        interpolation: str | None = None,
    ):
        if to_disk and cache_dir is None:
            raise ValueError("a disk latent cache needs a cache_dir (e.g. default_cache_dir(dataset root))")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.vae = vae
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.to_disk = to_disk
        self.flip_aug = flip_aug
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.sample_posterior = sample_posterior
        self.interpolation = interpolation  # dataset.resize_interpolation (None: Lanczos)
        self.vae_id = vae_fingerprint(vae)
        self.stats = CacheStats()
        self._by_key: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple[int, bool], str] = {}
        # Latents other caches of this process built (same content keys): read, never encoded twice.
        self._shared = shared

    # ------------------------------------------------------------- lookup
    def get(self, item_index: int, flipped: bool = False) -> torch.Tensor:
        """The scaled latent [C, h, w] (float32, CPU) of a built item."""
        if flipped and not self.flip_aug:
            raise ValueError("flipped latents are only cached with flip_aug=True")
        try:
            return self._by_key[self._keys[(item_index, flipped)]]
        except KeyError:
            raise KeyError(f"item {item_index} is not in the latent cache; call build() first") from None

    def get_batch(self, indices: Sequence[int], flipped: Sequence[bool] | None = None) -> torch.Tensor:
        """Stacked latents [B, C, h, w]; all items of a batch share a bucket, hence a shape."""
        flips = flipped if flipped is not None else [False] * len(indices)
        return torch.stack([self.get(index, flip) for index, flip in zip(indices, flips, strict=True)])

    def __len__(self) -> int:
        return len(self._keys)

    # -------------------------------------------------------------- build
    def build(
        self,
        items: Sequence[_Image],
        buckets: Sequence[Resolution],
        progress: bool = True,
        check_stop: Callable[[str], None] = lambda doing: None,
    ) -> CacheStats:
        """Make every item's latent available: from memory, from disk, or by encoding.

        buckets[i] is item i's bucket (BucketAssignment.bucket). Returns this call's stats.
        `check_stop(doing)` is called between images and between VAE batches; it raises to
        stop (atelier.runtime.signals.raise_if_stop_asked). Latents written to disk stay there.
        """
        if len(buckets) != len(items):
            raise ValueError(f"got {len(buckets)} buckets for {len(items)} items")
        before = replace(self.stats)
        self._keys = {}
        flips = (False, True) if self.flip_aug else (False,)
        pending: list[_Job] = []
        for index, item in enumerate(tqdm(items, desc="checking latent cache", unit="image", disable=not progress)):
            check_stop(f"checking the latent cache ({index} of {len(items)} images)")
            digest = file_sha256(item.path)
            for flipped in flips:
                key = self._key(digest, buckets[index], flipped)
                self._keys[(index, flipped)] = key
                if not self._lookup(key, buckets[index]):
                    pending.append(_Job(index, flipped))
        self._encode_all(pending, items, buckets, progress, check_stop)
        self._forget_unused()
        return self.stats - before

    def _forget_unused(self) -> None:
        # Latents of edited images or changed buckets would otherwise pile up in memory.
        in_use = set(self._keys.values())
        self._by_key = {key: latent for key, latent in self._by_key.items() if key in in_use}

    def _key(self, digest: str, bucket: Resolution, flipped: bool) -> str:
        return latent_key(digest, bucket, flipped, self.vae_id, self.sample_posterior, self.interpolation)

    def _lookup(self, key: str, bucket: Resolution) -> bool:
        if key in self._by_key:
            self.stats.memory_hits += 1
            return True
        if self._shared is not None and key in self._shared:
            self._by_key[key] = self._shared[key]
            self.stats.memory_hits += 1
            return True
        latent = self._read_disk(key, bucket)
        if latent is None:
            return False
        self._by_key[key] = latent
        self.stats.disk_hits += 1
        return True

    def _encode_all(
        self,
        pending: list[_Job],
        items: Sequence[_Image],
        buckets: Sequence[Resolution],
        progress: bool,
        check_stop: Callable[[str], None],
    ) -> None:
        # A VAE batch needs one pixel size: group the work by bucket.
        by_bucket: dict[Resolution, list[_Job]] = {}
        for job in pending:
            by_bucket.setdefault(buckets[job.index], []).append(job)
        bar = tqdm(total=len(pending), desc="caching latents", unit="latent", disable=not progress or not pending)
        with bar:
            for bucket, jobs in sorted(by_bucket.items()):
                for start in range(0, len(jobs), self.batch_size):
                    batch = jobs[start : start + self.batch_size]
                    kept = "kept on disk" if self.to_disk else "in memory only: encoded again next time"
                    check_stop(f"caching latents ({bar.n} of {len(pending)} encoded, {kept})")
                    self._encode_batch(batch, items, bucket)
                    bar.update(len(batch))

    @torch.no_grad()
    def _encode_batch(self, jobs: list[_Job], items: Sequence[_Image], bucket: Resolution) -> None:
        keys, pixels = [], []
        for job in jobs:
            path = items[job.index].path
            data = path.read_bytes()
            # Keyed by the bytes actually encoded, in case the file changed since build() hashed it.
            key = self._key(hashlib.sha256(data).hexdigest(), bucket, job.flipped)
            self._keys[(job.index, job.flipped)] = key
            image, _ = resize_and_crop_to_bucket(open_rgb(path, data), bucket, interpolation=self.interpolation)
            if job.flipped:
                image = ImageOps.mirror(image)
            keys.append(key)
            pixels.append(to_tensor(image))
        latents = self._encode_pixels(torch.stack(pixels), keys)
        for key, latent in zip(keys, latents):
            self._by_key[key] = latent
            if self._shared is not None:
                self._shared[key] = latent
            self.stats.encoded += 1
            if self.to_disk:
                self._write_disk(key, latent, bucket)

    def _encode_pixels(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        seeds = [noise_seed(key) for key in keys] if self.sample_posterior else None
        return encode_pixels(self.vae, pixels, seeds, self.device)

    # --------------------------------------------------------------- disk
    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.safetensors"

    def _read_disk(self, key: str, bucket: Resolution) -> torch.Tensor | None:
        if not self.to_disk:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        problem = None
        try:
            # Parse owned bytes, not a memory map: a cache file truncated or replaced by
            # another run must not crash this one later with SIGBUS.
            latent = load(path.read_bytes())[_TENSOR_NAME]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = self._latent_problem(latent, bucket)
        if problem is None:
            return latent
        self.stats.corrupt += 1
        logger.warning("Latent cache file %s is unusable (%s); re-encoding the image.", path, problem)
        return None

    def _latent_problem(self, latent: torch.Tensor, bucket: Resolution) -> str | None:
        expected = self._latent_shape(bucket)
        if tuple(latent.shape) != expected:
            return f"shape {tuple(latent.shape)}, expected {expected}"
        if not torch.isfinite(latent).all():
            return "it holds NaN or inf values"
        return None

    def _latent_shape(self, bucket: Resolution) -> tuple[int, int, int]:
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        return (config.latent_channels, bucket[1] // factor, bucket[0] // factor)

    def _write_disk(self, key: str, latent: torch.Tensor, bucket: Resolution) -> None:
        path = self._path(key)
        metadata = {"format": CACHE_FORMAT, "bucket": f"{bucket[0]}x{bucket[1]}"}
        with atomic_path(path) as tmp:
            save_file({_TENSOR_NAME: latent.contiguous()}, str(tmp), metadata=metadata)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DatasetError(f"Cannot read image {path}: {exc.strerror or exc}.") from exc
    return digest.hexdigest()


def noise_seed(key: str) -> int:
    """The seed of the posterior noise of the latent stored under `key`."""
    return int(key[:15], 16)


@torch.no_grad()
def encode_pixels(
    vae: torch.nn.Module, pixels: torch.Tensor, seeds: Sequence[int] | None, device: torch.device | None = None
) -> torch.Tensor:
    """Scaled latents [B, C, h, w] (float32, CPU) of pixels [B, 3, H, W] in [-1, 1].

    With seeds, latent i is one posterior sample drawn with noise seeded by seeds[i];
    without, the posterior mean. Used by the cache and by per-step encoding alike, so
    both give the same latent for the same image and seed.
    """
    device = device if device is not None else next(vae.parameters()).device
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    if seeds is not None:
        noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        latents = mean + std * noise
    else:
        latents = mean
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    return (latents - shift) * config.scaling_factor


__all__ = [
    "CACHE_FORMAT",
    "CacheStats",
    "LatentCache",
    "can_cache_latents",
    "default_cache_dir",
    "encode_pixels",
    "file_sha256",
    "latent_key",
    "noise_seed",
    "vae_fingerprint",
]
