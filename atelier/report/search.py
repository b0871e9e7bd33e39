"""A sweep's Optuna study (`<sweep dir>/study.db`) read into plain records for the report:
each trial and how it ended, the best one as a command line, and Optuna's parameter importances.

Optuna is imported only for a sweep that has a study, so a plain grid's report stays cheap.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.report.collect import parse_overrides
from atelier.search.settings import STUDY_FILE
from atelier.outputs.sweep_plan import read_plan

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

# Optuna's trial states as the report words them.
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass(frozen=True)
class TrialRecord:
    number: int
    name: str  # its run dir, relative to the sweep dir
    state: str  # complete | pruned | failed | running | waiting
    value: float | None  # the objective; only for a complete trial
    params: dict[str, Any]  # its values by override key (a grid: its swept values, as written)
    overrides: list[str]  # its own value overrides, as the command line takes them
    reason: str | None = None  # why it failed
    last_report: tuple[int, float] | None = None  # (step, validation loss) it last reported while training


@dataclass(frozen=True)
class SearchReport:
    kind: str  # "search", or "grid" (a grid with hydra.sweeper.prune=true)
    objective: str  # a summary.json key, e.g. best_validation_loss
    direction: str  # "minimize" | "maximize"
    trials: list[TrialRecord]
    best: TrialRecord | None
    command: str | None  # the best trial as a train.py command line
    importances: dict[str, float] = field(default_factory=dict)  # param -> share, largest first
    importances_note: str | None = None  # why there are none

    def trial_of(self, run_name: str) -> TrialRecord | None:
        return next((trial for trial in self.trials if trial.name == run_name), None)


def read_search(sweep_dir: Path) -> SearchReport | None:
    """The sweep's study as records; None when it has none (or it cannot be read: logged)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STUDY_FILE).is_file():
        return None
    from atelier.search.study import load_study  # Optuna: only for a sweep with a study

    try:
        study = load_study(sweep_dir)
    except Exception as error:  # a locked or broken study.db must not cost the rest of the report
        logger.warning("%s: unreadable study (%s); the report has no Search section", sweep_dir / STUDY_FILE, error)
        return None
    return None if study is None else search_report(study, sweep_dir)


def search_report(study: optuna.Study, sweep_dir: Path) -> SearchReport:
    attrs = study.user_attrs
    kind = str(attrs.get("kind", "search"))
    direction = str(attrs.get("direction", study.direction.name.lower()))
    plan = read_plan(sweep_dir)
    planned = {job.name: job.overrides for job in plan.jobs} if plan else {}
    swept_keys = plan.swept_keys if plan else []
    trials = [_trial(t, kind, planned, swept_keys) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t.state == "complete" and t.value is not None and math.isfinite(t.value)]
    best = None
    if complete:
        best = (min if direction == "minimize" else max)(complete, key=lambda t: t.value)
    importances, note = _importances(study, kind, direction, trials)
    return SearchReport(
        kind=kind,
        objective=str(attrs.get("objective", "objective")),
        direction=direction,
        trials=trials,
        best=best,
        command=_command(best, kind, attrs.get("fixed") or [], planned),
        importances=importances,
        importances_note=note,
    )


def _trial(trial: optuna.trial.FrozenTrial, kind: str, planned: dict[str, list[str]],
           swept_keys: list[str]) -> TrialRecord:
    from atelier.search.space import override_value

    name = str(trial.user_attrs.get("name") or f"trial-{trial.number:03d}")
    state = STATES.get(trial.state.name, trial.state.name.lower())
    if kind == "grid":  # nothing was suggested: the trial's values are its job's swept ones
        values = parse_overrides(planned.get(name, []))
        params: dict[str, Any] = {key: values[key] for key in swept_keys if key in values}
        overrides = [f"{key}={value}" for key, value in params.items()]
    else:
        params = dict(trial.params)
        overrides = [str(o) for o in trial.user_attrs.get("overrides") or
                     [f"{key}={override_value(value)}" for key, value in params.items()]]
    reported = trial.intermediate_values
    last = max(reported) if reported else None
    return TrialRecord(
        number=trial.number,
        name=name,
        state=state,
        value=trial.value if state == "complete" else None,  # a pruned trial's value is its last report
        params=params,
        overrides=overrides,
        reason=trial.user_attrs.get("reason"),
        last_report=(last, reported[last]) if last is not None else None,
    )


def _command(best: TrialRecord | None, kind: str, fixed: list[str], planned: dict[str, list[str]]) -> str | None:
    """`python train.py <fixed overrides> <the best trial's values>`; a grid's job: its planned overrides."""
    if best is None:
        return None
    if kind == "grid":
        if best.name not in planned:
            return None
        arguments = planned[best.name]
    else:
        arguments = [*fixed, *best.overrides]
    return shlex.join(["python", "train.py", *arguments])


def _importances(study: optuna.Study, kind: str, direction: str,
                 trials: list[TrialRecord]) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (its default evaluator) over the complete trials, or why there are none."""
    complete = [t for t in trials if t.state == "complete" and t.value is not None and math.isfinite(t.value)]
    if len(complete) < 2:
        return {}, f"Parameter importances need at least 2 complete trials ({len(complete)} so far)."
    varied = [key for key in complete[0].params if len({repr(t.params.get(key)) for t in complete}) > 1]
    if not varied:
        return {}, "Parameter importances need a parameter whose value differs between complete trials."
    import optuna

    if kind == "grid":
        study = _grid_study(complete, varied, direction)
    try:
        importances = optuna.importance.get_param_importances(study, params=varied)
    except Exception as error:  # the evaluator's own limits (e.g. too few distinct values)
        return {}, f"Optuna could not weigh the parameters: {error}"
    ordered = sorted(importances.items(), key=lambda item: -item[1])
    return {key: float(share) for key, share in ordered}, None


def _grid_study(complete: list[TrialRecord], keys: list[str], direction: str) -> optuna.Study:
    """A grid's complete trials as an in-memory study whose params are the jobs' swept values
    (a grid's trials suggest nothing, so its study holds no params to weigh)."""
    import optuna

    choices = {key: tuple(sorted({str(t.params.get(key)) for t in complete})) for key in keys}
    study = optuna.create_study(direction=direction)
    for t in complete:
        distributions = {key: optuna.distributions.CategoricalDistribution(choices[key]) for key in keys}
        study.add_trial(optuna.trial.create_trial(
            params={key: str(t.params.get(key)) for key in keys}, distributions=distributions, value=t.value))
    return study
