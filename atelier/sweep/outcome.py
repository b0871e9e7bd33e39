"""What a sweep prints at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus

from atelier.outputs.summary import read_summary

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job run by a launcher failed; the message is already its one-line reason."""


class JobInterrupted(JobFailed):
    """A job stopped from outside (Ctrl-C, SIGTERM) or never started because of it."""


STATUSES = ("completed", "pruned", "skipped", "failed", "interrupted", "not started")


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


def reason_of(error: BaseException | None) -> str:
    """A job's error as one line (a JobFailed's message is one already)."""
    if error is None:
        return "unknown error"
    if isinstance(error, JobFailed):
        return str(error)
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def outcome_of(name: str, result: JobReturn) -> JobOutcome:
    """What a launcher's JobReturn says of a job."""
    if result.status != JobStatus.FAILED:
        return JobOutcome(name, "completed")
    error = result._return_value
    if isinstance(error, JobInterrupted):
        return JobOutcome(name, "not started" if str(error).startswith("not started") else "interrupted", str(error))
    return JobOutcome(name, "failed", reason_of(error))


def format_summary(outcomes: list[JobOutcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    head = f"sweep finished: {counts['completed']} completed, {counts['skipped']} skipped (already done), {counts['failed']} failed"
    stopped = [f"{counts[s]} {s}" for s in ("pruned", "interrupted", "not started") if counts[s]]
    lines = [", ".join([head, *stopped])]
    width = max((len(o.name) for o in outcomes), default=0)
    for o in outcomes:
        line = f"  {o.status:<11} {o.name:<{width}}"
        if o.reason:
            line += f"  {o.reason}"
        lines.append(line)
    return "\n".join(lines)
