"""The console view of a running sweep: one line per job."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from atelier.launch.process_queue import Job

log = logging.getLogger(__name__)
STYLES = {"queued": "dim", "running": "cyan", "completed": "green", "pruned": "magenta", "failed": "red",
          "interrupted": "yellow"}


def last_metrics(run_dir: Path) -> dict:
    """The last step record of a run's metrics.jsonl (read from the file's end)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode(errors="ignore").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss/step" in record:
            return record
    return {}


def describe(job: Job) -> str:
    if job.state != "running":
        return "" if job.returncode in (None, 0) else f"exit {job.returncode}, see {job.run_dir / 'stderr.log'}"
    if job.lanes:
        steps = [str(last_metrics(lane).get("step", 0)) for lane in job.lanes]
        return f"{len(job.lanes)} lanes fused, steps {'/'.join(steps)}"
    metrics = last_metrics(job.run_dir)
    if not metrics:
        return "starting"
    return f"step {metrics['step']}  loss {metrics['loss/step']:.4f}"


class StatusBoard:
    """A live table on a terminal; a log line per change otherwise (CI, files)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.live = Live(self._table(), refresh_per_second=2, transient=False) if sys.stdout.isatty() else None

    def __enter__(self) -> StatusBoard:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def refresh(self) -> None:
        if self.live:
            self.live.update(self._table())

    def changed(self, job: Job) -> None:
        if not self.live:
            where = job.slot.label if job.slot else "-"
            log.info("[%s] %-11s %s %s", where, job.state, job.name, describe(job))

    def _table(self) -> Table:
        table = Table(box=None, pad_edge=False)
        for column in ("job", "device", "state", "time", "progress"):
            table.add_column(column)
        for job in self.jobs:
            style = STYLES.get(job.state, "")
            table.add_row(
                job.name,
                job.slot.label if job.slot else "",
                f"[{style}]{job.state}[/]",
                f"{job.elapsed:.0f}s" if job.started else "",
                describe(job),
            )
        return table

