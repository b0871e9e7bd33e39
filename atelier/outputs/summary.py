"""A run's summary.json: its status, reason, numbers. Read by sweeps, launchers and reports.

Kept free of torch, so a sweep or report process can read summaries without importing it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from atelier.utils.atomic import write_text

SUMMARY = "summary.json"

log = logging.getLogger(__name__)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary, or None when it has none yet (or an unreadable one, with a warning)."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); treating the job as unfinished", path, error)
        return None
    return summary if isinstance(summary, dict) else None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY
    write_text(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path


def finished(job_dir: Path) -> bool:
    """A job whose summary.json says it completed (its LoRA file is there), or that its search
    trial pruned (it is over: a resumed sweep does not train it again)."""
    summary = read_summary(job_dir)
    if summary is None:
        return False
    if summary.get("status") == "pruned":
        return True
    output = summary.get("output_file")
    return summary.get("status") == "completed" and bool(output) and (job_dir / output).is_file()
