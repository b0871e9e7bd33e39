"""One job as train.py runs it: type and check its config, record how to replay it, train.

The job trains in this process (atelier.loop.run.run_training), or, with
training.num_processes > 1, in data-parallel worker processes started here
(atelier.launch.data_parallel) that read the run dir's config.yaml.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from atelier.config.typed import run_config
from atelier.launch.data_parallel import run_processes
from atelier.optim.optimizers import check_optimizer_args
from atelier.optim.schedulers import check_scheduler_args
from atelier.outputs.run_dir import write_command, write_resolved_config
from atelier.outputs.summary import finished, read_summary, write_summary
from atelier.runtime import phases
from atelier.runtime.distributed import in_worker
from atelier.loop.run import failure_reason, record_ending, run_training, summarise
from atelier.runtime.signals import StopRequested
from atelier.utils.atomic import remove_stale_temp_files

log = logging.getLogger(__name__)


def run_job(
    cfg: DictConfig, run_dir: Path, overrides: list[str], config_name: str = "config", config_dir: str | None = None
) -> dict[str, Any]:
    """One job as train.py runs it: check, record how to replay it, then train.

    summary.json is written whatever happens, so a sweep report can tell why a job failed.
    """
    started = time.time()
    phases.start_job(started)
    if cfg.resume and finished(run_dir):  # the run dir guard let it through to be kept as it is
        log.info("resume: %s already holds this finished run; nothing to train", run_dir)
        return read_summary(run_dir)
    if not in_worker():  # the dir's one writer (it holds the lock); data-parallel ranks share it
        for stale in remove_stale_temp_files(run_dir):
            log.info("removed %s, left by a killed run", stale.relative_to(run_dir))
    try:
        typed = run_config(cfg)  # the boundary: below here the config is AtelierConfig
        # The optimizer and a class-path schedule against their constructors: their packages are
        # imported here, before the model loads.
        check_optimizer_args(typed.optimizer.type, typed.optimizer.args)
        check_scheduler_args(typed.scheduler)
        write_resolved_config(run_dir, typed)
        write_command(run_dir, overrides, config_name, config_dir)
    except Exception as err:
        record_ending(run_dir, summarise("failed", None, started, failure_reason(err)))
        raise
    if typed.training.num_processes > 1 and not in_worker():
        return run_data_parallel(run_dir, typed.training.num_processes, started)
    return run_training(typed, run_dir, started)


class TrainingProcessFailed(RuntimeError):
    """A process of a data-parallel run failed; the message says which and why."""


def run_data_parallel(run_dir: Path, num_processes: int, started: float) -> dict[str, Any]:
    """Train on `num_processes` processes (they read run_dir/config.yaml); the main one's summary."""
    codes, flag = run_processes(run_dir, num_processes)
    summary = read_summary(run_dir) or {}
    if flag:
        reason = summary.get("reason") or f"stopped by {flag.name}"
        flag.pass_on()  # e.g. submitit's SIGUSR2 handler: requeue the job and exit
        raise StopRequested(flag, reason)
    if any(codes):
        failed = ", ".join(f"process {rank} exited with {code}" for rank, code in enumerate(codes) if code)
        if summary.get("status") != "failed":  # the main process may have been stopped before it could say
            summary = summarise("failed", None, started, f"{failed}; see its output above or stderr.log")
            write_summary(run_dir, summary)
        raise TrainingProcessFailed(f"{failed}: {summary['reason']}")
    return summary


