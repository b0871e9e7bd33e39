"""Regularization (prior-preservation) images, balanced against the training images.

sd-scripts' rule: reg images are taken in order with their folder's repeats until
they cover the train images x repeats; if they fall short, each reg image in turn
gets one more repeat until they do. So one epoch holds about as many reg samples as
train samples, however many reg images there are (extra ones are left out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from atelier.data.dataset import ImageItem

log = logging.getLogger(__name__)


def balance_reg_repeats(reg_items: Sequence[ImageItem], num_train_samples: int) -> list[ImageItem]:
    """The reg items that take part, with the repeats that balance them (see module doc)."""
    repeats = [0] * len(reg_items)
    total = 0
    first_pass = True
    while reg_items and total < num_train_samples:
        for i, item in enumerate(reg_items):
            added = item.repeats if first_pass else 1
            repeats[i] += added
            total += added
            if total >= num_train_samples:
                break
        first_pass = False
    used = [replace(item, repeats=n) for item, n in zip(reg_items, repeats) if n > 0]
    if len(used) < len(reg_items):
        log.info("%d of %d reg images are used (enough to match the train images x repeats)", len(used), len(reg_items))
    return used


__all__ = ["balance_reg_repeats"]
