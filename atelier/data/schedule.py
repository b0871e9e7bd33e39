"""Step counts and per-epoch sample order, computed the way sd-scripts does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch


class _Repeated(Protocol):
    repeats: int


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Batches in one epoch: ceil(num_samples / batch_size).

    With aspect buckets, call this once per bucket and sum: a batch never mixes buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must not be negative, got {num_samples}")
    return math.ceil(num_samples / batch_size)


def total_steps(steps_per_epoch: int, epochs: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps of a run: epochs * ceil(steps_per_epoch / gradient_accumulation_steps).

    The last partial accumulation of each epoch still steps the optimizer, hence the
    ceil per epoch rather than over the whole run.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}")
    if epochs < 0 or steps_per_epoch < 0:
        raise ValueError(f"epochs and steps_per_epoch must not be negative, got {epochs}, {steps_per_epoch}")
    return epochs * math.ceil(steps_per_epoch / gradient_accumulation_steps)


def expand_repeats(items: Sequence[_Repeated]) -> list[int]:
    """Item indices, each listed `repeats` times, in item order: one epoch's samples."""
    return [index for index, item in enumerate(items) for _ in range(item.repeats)]


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num) that depends only on (seed, epoch).

    A private generator keeps it independent of the global RNG state, so a resumed
    run re-creates exactly the order the interrupted run had for that epoch.
    """
    if num < 0:
        raise ValueError(f"num must not be negative, got {num}")
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num, generator=generator).tolist()
