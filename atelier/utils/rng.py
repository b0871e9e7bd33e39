"""Random-state helpers shared by the data layer and the training state."""

from __future__ import annotations

from typing import Any


def as_tuples(value: Any) -> Any:
    # random.setstate wants tuples; a saved state may come back with lists.
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
