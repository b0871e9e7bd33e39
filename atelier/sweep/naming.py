"""Names made of the values that vary across a sweep: job dirs and LoRA files."""

from __future__ import annotations

import re
from collections.abc import Sequence

from atelier.outputs.sweep_plan import is_bookkeeping

# Characters that are unsafe in a file name or in Hydra's override grammar.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-@]+")
# LoRA file names go into ComfyUI/A1111 folders and UIs: keep them to the plainest characters.
_UNSAFE_IN_FILE = re.compile(r"[^A-Za-z0-9.+\-]+")
MAX_NAME = 120


def parse_job(overrides: Sequence[str]) -> dict[str, str]:
    """["a=1", "b.c=x"] -> {"a": "1", "b.c": "x"} (keys keep their +/~ prefixes)."""
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in overrides)


def swept_keys(jobs: Sequence[Sequence[str]]) -> list[str]:
    """Keys whose value differs between jobs, in command-line order; bookkeeping keys never count."""
    parsed = [parse_job(job) for job in jobs]
    keys = list(dict.fromkeys(k for job in parsed for k in job if not is_bookkeeping(k)))
    return [k for k in keys if len({job.get(k) for job in parsed}) > 1]


def job_name(overrides: Sequence[str], keys: Sequence[str], index: int) -> str:
    """`optimizer=prodigy,network.dim=8`; `job<index>` when nothing varies."""
    job = parse_job(overrides)
    name = ",".join(f"{k.lstrip('+~')}={job.get(k, 'unset')}" for k in keys)
    name = _UNSAFE.sub("_", name)[:MAX_NAME].strip(".")
    return name or f"job{index}"


def job_names(jobs: Sequence[Sequence[str]]) -> list[str]:
    keys = swept_keys(jobs)
    return _unique([job_name(job, keys, i) for i, job in enumerate(jobs)])


def file_suffix(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """`optimizer-prodigy_dim-8`: each swept key (its last part, unless two keys share it) and value.

    Only letters, digits and `.+-` inside a part; `_` separates the parts.
    """
    job = parse_job(overrides)
    short = [k.lstrip("+~").rsplit(".", 1)[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k.lstrip("+~") for s, k in zip(short, keys)]
    parts = []
    for label, key in zip(labels, keys):
        value = _UNSAFE_IN_FILE.sub("-", job.get(key, "unset")).strip("-.") or "empty"
        parts.append(f"{_UNSAFE_IN_FILE.sub('-', label)}-{value}")
    return "_".join(parts)


def lora_names(jobs: Sequence[Sequence[str]], base: str | Sequence[str]) -> list[str]:
    """Each job's output_name: `<base>_<file_suffix>`, unique within the sweep.

    `base` is the output_name every job would get (one string) or each job's own. A
    sweep of one job keeps its base, so a single configuration names its file as a run does.
    Swept output.output_name values are the base already, so they are left out of the suffix.
    """
    bases = [base] * len(jobs) if isinstance(base, str) else list(base)
    keys = [k for k in swept_keys(jobs) if k.lstrip("+~") != "output.output_name"]
    if not keys:
        return bases
    names = [f"{b}_{file_suffix(job, keys)}"[:MAX_NAME] for b, job in zip(bases, jobs)]
    return _unique(names)


def _unique(names: Sequence[str]) -> list[str]:
    # Truncation or sanitising could make two names equal: keep them apart with the job index.
    seen: set[str] = set()
    unique = []
    for i, name in enumerate(names):
        unique.append(name if name not in seen else f"{name}_{i}")
        seen.add(unique[-1])
    return unique
