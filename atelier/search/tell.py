"""A sweep's jobs as Optuna trials: a trial started for each job, and each job's ending told.

A run reports its validation losses to its trial while it trains (atelier.search.trial_link)
and, as it ends, tells the study how it ended, from its summary: completed (its objective)
or pruned. So the next run of a batch already compares itself with it. The sweeper tells
what the run could not (it failed, or its config never composed), with the reason kept on
the trial. A run that was interrupted stays "running": a resumed sweep continues it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from atelier.outputs.summary import read_summary
from atelier.search.study import live_trial, trial_id

log = logging.getLogger(__name__)

NAME_ATTR, OVERRIDES_ATTR, REASON_ATTR = "name", "overrides", "reason"


def start_trial(study: optuna.Study, name: str, overrides: list[str], distributions: dict | None = None) -> optuna.Trial:
    """A new trial for the job `name` (its run dir), with its values drawn from `distributions`."""
    trial = study.ask(distributions or {})
    trial.set_user_attr(NAME_ATTR, name)
    trial.set_user_attr(OVERRIDES_ATTR, list(overrides))
    return trial


def objective_value(summary: dict[str, Any], objective: str) -> float | str:
    """The run's objective, or why it has none (a str)."""
    value = summary.get(objective)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        known = ", ".join(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        return f"summary.json has no numeric {objective!r} (numeric keys: {known})"
    if not math.isfinite(value):
        return f"{objective} is {value}"
    return float(value)


def tell_ending(study: optuna.Study, store: optuna.storages.BaseStorage, number: int, job_dir: Path, objective: str,
                failure: str | None = None) -> str:
    """Tell trial `number` how its run in `job_dir` ended (summary.json), unless the run told it
    already; the trial's state (complete, pruned, fail, or running if it did not end).

    `failure`: the launcher's reason when the job failed without a summary of its own."""
    return tell_summary(study, store, number, read_summary(job_dir) or {}, objective, failure)


def tell_summary(study: optuna.Study, store: optuna.storages.BaseStorage, number: int, summary: dict[str, Any],
                 objective: str, failure: str | None = None) -> str:
    """tell_ending, from the run's summary itself."""
    trial = store.get_trial(trial_id(store, number))
    if trial.state != TrialState.RUNNING:
        return trial.state.name.lower()
    status = summary.get("status")
    if status in ("interrupted", "not started") or (status is None and failure is None):
        return "running"
    if status == "pruned":
        _tell(study, number, state=TrialState.PRUNED)
        return "pruned"
    if status == "completed":
        value = objective_value(summary, objective)
        if isinstance(value, float):
            _tell(study, number, value)
            return "complete"
        failure = value
    reason = failure or summary.get("reason") or "failed"
    live_trial(study, store, number).set_user_attr(REASON_ATTR, reason)
    _tell(study, number, state=TrialState.FAIL)
    log.warning("trial %d failed: %s", number, reason)
    return "fail"


def _tell(study: optuna.Study, number: int, value: float | None = None, state: TrialState | None = None) -> None:
    try:
        study.tell(number, value, state=state)
    except RuntimeError as err:
        # Optuna's GridSampler calls study.stop() once the grid is used up, which only an
        # optimize() loop accepts; the trial's state is stored before it raises.
        if "Study.stop" not in str(err):
            raise
