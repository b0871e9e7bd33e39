"""Hydra launcher: a sweep's jobs as separate processes, one per free GPU (or CPU slot)."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

from atelier.launch.devices import make_slots
from atelier.launch.process_queue import Job, ProcessQueue
from atelier.outputs.summary import read_summary
from atelier.sweep.outcome import JobFailed, JobInterrupted

log = logging.getLogger(__name__)


def _quote(value: str) -> str:
    """A value for Hydra's override grammar, where ',' '=' and spaces have meaning."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_command(config: DictConfig, overrides: Sequence[str], run_dir: Path) -> list[str]:
    """`python train.py <the job's overrides> hydra.run.dir=<its dir>` with the same config source."""
    hydra = config.hydra
    command = [sys.executable, sys.argv[0]]
    if user_config_dir(config):
        command += ["--config-dir", user_config_dir(config)]
    if hydra.job.config_name != "config":
        command += ["--config-name", hydra.job.config_name]
    command += [o for o in overrides if not o.startswith("hydra.sweep.")]
    return command + [f"hydra.run.dir={_quote(str(run_dir))}"]


def user_config_dir(config: DictConfig) -> str | None:
    """The --config-dir the sweep was started with, if any."""
    for source in config.hydra.runtime.config_sources:
        if source.provider == "command-line":
            return source.path.removeprefix("file://")
    return None


def job_return(job: Job, overrides: Sequence[str]) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), working_dir=str(job.run_dir), task_name=job.name)
    if job.state in ("completed", "pruned"):  # pruned: ended as its trial asked; the sweeper tells the study
        ret.status, ret._return_value = JobStatus.COMPLETED, None
    else:
        error = JobInterrupted if job.state in ("interrupted", "not started") else JobFailed
        ret.status, ret._return_value = JobStatus.FAILED, error(failure_reason(job))
    return ret


def failure_reason(job: Job) -> str:
    if job.state == "not started":
        return "not started: the sweep was interrupted"
    reason = (read_summary(job.run_dir) or {}).get("reason")
    if job.state == "interrupted":
        return f"interrupted after {job.elapsed:.0f} s ({reason or 'its last saved state is kept'})"
    return reason or f"exit code {job.returncode}; see {job.run_dir / 'stderr.log'}"


class LocalGpusLauncher(Launcher):
    def __init__(
        self,
        gpus: Sequence[int | str] | None = None,
        jobs_per_gpu: int = 1,
        cpu_slots: int = 1,
        stop_timeout: float = 60.0,
        gpus_per_job: int = 1,
    ):
        self.slots = make_slots(gpus, jobs_per_gpu, cpu_slots, gpus_per_job)
        self.stop_timeout = stop_timeout
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        log.info(
            "launching %d jobs on %d slot(s): %s",
            len(job_overrides),
            len(self.slots),
            ", ".join(s.label for s in self.slots),
        )
        jobs = [self._job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for job in jobs:
            log.debug("%s: %s", job.name, shlex.join(job.command))
        ProcessQueue(jobs, self.slots, stop_timeout=self.stop_timeout).run()
        return [job_return(job, o) for job, o in zip(jobs, job_overrides)]

    def _job(self, index: int, overrides: list[str]) -> Job:
        _, subdir, run_dir = self._compose(index, overrides)
        return Job(index, subdir, child_command(self.config, overrides, run_dir), run_dir)

    def _compose(self, index: int, overrides: list[str]) -> tuple[DictConfig, str, Path]:
        """The job's whole config (hydra node included, as Hydra's own launcher has it),
        its name (hydra.sweep.subdir) and its run dir."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = index
        HydraConfig.instance().set_config(sweep_config)
        subdir = str(sweep_config.hydra.sweep.subdir)
        run_dir = Path(str(sweep_config.hydra.sweep.dir)).absolute() / subdir
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = str(run_dir)
        return sweep_config, subdir, run_dir
