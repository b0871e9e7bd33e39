"""Each lane's own train.log in a fused process that trains several runs at once.

A record logged while a lane is current (`as_lane(k)`: its setup, epoch outputs, exit)
goes to that lane's log only; any other record (the shared base model, the fused steps)
goes to every lane's log. So each run dir reads like the log of a run trained alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# The log format of Hydra's job logging (hydra/job_logging/default.yaml).
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
JOB_LOG = "train.log"  # Hydra's <hydra.job.name>.log, as a run trained alone writes it

_current_lane: ContextVar[int | None] = ContextVar("atelier_fused_lane", default=None)


@contextmanager
def as_lane(lane: int) -> Iterator[None]:
    """Records logged inside belong to lane `lane`."""
    token = _current_lane.set(lane)
    try:
        yield
    finally:
        _current_lane.reset(token)


class _LaneFilter(logging.Filter):
    def __init__(self, lane: int):
        super().__init__()
        self.lane = lane

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_lane.get()
        return current is None or current == self.lane


@contextmanager
def lane_log_files(run_dirs: Sequence[Path], level: int = logging.INFO) -> Iterator[None]:
    """A train.log per run dir (appended: a resumed run keeps its earlier log) on the root logger."""
    root = logging.getLogger()
    handlers = []
    for lane, run_dir in enumerate(run_dirs):
        handler = logging.FileHandler(Path(run_dir) / JOB_LOG)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_LaneFilter(lane))
        root.addHandler(handler)
        handlers.append(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
