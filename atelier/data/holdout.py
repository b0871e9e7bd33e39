"""The validation split: in each concept folder, dataset.validation_split of the images (shuffled
with dataset.validation_seed) are held out, as sd-scripts splits each subset; the training run
never sees them (atelier.loop.validation measures the loss on them)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from atelier.data.dataset import ImageItem
from atelier.errors import DatasetError


def split_validation(
    items: Sequence[ImageItem], fraction: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train items, validation items), both in item order; per folder, like sd-scripts."""
    if fraction <= 0:
        return list(items), []
    rng = random.Random(seed)
    held_out: set[int] = set()
    for folder in dict.fromkeys(item.folder_name for item in items):
        members = [i for i, item in enumerate(items) if item.folder_name == folder]
        rng.shuffle(members)
        keep = math.ceil(round(len(members) * (1.0 - fraction), 9))
        held_out.update(members[keep:])
    if not held_out:
        raise DatasetError(
            f"dataset.validation_split={fraction} holds out no image: each concept folder keeps "
            "ceil(images x (1 - validation_split)) images for training. Raise it, or set it to 0."
        )
    train = [item for i, item in enumerate(items) if i not in held_out]
    return train, [item for i, item in enumerate(items) if i in held_out]


__all__ = ["split_validation"]
