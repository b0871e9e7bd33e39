"""Hydra sweeper for training sweeps.

Expands axes like Hydra's basic sweeper (Cartesian product), and also:
- names each job dir by the values that vary in the sweep (`optimizer=prodigy,network.dim=8`),
  and each job's LoRA file too (`demo_optimizer-prodigy_dim-8.safetensors`), so the files of
  one sweep can sit in one LoRA folder;
- writes sweep.json (every planned job) before the first job, for `atelier report`;
- with `resume=true`, skips jobs of the same sweep dir that already finished, and runs a job
  whose config changed as a new job (`<name>@2`) beside the old results;
- after the jobs, prints which failed and why, writes the sweep report, and only then
  exits 1 if any failed (Hydra itself would raise the first error and skip its callbacks);
- with `hydra.sweeper.prune=true`, makes each job a trial of an Optuna study in the sweep dir
  (study.db) that its run reports its validation loss to, and that stops runs falling behind
  (a grid with early stopping);
- with `hydra.sweeper.search` set (an hparams_search/ recipe), runs a search instead
  (atelier.sweep.search): Optuna suggests each job's values from `hydra.sweeper.params`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from atelier.outputs.guard import differing_keys
from atelier.outputs.summary import finished
from atelier.sweep.compose_once import composed_once
from atelier.sweep.naming import job_names, lora_names, parse_job, swept_keys
from atelier.sweep.outcome import JobOutcome, format_summary, outcome_from_run_dir, outcome_of, reason_of
from atelier.sweep.placement import place
from atelier.outputs.sweep_plan import PlannedJob, SweepPlan, is_bookkeeping, mark_plan, write_plan
from atelier.runtime.signals import StopRequested
from atelier.search.settings import PrunerSettings, SearchSettings
from atelier.sweep.grid_trials import GridTrials
from atelier.utils.atomic import write_text

log = logging.getLogger(__name__)


def _typed(schema: type, node: Any) -> Any:
    """A sweeper setting as its dataclass (its __post_init__ checks the values)."""
    if node is None or isinstance(node, schema):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


class TrainingSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        search: SearchSettings | None = None,
        prune: bool = False,
        pruner: PrunerSettings | None = None,
    ):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.search: SearchSettings | None = _typed(SearchSettings, search)
        self.prune = prune
        self.pruner: PrunerSettings = _typed(PrunerSettings, pruner) or PrunerSettings()

    def sweep(self, arguments: list[str]) -> Any:
        if self.search is not None:
            from atelier.sweep.search import Search

            return Search(self, arguments).run()
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = self.split_arguments(overrides, None)[0]
        names = job_names(jobs)
        sweep_dir = self.sweep_dir()
        output_names = self._output_names(jobs)
        resume = self.resume
        self._save_multirun_yaml(sweep_dir, resume)
        trials = GridTrials(self, sweep_dir) if self.prune else None

        outcomes, batch, batch_names = [], [], []
        placed_names = []
        for job, name, output_name in zip(jobs, names, output_names):
            if resume:  # the guard refused a used sweep dir without resume=true or overwrite=true
                name = self._place(sweep_dir, job, name, output_name)
            placed_names.append(name)
            if resume and finished(sweep_dir / name):
                outcomes.append(JobOutcome(name, "skipped"))
                log.info("resume: %s already finished, skipping it", name)
                continue
            overrides = self._job_overrides(job, name, output_name)
            if trials is not None:
                overrides.append(f"trial={trials.number_for(name, overrides)}")
            batch.append(overrides)
            batch_names.append(name)
        log.info("sweep of %d jobs into %s (%d to run)", len(jobs), sweep_dir, len(batch))

        try:
            with composed_once(self.hydra_context.config_loader) as configs:
                # Hydra's validate_batch_is_legal, keeping the configs for the launcher.
                configs.check(self.config, batch)
                # After the check: a sweep that cannot start leaves no plan behind.
                self._write_plan(sweep_dir, jobs, placed_names, output_names)
                results = self.launcher.launch(batch, initial_job_idx=0) if batch else []
        except (StopRequested, KeyboardInterrupt):
            # A signal stopped the job running in this process (its state is saved), or a
            # second Ctrl-C: report the sweep as it stands, then stop instead of starting the next job.
            outcomes += [outcome_from_run_dir(name, sweep_dir / name) for name in batch_names]
            mark_plan(sweep_dir, "interrupted")
            self._finish(sweep_dir, outcomes)
            raise
        outcomes += [outcome_of(name, result) for name, result in zip(batch_names, results)]
        if trials is not None:
            outcomes = trials.tell(outcomes)
        stopped = any(o.status in ("interrupted", "not started") for o in outcomes)
        mark_plan(sweep_dir, "interrupted" if stopped else "finished")
        self._finish(sweep_dir, outcomes)
        unsuccessful = [o for o in outcomes if o.status not in ("completed", "pruned", "skipped")]
        if unsuccessful:
            # The summary already says what went wrong: exit non-zero without a traceback.
            log.error("%d of %d jobs did not complete (see the summary above)", len(unsuccessful), len(outcomes))
            raise SystemExit(1)
        return [results]

    def sweep_dir(self) -> Path:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return sweep_dir

    @property
    def resume(self) -> bool:
        return bool(OmegaConf.select(self.config, "resume", default=False))

    @staticmethod
    def _job_overrides(job: list[str], name: str, output_name: str | None) -> list[str]:
        # Quoted: a name holds '=' and ',' which the override grammar would split.
        naming = [f"hydra.sweep.subdir='{name}'"]
        if output_name is not None:
            naming.append(f"output.output_name={output_name}")  # only [A-Za-z0-9._+-] and ${...}
        return [*job, *naming]

    def _place(self, sweep_dir: Path, job: list[str], name: str, output_name: str | None) -> str:
        """The job's dir name in a resumed sweep: its own, or `<name>@N` if that dir holds a
        run of another config (atelier/sweep/placement.py)."""
        loader = self.hydra_context.config_loader
        placed, moved_by = place(sweep_dir, name,
                                 lambda dir_name: loader.load_sweep_config(self.config, self._job_overrides(job, dir_name, output_name)))
        if placed != name:
            log.info("resume: %s holds a run of another config (differing: %s); this job runs as %s",
                     name, ", ".join(moved_by), placed)
        return placed

    def _save_multirun_yaml(self, sweep_dir: Path, resume: bool) -> None:
        """multirun.yaml describes the sweep that made the dir; a resume with other values keeps
        it and saves its own config beside it (multirun-resumed-<UTC time>.yaml)."""
        path = sweep_dir / "multirun.yaml"
        if resume and path.is_file():
            old, new = (OmegaConf.to_container(c, resolve=False) for c in (OmegaConf.load(path), self.config))
            old.pop("hydra", None), new.pop("hydra", None)  # Hydra's node holds this command's overrides
            if not differing_keys(old, new):
                return
            path = sweep_dir / f"multirun-resumed-{datetime.now(timezone.utc):%Y-%m-%d_%H-%M-%S}.yaml"
        write_text(path, OmegaConf.to_yaml(self.config))

    def _output_names(self, jobs: list[list[str]]) -> list[str | None]:
        """Each job's output.output_name, or None where the config's own is kept (nothing varies)."""
        bases = [self.output_name_base(job) for job in jobs]
        names = lora_names(jobs, bases)
        return [None if name == base else name for name, base in zip(names, bases)]

    def output_name_base(self, job: list[str]) -> str:
        """The job's own output.output_name override, else the config's value unresolved
        (e.g. `${project}`), so it still resolves inside the job."""
        values = {key.lstrip("+~"): value for key, value in parse_job(job).items()}
        if "output.output_name" in values:
            return values["output.output_name"]
        output = OmegaConf.select(self.config, "output")
        return str(OmegaConf.to_container(output, resolve=False).get("output_name")) if output is not None else "lora"

    @staticmethod
    def _write_plan(sweep_dir: Path, jobs: list[list[str]], names: list[str], output_names: list[str | None]) -> None:
        keys = swept_keys(jobs)
        user = [[item for item in job if not is_bookkeeping(item.split("=", 1)[0])] for job in jobs]
        constant = {key.lstrip("+"): value for key, value in parse_job(user[0]).items() if key not in keys} if user else {}
        planned = [PlannedJob(name, job, output_name) for name, job, output_name in zip(names, user, output_names)]
        write_plan(sweep_dir, SweepPlan(planned, [key.lstrip("+") for key in keys], constant))

    def _finish(self, sweep_dir: Path, outcomes: list[JobOutcome]) -> None:
        summary = format_summary(outcomes)
        print(summary, flush=True)
        tic = time.perf_counter()
        try:
            from atelier.report.write import write_report

            report = write_report(sweep_dir)
            print(f"report: {report} ({time.perf_counter() - tic:.1f} s)", flush=True)
        except Exception as err:  # a broken report must not hide the sweep's own outcome
            log.error("could not write the sweep report: %s", reason_of(err))
