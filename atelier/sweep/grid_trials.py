"""A grid with early stopping (`hydra.sweeper.prune=true`): each job of the grid is a trial
of the sweep's study, its run reports its validation loss, and the pruner stops runs that
fall behind the finished ones. The grid's values are the jobs' own (nothing is suggested)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from atelier.search.settings import SearchSettings
from atelier.search.study import open_study, storage
from atelier.sweep.outcome import JobOutcome
from atelier.search.tell import NAME_ATTR, REASON_ATTR, start_trial, tell_ending

if TYPE_CHECKING:
    from atelier.sweep.sweeper import TrainingSweeper

# A grid's study ranks its runs as a search does by default.
OBJECTIVE = SearchSettings.objective


class GridTrials:
    def __init__(self, sweeper: TrainingSweeper, sweep_dir: Path):
        self.sweep_dir = sweep_dir
        self.store = storage(sweep_dir)
        self.study = open_study(sweep_dir, self.store, "minimize", pruner=sweeper.pruner,
                                attrs={"kind": "grid", "objective": OBJECTIVE, "direction": "minimize"})  # fmt: skip
        # A resumed grid: a job interrupted before goes on as the same trial.
        self._running = {t.user_attrs.get(NAME_ATTR): t.number
                         for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}  # fmt: skip
        self._numbers: dict[str, int] = {}

    def number_for(self, name: str, overrides: list[str]) -> int:
        """The trial of the job `name`: its own from before, else a new one."""
        number = self._running.pop(name, None)
        if number is None:
            number = start_trial(self.study, name, overrides).number
        self._numbers[name] = number
        return number

    def tell(self, outcomes: list[JobOutcome]) -> list[JobOutcome]:
        """Tell each job's trial how it ended; the outcomes, a pruned run's as "pruned"."""
        return [outcome if (number := self._numbers.get(outcome.name)) is None
                else told_outcome(self.study, self.store, number, self.sweep_dir, OBJECTIVE, outcome)
                for outcome in outcomes]  # fmt: skip


def told_outcome(study: optuna.Study, store: optuna.storages.BaseStorage, number: int, sweep_dir: Path,
                 objective: str, outcome: JobOutcome) -> JobOutcome:
    """Tell trial `number` how its job ended (atelier.search.tell); the job's outcome as the
    sweep reports it: "pruned" for a pruned run, "failed" for a run without its objective."""
    if outcome.status not in ("completed", "failed"):
        return outcome  # interrupted or not started: the trial stays running, a resume continues it
    state = tell_ending(study, store, number, sweep_dir / outcome.name, objective,
                        outcome.reason if outcome.status == "failed" else None)  # fmt: skip
    if state == "pruned":
        return JobOutcome(outcome.name, "pruned")
    if state == "fail" and outcome.status == "completed":
        return JobOutcome(outcome.name, "failed", study.trials[number].user_attrs.get(REASON_ATTR))
    return outcome
