"""Where each job of a resumed sweep runs: never over the results of another config.

A job's dir is named by its swept values; after a change to a fixed value (or a config
file), the same name would now mean another config. Such a job runs as a new job,
`<name>@2` (then @3, ...), beside the old results, which keep describing what they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from atelier.outputs.guard import differing_keys, plain_config, stored_job_config

SUFFIX = "@"


def place(sweep_dir: Path, name: str, compose: Callable[[str], DictConfig]) -> tuple[str, list[str]]:
    """The dir name this job runs in, and the keys that moved it off its own name (if any).

    `compose(name)` is the job's config as it would run in dir `name`. The first of `name`,
    `name@2`, ... that is new, or holds a run of this same config, is taken."""
    moved_by: list[str] = []
    candidate, n = name, 1
    while True:
        stored = stored_job_config(sweep_dir / candidate)
        if stored is None:
            return candidate, moved_by
        differing = differing_keys(stored, plain_config(compose(candidate)))
        if not differing:
            return candidate, moved_by
        moved_by = moved_by or differing
        n += 1
        candidate = f"{name}{SUFFIX}{n}"
