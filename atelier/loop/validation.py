"""Held-out validation images and a validation loss that runs of a sweep can compare.

The split: in each concept folder, dataset.validation_split of the images (shuffled
with dataset.validation_seed) are held out, as sd-scripts splits each subset; the
training run never sees them.

The loss: the plain (unweighted) MSE of the LoRA-on model's prediction, on every
held-out image (centre crop, no flip, its caption without dropout or shuffling) at
the same fixed timesteps, evenly spaced over the training range, with the same
noise seeded by validation_seed. Nothing in it depends on the training run's random
state, so the same LoRA always gets the same validation loss, and two runs with the
same dataset options are measured on exactly the same problems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atelier.conditioning.sdxl import time_ids
from atelier.data.holdout import split_validation
from atelier.conditioning.training_data import TrainingData
from atelier.objective.steps import Objective

NUM_TIMESTEPS = 5  # t = 100, 300, 500, 700, 900 for a 1000-step schedule


def validation_timesteps(num_train_timesteps: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """`count` timesteps at the centres of equal slices of [0, num_train_timesteps)."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


@dataclass
class _Chunk:
    latents: torch.Tensor  # [M, C, h, w]: one row per (image, timestep)
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor  # [M, 6]: SDXL's size/crop conditioning (unused by SD1/2)


class Validator:
    """The validation loss of the current model on fixed images, timesteps and noise."""

    def __init__(
        self,
        latents: Sequence[torch.Tensor],
        captions: Sequence[str],
        objective: Objective,
        seed: int,
        batch_size: int,
        time_ids: Sequence[Sequence[int]] | None = None,
        max_batches: int | None = None,
    ):
        """time_ids: SDXL's 6 size/crop numbers per image (see atelier.conditioning.sdxl).
        max_batches: dataset.max_validation_steps, the image batches measured (None: all)."""
        if len(latents) != len(captions):
            raise ValueError(f"got {len(latents)} latents for {len(captions)} captions")
        self.objective = objective
        self.timesteps = validation_timesteps(objective.scheduler.config.num_train_timesteps)
        kept = first_batches([tuple(latent.shape) for latent in latents], batch_size, max_batches)
        self.num_images = len(kept)
        time_ids = time_ids if time_ids is not None else [[0] * 6] * len(latents)
        self.chunks = self._make_chunks(latents, captions, time_ids, seed, batch_size, kept)

    def _make_chunks(self, latents, captions, time_ids, seed: int, batch_size: int, kept: set[int]) -> list[_Chunk]:
        generator = torch.Generator().manual_seed(seed)
        rows: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, int, str, Sequence[int]]]] = {}
        for i, (latent, caption, ids) in enumerate(zip(latents, captions, time_ids)):
            for t in self.timesteps:
                # Drawn for every image, so a kept image has the same noise as without max_batches.
                noise = torch.randn(latent.shape, generator=generator)
                if i in kept:
                    rows.setdefault(tuple(latent.shape), []).append((latent, noise, t, caption, ids))
        chunks = []
        for shape in sorted(rows):
            group = rows[shape]
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                chunks.append(
                    _Chunk(
                        torch.stack([row[0] for row in part]),
                        torch.stack([row[1] for row in part]),
                        torch.tensor([row[2] for row in part], dtype=torch.long),
                        [row[3] for row in part],
                        torch.tensor([list(row[4]) for row in part], dtype=torch.float32),
                    )
                )
        return chunks

    @torch.no_grad()
    def loss(
        self,
        unet: torch.nn.Module,
        encode_captions: Callable[[list[str]], torch.Tensor],
        autocast: Callable[[], AbstractContextManager],
        device: torch.device,
    ) -> float:
        total, count = 0.0, 0
        for chunk in self.chunks:
            latents, noise = chunk.latents.to(device), chunk.noise.to(device)
            timesteps = chunk.timesteps.to(device)
            inputs = self.objective.at_timesteps(latents, noise, timesteps)
            with autocast():
                hidden = encode_captions(chunk.captions)
                pred = self.objective.predict(unet, inputs.noisy, inputs.timesteps, hidden, chunk.time_ids)
            target = self.objective.plain_target(inputs)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            total += per_sample.sum().item()
            count += per_sample.numel()
        return total / count


def first_batches(shapes: Sequence[tuple[int, ...]], batch_size: int, max_batches: int | None) -> set[int]:
    """The images (indices) of the first `max_batches` validation batches (None: every image), as
    sd-scripts' --max_validation_steps takes the first batches of its validation loader: batches of
    up to batch_size images of one size (bucket), the sizes in order."""
    if max_batches is None:
        return set(range(len(shapes)))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    batches = [group[start : start + batch_size] for shape in sorted(by_shape)
               for group in [by_shape[shape]] for start in range(0, len(group), batch_size)]  # fmt: skip
    return {i for batch in batches[:max_batches] for i in batch}


def make_validator(data: TrainingData, vae: torch.nn.Module, objective: Objective, device: torch.device) -> Validator | None:
    """The validation loss of `data`'s held-out images, or None without validation_split."""
    latents = data.validation_latents(vae, device)
    if not latents:
        return None
    captions = [data.fixed_caption(item) for item in data.validation_items]
    # SDXL's size/crop conditioning of each (centre-cropped, unflipped) validation image.
    sizes = [time_ids(a.bucket, a.image_size) for a in data.validation_assignments]
    return Validator(latents, captions, objective, data.validation_seed, data.batch_size, sizes,
                     data.options.max_validation_steps)


__all__ = ["NUM_TIMESTEPS", "Validator", "make_validator", "split_validation", "validation_timesteps"]
