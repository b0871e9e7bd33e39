"""VAE latents of a training batch when they are not cached: encoded every step.

Pixels are decoded, cropped and augmented in a torch DataLoader (worker processes
with dataset.max_data_loader_n_workers > 0, started once and kept for the run unless
dataset.persistent_data_loader_workers=false) from
per-sample seeds drawn in the training process, so workers never decide anything
random themselves. The VAE runs in the training process.

Without random_crop/color_aug a sample's posterior noise is seeded exactly as the
latent cache seeds it (from the content key), so cache on and cache off train on the
same latents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from atelier.data.augment import load_training_pixels
from atelier.data.buckets import Resolution
from atelier.data.latent_cache import encode_pixels, file_sha256, latent_key, noise_seed, vae_fingerprint


@dataclass(frozen=True)
class PixelJob:
    """One batch to load: per sample its file, bucket, flip and augmentation seed."""

    paths: tuple[Path, ...]
    buckets: tuple[Resolution, ...]
    flips: tuple[bool, ...]
    seeds: tuple[int, ...]


class PixelBatches(Dataset):
    """dataset[job] = the stacked pixels [B, 3, H, W] of a PixelJob; picklable for workers."""

    def __init__(self, random_crop: bool, color_aug: bool, face_crop_aug_range: tuple[float, float] | None = None,
                 interpolation: str | None = None):  # fmt: skip
        self.random_crop = random_crop
        self.color_aug = color_aug
        self.face_crop_aug_range = face_crop_aug_range
        self.interpolation = interpolation

    def __getitem__(self, job: PixelJob) -> torch.Tensor:
        return torch.stack(
            [
                load_training_pixels(
                    path, bucket, flip=flip, random_crop=self.random_crop, color=self.color_aug, seed=seed,
                    face_crop_aug_range=self.face_crop_aug_range, interpolation=self.interpolation,
                )  # fmt: skip
                for path, bucket, flip, seed in zip(job.paths, job.buckets, job.flips, job.seeds)
            ]
        )


class _Jobs(Sampler):
    """Yields the current epoch's jobs; the DataLoader sends each one to a worker."""

    def __init__(self) -> None:
        self.jobs: list[PixelJob] = []

    def __iter__(self) -> Iterator[PixelJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


class PixelLoader:
    """Pixels of PixelJobs, in order; `num_workers` processes decode ahead (0: in this process)."""

    def __init__(self, random_crop: bool, color_aug: bool, num_workers: int = 0, persistent_workers: bool = True,
                 face_crop_aug_range: tuple[float, float] | None = None, interpolation: str | None = None):  # fmt: skip
        self.dataset = PixelBatches(random_crop, color_aug, face_crop_aug_range, interpolation)
        self._jobs = _Jobs()
        self._loader = None
        if num_workers > 0:
            # persistent (dataset.persistent_data_loader_workers): the workers are started once
            # and kept for every epoch; otherwise started again for each epoch.
            self._loader = DataLoader(
                self.dataset, batch_size=None, sampler=self._jobs, num_workers=num_workers,
                persistent_workers=persistent_workers,
            )  # fmt: skip

    def __call__(self, jobs: Sequence[PixelJob]) -> Iterator[torch.Tensor]:
        if self._loader is None:
            return (self.dataset[job] for job in jobs)
        self._jobs.jobs = list(jobs)
        return iter(self._loader)


class StepEncoder:
    """Encodes each batch's pixels with the VAE, step by step."""

    def __init__(
        self,
        vae: torch.nn.Module,
        paths: Sequence[Path],
        device: torch.device,
        *,
        random_crop: bool,
        color_aug: bool,
        num_workers: int = 0,
        persistent_workers: bool = True,
        face_crop_aug_range: tuple[float, float] | None = None,
        interpolation: str | None = None,
        vae_batch_size: int = 4,
    ):
        self.vae = vae
        self.device = device
        self.vae_batch_size = vae_batch_size
        self.random_crop = random_crop
        self.color_aug = color_aug
        self.interpolation = interpolation
        self.pixels = PixelLoader(random_crop, color_aug, num_workers, persistent_workers, face_crop_aug_range,
                                  interpolation)  # fmt: skip
        self.paths = list(paths)
        self.augmented = random_crop or color_aug or face_crop_aug_range is not None
        # Unaugmented samples reuse the cache's noise seeds, which need the content key.
        self._digests = None if self.augmented else [file_sha256(path) for path in self.paths]
        self._vae_id = None if self.augmented else vae_fingerprint(vae)

    def noise_seeds(self, job: PixelJob, indices: Sequence[int]) -> list[int]:
        if self.augmented:
            return list(job.seeds)
        return [
            noise_seed(latent_key(self._digests[i], bucket, flip, self._vae_id, True, self.interpolation))
            for i, bucket, flip in zip(indices, job.buckets, job.flips)
        ]

    def encode(self, jobs: Sequence[PixelJob], indices: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Latents [B, C, h, w] (CPU) per job, in order."""
        pixels = self.pixels(jobs)
        size = self.vae_batch_size
        for job, batch_indices, batch_pixels in zip(jobs, indices, pixels):
            seeds = self.noise_seeds(job, batch_indices)
            # dataset.vae_batch_size images per VAE call, as sd-scripts splits a step's batch.
            yield torch.cat([
                encode_pixels(self.vae, batch_pixels[start : start + size], seeds[start : start + size], self.device)
                for start in range(0, len(seeds), size)
            ])  # fmt: skip


__all__ = ["PixelBatches", "PixelJob", "PixelLoader", "StepEncoder"]
