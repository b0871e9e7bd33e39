"""sweep.json: every job a sweep means to run, written before the first one starts.

A report reads it to list the jobs that have no folder yet (pending, or not started when
the sweep stopped) and to know which keys are the sweep's axes. Kept free of torch and
Hydra, so `atelier report` reads it cheaply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atelier.utils.atomic import write_text

# Keys that say how to run a sweep, never what a job trains: they are not axes even when
# two invocations of one sweep differ in them (a resumed sweep adds resume=true).
BOOKKEEPING_KEYS = ("resume", "trial")
BOOKKEEPING_PREFIXES = ("hydra.", "hydra/")


def is_bookkeeping(key: str) -> bool:
    """`resume`, `trial`, `hydra.*` and `hydra/*` (with any +/~ prefix): not a swept axis."""
    key = key.lstrip("+~")
    return key in BOOKKEEPING_KEYS or key == "hydra" or key.startswith(BOOKKEEPING_PREFIXES)


PLAN = "sweep.json"
# state: "running" while the sweeper runs jobs; "finished" or "interrupted" once it has stopped.
STATES = ("running", "finished", "interrupted")

log = logging.getLogger(__name__)


@dataclass
class PlannedJob:
    name: str  # the job folder, relative to the sweep folder
    overrides: list[str]  # what the user asked for this job (no hydra.* or resume)
    output_name: str | None = None  # set by the sweeper so LoRA files differ, e.g. "${project}_dim-8"


@dataclass
class SweepPlan:
    jobs: list[PlannedJob]
    swept_keys: list[str]
    constant: dict[str, str] = field(default_factory=dict)
    state: str = "running"


def plan_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / PLAN


def write_plan(sweep_dir: Path, plan: SweepPlan) -> Path:
    path = plan_path(sweep_dir)
    write_text(path, json.dumps(asdict(plan), indent=2) + "\n")
    return path


def mark_plan(sweep_dir: Path, state: str) -> None:
    """Record that the sweeper stopped ("finished" or "interrupted"); no-op without a plan."""
    if state not in STATES:
        raise ValueError(f"sweep state must be one of {STATES}, got {state!r}")
    plan = read_plan(sweep_dir)
    if plan is not None:
        plan.state = state
        write_plan(sweep_dir, plan)


def read_plan(sweep_dir: Path) -> SweepPlan | None:
    """The sweep's plan, or None for a sweep made before plans were written (or an unreadable one)."""
    path = plan_path(sweep_dir)
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        jobs = [PlannedJob(str(j["name"]), [str(o) for o in j["overrides"]], j.get("output_name")) for j in data["jobs"]]
        state = data.get("state", "running")
        return SweepPlan(jobs, [str(k) for k in data["swept_keys"]], dict(data.get("constant") or {}),
                         state if state in STATES else "running")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: unreadable sweep plan (%s); reporting the job folders found", path, error)
        return None
