"""A training step's UNet inputs, and how several adapters' inputs share one UNet call.

Each adapter builds its own inputs (its own noise and timestep draws, from its batch's
seed); inputs of the same shapes are concatenated along the batch dimension so the base
model runs once on them (atelier.fused.slots routes each adapter's rows to its network).
One adapter's inputs are passed on as they are: a plain run's UNet call is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

import torch


@dataclass
class StepInputs:
    """What one batch's UNet call takes (noisy, timesteps, hidden) and its loss needs."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    hidden: Any  # text embeddings; SDXLText for SDXL

    def shape_key(self) -> tuple:
        """Inputs with equal keys can be concatenated into one UNet call."""
        return tuple(self.noisy.shape[1:]), _text_shape(self.hidden), self.noisy.dtype


T = TypeVar("T")


def same_shapes(items: Sequence[T], inputs_of: Callable[[T], StepInputs]) -> list[list[T]]:
    """`items` grouped by the shapes of their inputs, each group in the items' order."""
    groups: dict[tuple, list[T]] = {}
    for item in items:
        groups.setdefault(inputs_of(item).shape_key(), []).append(item)
    return list(groups.values())


def joined(parts: list[Any]) -> Any:
    """Tensors (or SDXLText dataclasses of tensors) concatenated along the batch; one part as it is."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if is_dataclass(parts[0]):  # SDXLText
        return type(parts[0])(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})
    raise TypeError(f"cannot concatenate text conditioning of type {type(parts[0]).__name__}")


def _text_shape(hidden: Any) -> tuple:
    if isinstance(hidden, torch.Tensor):
        return tuple(hidden.shape[1:])
    return tuple(tuple(getattr(hidden, f.name).shape[1:]) for f in fields(hidden))
