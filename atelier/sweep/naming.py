"""Job dir names made of the values that vary across a sweep."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Characters that are unsafe in a file name or in Hydra's override grammar.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-@]+")
MAX_NAME = 120


def parse_job(overrides: Sequence[str]) -> dict[str, str]:
    """["a=1", "b.c=x"] -> {"a": "1", "b.c": "x"} (keys keep their +/~ prefixes)."""
    return dict(item.split("=", 1) for item in overrides)


def swept_keys(jobs: Sequence[Sequence[str]]) -> list[str]:
    """Keys whose value differs between jobs, in command-line order."""
    parsed = [parse_job(job) for job in jobs]
    keys = list(dict.fromkeys(k for job in parsed for k in job))
    return [k for k in keys if len({job.get(k) for job in parsed}) > 1]


def job_name(overrides: Sequence[str], keys: Sequence[str], index: int) -> str:
    """`optimizer=prodigy,network.dim=8`; `job<index>` when nothing varies."""
    job = parse_job(overrides)
    name = ",".join(f"{k.lstrip('+~')}={job.get(k, 'unset')}" for k in keys)
    name = _UNSAFE.sub("_", name)[:MAX_NAME].strip(".")
    return name or f"job{index}"


def job_names(jobs: Sequence[Sequence[str]]) -> list[str]:
    keys = swept_keys(jobs)
    names = [job_name(job, keys, i) for i, job in enumerate(jobs)]
    # Truncation could make two names equal: keep them apart with the job index.
    seen: set[str] = set()
    unique = []
    for i, name in enumerate(names):
        unique.append(name if name not in seen else f"{name}_{i}")
        seen.add(unique[-1])
    return unique
