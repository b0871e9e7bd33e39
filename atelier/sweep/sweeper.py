"""Hydra sweeper for training sweeps.

Expands axes like Hydra's basic sweeper (Cartesian product), and also:
- names each job dir by the values that vary in the sweep (`optimizer=prodigy,network.dim=8`);
- with `resume=true`, skips jobs of the same sweep dir that already finished;
- after the jobs, prints which failed and why, writes the sweep report, and only then
  exits 1 if any failed (Hydra itself would raise the first error and skip its callbacks).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from atelier.sweep.compose_once import composed_once
from atelier.sweep.naming import job_names
from atelier.sweep.outcome import (
    JobFailed,
    JobInterrupted,
    JobOutcome,
    finished,
    format_summary,
    outcome_from_run_dir,
)
from atelier.train.signals import StopRequested

log = logging.getLogger(__name__)


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, JobFailed):
        return str(error)
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def _outcome(name: str, result: JobReturn) -> JobOutcome:
    if result.status != JobStatus.FAILED:
        return JobOutcome(name, "completed")
    error = result._return_value
    if isinstance(error, JobInterrupted):
        return JobOutcome(name, "not started" if str(error).startswith("not started") else "interrupted", str(error))
    return JobOutcome(name, "failed", _reason(error))


class TrainingSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = self.split_arguments(overrides, None)[0]
        names = job_names(jobs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        resume = bool(OmegaConf.select(self.config, "resume", default=False))
        outcomes, batch, batch_names = [], [], []
        for job, name in zip(jobs, names):
            if resume and finished(sweep_dir / name):
                outcomes.append(JobOutcome(name, "skipped"))
                log.info("resume: %s already finished, skipping it", name)
                continue
            # Quoted: a name holds '=' and ',' which the override grammar would split.
            batch.append([*job, f"hydra.sweep.subdir='{name}'"])
            batch_names.append(name)
        log.info("sweep of %d jobs into %s (%d to run)", len(jobs), sweep_dir, len(batch))

        try:
            with composed_once(self.hydra_context.config_loader) as configs:
                # Hydra's validate_batch_is_legal, keeping the configs for the launcher.
                configs.check(self.config, batch)
                results = self.launcher.launch(batch, initial_job_idx=0) if batch else []
        except StopRequested:
            # A signal stopped the job running in this process (its state is saved):
            # report the sweep as it stands, then stop instead of starting the next job.
            outcomes += [outcome_from_run_dir(name, sweep_dir / name) for name in batch_names]
            self._finish(sweep_dir, outcomes)
            raise
        outcomes += [_outcome(name, result) for name, result in zip(batch_names, results)]
        self._finish(sweep_dir, outcomes)
        unsuccessful = [o for o in outcomes if o.status not in ("completed", "skipped")]
        if unsuccessful:
            # The summary already says what went wrong: exit non-zero without a traceback.
            log.error("%d of %d jobs did not complete (see the summary above)", len(unsuccessful), len(outcomes))
            raise SystemExit(1)
        return [results]

    def _finish(self, sweep_dir: Path, outcomes: list[JobOutcome]) -> None:
        summary = format_summary(outcomes)
        print(summary, flush=True)
        tic = time.perf_counter()
        try:
            from atelier.report.write import write_report

            report = write_report(sweep_dir)
            print(f"report: {report} ({time.perf_counter() - tic:.1f} s)", flush=True)
        except Exception as err:  # a broken report must not hide the sweep's own outcome
            log.error("could not write the sweep report: %s", _reason(err))
