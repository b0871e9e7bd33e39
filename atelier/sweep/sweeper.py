"""Hydra sweeper for training sweeps.

Expands axes like Hydra's basic sweeper (Cartesian product), and also:
- names each job dir by the values that vary in the sweep (`optimizer=prodigy,network.dim=8`),
  and each job's LoRA file too (`demo_optimizer-prodigy_dim-8.safetensors`), so the files of
  one sweep can sit in one LoRA folder;
- writes sweep.json (every planned job) before the first job, for `atelier report`;
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
from atelier.sweep.naming import is_bookkeeping, job_names, lora_names, parse_job, swept_keys
from atelier.sweep.outcome import (
    JobFailed,
    JobInterrupted,
    JobOutcome,
    finished,
    format_summary,
    outcome_from_run_dir,
)
from atelier.sweep.plan import PlannedJob, SweepPlan, mark_plan, write_plan
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

        output_names = self._output_names(jobs)

        resume = bool(OmegaConf.select(self.config, "resume", default=False))
        outcomes, batch, batch_names = [], [], []
        for job, name, output_name in zip(jobs, names, output_names):
            if resume and finished(sweep_dir / name):
                outcomes.append(JobOutcome(name, "skipped"))
                log.info("resume: %s already finished, skipping it", name)
                continue
            # Quoted: a name holds '=' and ',' which the override grammar would split.
            naming = [f"hydra.sweep.subdir='{name}'"]
            if output_name is not None:
                naming.append(f"output.output_name={output_name}")  # only [A-Za-z0-9._+-] and ${...}
            batch.append([*job, *naming])
            batch_names.append(name)
        log.info("sweep of %d jobs into %s (%d to run)", len(jobs), sweep_dir, len(batch))

        try:
            with composed_once(self.hydra_context.config_loader) as configs:
                # Hydra's validate_batch_is_legal, keeping the configs for the launcher.
                configs.check(self.config, batch)
                # After the check: a sweep that cannot start leaves no plan behind.
                self._write_plan(sweep_dir, jobs, names, output_names)
                results = self.launcher.launch(batch, initial_job_idx=0) if batch else []
        except StopRequested:
            # A signal stopped the job running in this process (its state is saved):
            # report the sweep as it stands, then stop instead of starting the next job.
            outcomes += [outcome_from_run_dir(name, sweep_dir / name) for name in batch_names]
            mark_plan(sweep_dir, "interrupted")
            self._finish(sweep_dir, outcomes)
            raise
        outcomes += [_outcome(name, result) for name, result in zip(batch_names, results)]
        stopped = any(o.status in ("interrupted", "not started") for o in outcomes)
        mark_plan(sweep_dir, "interrupted" if stopped else "finished")
        self._finish(sweep_dir, outcomes)
        unsuccessful = [o for o in outcomes if o.status not in ("completed", "skipped")]
        if unsuccessful:
            # The summary already says what went wrong: exit non-zero without a traceback.
            log.error("%d of %d jobs did not complete (see the summary above)", len(unsuccessful), len(outcomes))
            raise SystemExit(1)
        return [results]

    def _output_names(self, jobs: list[list[str]]) -> list[str | None]:
        """Each job's output.output_name, or None where the config's own is kept (nothing varies).

        The base is the job's own output.output_name override, else the config's value
        unresolved (e.g. `${project}`), so it still resolves inside each job.
        """
        output = OmegaConf.select(self.config, "output")
        default = str(OmegaConf.to_container(output, resolve=False).get("output_name")) if output is not None else "lora"
        bases = []
        for job in jobs:
            values = {key.lstrip("+~"): value for key, value in parse_job(job).items()}
            bases.append(values.get("output.output_name", default))
        names = lora_names(jobs, bases)
        return [None if name == base else name for name, base in zip(names, bases)]

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
            log.error("could not write the sweep report: %s", _reason(err))
