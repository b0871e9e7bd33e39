"""Where a job's wall time goes: seconds per phase, written to summary.json as `phase_seconds`.

One job runs at a time in a process, so the phases of the current job live here:
run.py calls `start_job()` when a job starts and `job_phases()` when it writes the
summary; the training loop times its own phases in blocks (`with phase("validation"): ...`,
atelier.loop), and so does code elsewhere (`with phase("latents"): ...`).

Phases overlap nothing: a phase started inside another is subtracted from the outer
one, so the values add up to at most the job's wall time ("other" is the rest).
A Trainer made outside run_job (run_training called directly) starts the phases itself
(`attach_trainer`); the lanes of a fused group share their process's job (train_fused).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

_seconds: dict[str, float] = {}
_stack: list[list[float]] = []  # per open phase: [start, seconds spent in inner phases]
_jobs_started = 0
_trainer_attached = True  # False between run_job's start_job() and its Trainer
# Seconds from the process start to its first job (imports, Hydra's config); None after it.
process_start_seconds: float | None = None
# Of those, the seconds spent importing the training stack (torch, diffusers, ...).
import_seconds: float | None = None
_imports_timed: float | None = None


@contextlib.contextmanager
def timing_imports() -> Iterator[None]:
    """Around the entry point's imports of the training stack: the first job reports them as
    part of its process start (later jobs find them imported)."""
    global _imports_timed
    started = time.perf_counter()
    try:
        yield
    finally:
        if _jobs_started == 0:
            _imports_timed = (_imports_timed or 0.0) + time.perf_counter() - started


def _process_started_at() -> float | None:
    """When this process started, as a time.time() value; None when it cannot be told."""
    try:
        # The start time in /proc/self/stat and /proc/uptime count on the same clock, in
        # 1/100 s; psutil's create_time() adds the boot time in whole seconds (up to 1 s off).
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or unreadable: no figure rather than a wrong one
        return None


def start_job(started: float) -> None:
    """A job starts at time.time() == started: its phases start from zero."""
    global _jobs_started, process_start_seconds, import_seconds, _trainer_attached
    _trainer_attached = False
    _seconds.clear()
    _stack.clear()
    process_start_seconds = import_seconds = None
    if _jobs_started == 0:
        created = _process_started_at()
        process_start_seconds = started - created if created else None
        import_seconds = _imports_timed
    _jobs_started += 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    entry = [time.perf_counter(), 0.0]
    _stack.append(entry)
    try:
        yield
    finally:
        _stack.pop()
        total = time.perf_counter() - entry[0]
        _seconds[name] = _seconds.get(name, 0.0) + total - entry[1]
        if _stack:
            _stack[-1][1] += total


def attach_trainer() -> None:
    """A Trainer was made: phases restart unless run_job just started them for it."""
    global _trainer_attached
    if _trainer_attached:
        start_job(time.time())
    _trainer_attached = True


def add(name: str, seconds: float) -> None:
    """Time measured elsewhere (e.g. the training steps): moved out of the enclosing phase."""
    _seconds[name] = _seconds.get(name, 0.0) + seconds
    if _stack:
        _stack[-1][1] += seconds


def job_phases(wall_seconds: float | None = None, **extra: float) -> dict[str, float]:
    """This job's phases (rounded); with wall_seconds, "other" = what no phase covered."""
    seconds = {**_seconds, **extra}
    if wall_seconds is not None:
        seconds["other"] = max(0.0, wall_seconds - sum(seconds.values()))
    return {name: round(value, 3) for name, value in seconds.items()}
