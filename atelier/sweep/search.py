"""A search (`hydra.sweeper.search` set, e.g. by `hparams_search=lr_dim`): Optuna's
ask-and-tell inside the training sweeper, so each trial is a sweep job like any other
(its run dir, LoRA name, replay, resume, the report), run by the chosen launcher.

In rounds of `n_jobs` trials: ask the study for each trial's values (the sampler draws
them from `hydra.sweeper.params`), launch the round, tell the study how each run ended
(atelier.search.tell). Runs report their validation losses as they train; with
`hydra.sweeper.prune=true` the pruner stops those that fall behind. A trial whose config
fails, or whose run fails, is recorded as failed with its reason and the search goes on.

The study is `<sweep dir>/study.db`: `resume=true` continues it; finished trials stay
as they are, trials that were running when the sweep stopped continue from their state.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from atelier.errors import ConfigError
from atelier.runtime.signals import StopRequested
from atelier.search.study import make_sampler, open_study, storage
from atelier.search.space import parse_space
from atelier.sweep.compose_once import composed_once
from atelier.sweep.naming import parse_job
from atelier.outputs.summary import write_summary
from atelier.sweep.grid_trials import told_outcome
from atelier.sweep.outcome import JobOutcome, outcome_from_run_dir, outcome_of, reason_of
from atelier.outputs.sweep_plan import PlannedJob, SweepPlan, is_bookkeeping, mark_plan, write_plan
from atelier.search.tell import NAME_ATTR, OVERRIDES_ATTR, start_trial, tell_ending

if TYPE_CHECKING:
    from atelier.sweep.sweeper import TrainingSweeper

log = logging.getLogger(__name__)


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


@dataclass
class TrialJob:
    number: int
    name: str
    values: list[str]  # the trial's own overrides (its suggested values)
    overrides: list[str]  # everything the job runs with


class Search:
    def __init__(self, sweeper: TrainingSweeper, arguments: list[str]):
        self.sweeper = sweeper
        self.settings = sweeper.search
        self.space = parse_space([*sweeper._parse_config(), *arguments])
        self.fixed = [o for o in self.space.fixed if not is_bookkeeping(o.split("=", 1)[0])]
        self.sweep_dir = sweeper.sweep_dir()
        self.store = storage(self.sweep_dir)
        self.n_trials = self._n_trials()
        self.launched = 0
        self.outcomes: list[JobOutcome] = []
        if sweeper.prune and self.settings.direction == "maximize":
            raise ConfigError(
                "hydra.sweeper.prune=true compares the runs' validation losses (lower is better), but "
                f"hydra.sweeper.search.direction=maximize ({self.settings.objective}): prune only a search that minimizes"
            )

    def _n_trials(self) -> int:
        """n_trials; for sampler=grid at most the grid's size (Optuna would repeat its points)."""
        if self.settings.sampler != "grid":
            return self.settings.n_trials
        size = math.prod(len(values) for values in self.space.grid().values())
        if size < self.settings.n_trials:
            log.info("search: the grid holds %d configs; n_trials=%d is capped to it", size, self.settings.n_trials)
        return min(size, self.settings.n_trials)

    def run(self) -> Any:
        sweeper, settings = self.sweeper, self.settings
        sweeper._save_multirun_yaml(self.sweep_dir, sweeper.resume)
        self.study = open_study(
            self.sweep_dir, self.store, settings.direction,
            pruner=sweeper.pruner if sweeper.prune else None,
            attrs={"kind": "search", "objective": settings.objective, "direction": settings.direction,
                   "fixed": self.fixed, "space": {k: repr(d) for k, d in self.space.distributions.items()}},
        )  # fmt: skip
        trials = self.study.get_trials(deepcopy=False)
        self.study.sampler = make_sampler(settings, self.space, len(trials))
        for trial in trials:
            if trial.state.is_finished():
                self.outcomes.append(JobOutcome(trial.user_attrs.get(NAME_ATTR, trial_name(trial.number)), "skipped"))
        interrupted = [self._job(t.number, t.params) for t in trials if t.state == TrialState.RUNNING]
        log.info("search: %d trials (%s sampler%s) into %s; %d done before, %d to continue",
                 self.n_trials, settings.sampler, ", pruning" if sweeper.prune else "", self.sweep_dir,
                 len(self.outcomes), len(interrupted))  # fmt: skip
        try:
            while True:
                batch, interrupted = interrupted[: settings.n_jobs], interrupted[settings.n_jobs :]
                room = self.n_trials - len(self.study.get_trials(deepcopy=False))
                batch += [self._new_job() for _ in range(min(settings.n_jobs - len(batch), room))]
                if not batch:
                    break
                if not self._run_round(batch):  # a job was stopped from outside: so is the search
                    mark_plan(self.sweep_dir, "interrupted")
                    sweeper._finish(self.sweep_dir, self.outcomes)
                    log.error("the search was interrupted; run the same command with resume=true to continue it")
                    raise SystemExit(1)
        except (StopRequested, KeyboardInterrupt):
            mark_plan(self.sweep_dir, "interrupted")
            sweeper._finish(self.sweep_dir, self.outcomes)
            raise
        mark_plan(self.sweep_dir, "finished")
        sweeper._finish(self.sweep_dir, self.outcomes)
        self._print_best()
        if not any(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False)):
            log.error("no trial of the search completed (see the summary above)")
            raise SystemExit(1)
        return []

    # ------------------------------------------------------------- trials
    def _job(self, number: int, params: dict[str, Any]) -> TrialJob:
        name = trial_name(number)
        values = [o for o in self.space.overrides(params) if o not in self.space.fixed]
        base = self.sweeper.output_name_base([*self.space.fixed, *values])
        overrides = self.sweeper._job_overrides([*self.space.fixed, *values], name, f"{base}_{name}")
        return TrialJob(number, name, values, [*overrides, f"trial={number}"])

    def _new_job(self) -> TrialJob:
        trial = start_trial(self.study, "", [], self.space.distributions)
        job = self._job(trial.number, trial.params)
        trial.set_user_attr(NAME_ATTR, job.name)
        trial.set_user_attr(OVERRIDES_ATTR, job.values)
        return job

    def _run_round(self, batch: list[TrialJob]) -> bool:
        """Launch the round's jobs and tell the study how each ended; False when one was stopped."""
        sweeper = self.sweeper
        with composed_once(sweeper.hydra_context.config_loader) as configs:
            runnable = []
            for job in batch:
                try:
                    configs.check(sweeper.config, [job.overrides])
                except Exception as err:
                    if self.launched == 0 and not self.outcomes:  # the first job: a typo'd key, a bad fixed value
                        raise
                    self._fail(job, reason_of(err))
                    continue
                runnable.append(job)
            self._write_plan()
            log.info("search: running %s", ", ".join(f"{j.name} ({' '.join(j.values)})" for j in runnable))
            try:
                results = sweeper.launcher.launch([j.overrides for j in runnable], initial_job_idx=self.launched)
            except (StopRequested, KeyboardInterrupt):
                self.outcomes += [outcome_from_run_dir(j.name, self.sweep_dir / j.name) for j in runnable]
                raise
        self.launched += len(runnable)
        stopped = False
        for job, result in zip(runnable, results):
            outcome = told_outcome(self.study, self.store, job.number, self.sweep_dir, self.settings.objective,
                                   outcome_of(job.name, result))  # fmt: skip
            stopped = stopped or outcome.status in ("interrupted", "not started")
            self.outcomes.append(outcome)
        return not stopped

    def _fail(self, job: TrialJob, reason: str) -> None:
        """A trial whose config cannot be composed: failed, with a summary.json that says why."""
        write_summary(self.sweep_dir / job.name, {"status": "failed", "reason": reason, "trial": job.number})
        tell_ending(self.study, self.store, job.number, self.sweep_dir / job.name, self.settings.objective, reason)
        self.outcomes.append(JobOutcome(job.name, "failed", reason))

    def _write_plan(self) -> None:
        jobs = []
        for trial in self.study.get_trials(deepcopy=False):
            job = self._job(trial.number, trial.params)
            base = self.sweeper.output_name_base([*self.space.fixed, *job.values])
            jobs.append(PlannedJob(job.name, [*self.fixed, *job.values], f"{base}_{job.name}"))
        constant = {k.lstrip("+"): v for k, v in parse_job(self.fixed).items()}
        write_plan(self.sweep_dir, SweepPlan(jobs, list(self.space.distributions), constant))

    def _print_best(self) -> None:
        complete = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if not complete:
            return
        best = self.study.best_trial
        values = self.space.overrides(best.params)
        command = shlex.join(["python", "train.py", *self.fixed, *(v for v in values if v not in self.space.fixed)])
        print(f"best: {trial_name(best.number)} {self.settings.objective}={best.value:.6g}\n  {command}", flush=True)
