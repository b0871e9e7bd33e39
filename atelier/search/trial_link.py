"""A run's link to its Optuna trial: it reports its validation loss as it trains, and hears
whether its trial should stop (a pruned run).

The run finds the study beside its run dir (`<sweep dir>/study.db`, atelier.search.study)
and its trial by number (`trial=<n>`, set by the sweeper). Only the main process of a
data-parallel run holds a link; the others hear the decision through DataParallel.agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna

from atelier.errors import ConfigError
from atelier.search.tell import tell_summary
from atelier.search.study import live_trial, load_study, storage, study_path, trial_id

log = logging.getLogger(__name__)


class TrialLink:
    def __init__(self, study: optuna.Study, store: optuna.storages.BaseStorage, number: int):
        self.study, self.store, self.number = study, store, number
        self.trial = live_trial(study, store, number)
        self.trial_id = trial_id(store, number)

    @classmethod
    def open(cls, run_dir: Path, number: int) -> TrialLink:
        sweep_dir = Path(run_dir).absolute().parent
        store = storage(sweep_dir) if study_path(sweep_dir).is_file() else None
        study = load_study(sweep_dir, store) if store is not None else None
        if study is None:
            raise ConfigError(
                f"trial={number}: there is no study at {study_path(sweep_dir)}. trial is set by a search "
                "(hparams_search=...) or a sweep with hydra.sweeper.prune=true for its own runs; remove it to train alone"
            )
        try:
            return cls(study, store, number)
        except KeyError as err:
            raise ConfigError(f"trial={number}: {study_path(sweep_dir)} has no trial {number}") from err

    def tell(self, summary: dict[str, Any]) -> None:
        """A run that ended (completed or pruned) tells its trial at once: the runs after it
        compare themselves with it. The sweeper tells the other endings."""
        if summary.get("status") in ("completed", "pruned"):
            state = tell_summary(self.study, self.store, self.number, summary, self.study.user_attrs.get("objective", ""))
            log.info("trial %d: %s", self.number, state)

    def report(self, value: float, step: int) -> bool:
        """Report `value` (the validation loss) at `step`; True when the trial should stop now."""
        if step not in self.store.get_trial(self.trial_id).intermediate_values:  # a resumed run repeats the reports of its state
            self.trial.report(value, step)
        prune = self.trial.should_prune()
        if prune:
            log.info("trial %d pruned at step %d: validation loss %.5f falls behind the other trials",
                     self.number, step, value)  # fmt: skip
        return prune
