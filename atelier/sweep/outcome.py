"""What a sweep prints at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from atelier.outputs.summary import read_summary

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job run by a launcher failed; the message is already its one-line reason."""


class JobInterrupted(JobFailed):
    """A job stopped from outside (Ctrl-C, SIGTERM) or never started because of it."""


STATUSES = ("completed", "skipped", "failed", "interrupted", "not started")


@dataclass
class JobOutcome:
    name: str
    status: str  # one of STATUSES
    reason: str | None = None


def outcome_from_run_dir(name: str, job_dir: Path) -> JobOutcome:
    """What a job's summary.json says of it (used when a sweep was stopped mid-way)."""
    summary = read_summary(job_dir)
    if summary is None:
        return JobOutcome(name, "not started", "the sweep was interrupted")
    status = summary.get("status")
    return JobOutcome(name, status if status in STATUSES else "failed", summary.get("reason"))


def format_summary(outcomes: list[JobOutcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    head = f"sweep finished: {counts['completed']} completed, {counts['skipped']} skipped (already done), {counts['failed']} failed"
    stopped = [f"{counts[s]} {s}" for s in ("interrupted", "not started") if counts[s]]
    lines = [", ".join([head, *stopped])]
    width = max((len(o.name) for o in outcomes), default=0)
    for o in outcomes:
        line = f"  {o.status:<11} {o.name:<{width}}"
        if o.reason:
            line += f"  {o.reason}"
        lines.append(line)
    return "\n".join(lines)
