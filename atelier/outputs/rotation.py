"""Which kept files fall out: sd-scripts' save_last_n_epochs / save_last_n_steps rule, for the
LoRA checkpoints and for the kept training states alike.

The files are named <output_name>-<6-digit epoch><suffix> and <output_name>-step<8-digit
step><suffix>; any other name (the final LoRA, a pruned run's file, the user's own) is never
among the files that fall out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path


def fallen_out(
    paths: Iterable[Path], output_name: str, suffix: str, last_n_epochs: int | None, last_n_steps: int | None,
    step: int,
) -> list[Path]:  # fmt: skip
    """The epoch files beyond the last n (by epoch), and the step files older than the last n
    steps (saved at a step below `step` - last_n_steps), as sd-scripts rotates them."""
    name, end = re.escape(output_name), re.escape(suffix)
    by_epoch, by_step = [], []
    for path in paths:
        if match := re.fullmatch(rf"{name}-(\d{{6}}){end}", path.name):
            by_epoch.append((int(match[1]), path))
        elif match := re.fullmatch(rf"{name}-step(\d{{8}}){end}", path.name):
            by_step.append((int(match[1]), path))
    old = [path for _, path in sorted(by_epoch)[:-last_n_epochs]] if last_n_epochs else []
    if last_n_steps:
        old += [path for saved_at, path in sorted(by_step) if saved_at < step - last_n_steps]
    return old
