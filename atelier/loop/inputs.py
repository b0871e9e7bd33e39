"""A training step's UNet inputs, and how several adapters' inputs share one UNet call.

Each adapter builds its own inputs (its own noise and timestep draws, from its batch's
seed); inputs of the same shapes are concatenated along the batch dimension so the base
model runs once on them (atelier.fused.slots routes each adapter's rows to its network).
One adapter's inputs are passed on as they are: a plain run's UNet call is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

import torch

from atelier.objective.steps import StepInputs


T = TypeVar("T")


def same_shapes(items: Sequence[T], inputs_of: Callable[[T], StepInputs]) -> list[list[T]]:
    """`items` grouped by the shapes of their inputs, each group in the items' order."""
    groups: dict[tuple, list[T]] = {}
    for item in items:
        groups.setdefault(inputs_of(item).shape_key(), []).append(item)
    return list(groups.values())


def joined(parts: list[Any]) -> Any:
    """Tensors (or SDXLText / FluxText dataclasses of tensors) concatenated along the batch; one part as it is."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if is_dataclass(parts[0]):  # SDXLText
        return type(parts[0])(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})
    raise TypeError(f"cannot concatenate text conditioning of type {type(parts[0]).__name__}")


__all__ = ["StepInputs", "joined", "same_shapes"]
