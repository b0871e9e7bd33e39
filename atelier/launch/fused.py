"""Hydra launcher: the jobs of a sweep that can share a pass are trained fused.

`hydra/launcher=fused` composes every job's config, groups those that share the base
model, dataset and batch shape (atelier.fused.grouping; at most `max_adapters` per
group) and trains each group in one process (`python -m atelier.fused.worker`): one
frozen base model, one LoRA lane per job. Jobs that cannot be grouped run alone, as the
local_gpus launcher runs them. Groups and lone jobs share the GPU list (one process per
GPU; CPU slots without GPUs).

Each job still gets its own run dir, written here before its group starts as Hydra and
train.py write a run alone (.hydra/, config.yaml, command.sh that replays it alone); the
group fills in the rest (env.json, train.log, metrics, samples, LoRA, summary.json), so
the sweep's summary and report read fused and lone jobs alike. The group's own stdout and
stderr go to <sweep dir>/fused_groups/<n>/.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, _save_config, setup_globals
from omegaconf import DictConfig, open_dict, read_write

from atelier.config.schema import AtelierConfig
from atelier.config.typed import run_config
from atelier.fused.grouping import plan_groups
from atelier.launch.local_gpus import LocalGpusLauncher, child_command, job_return, user_config_dir
from atelier.launch.process_queue import Job, ProcessQueue
from atelier.outputs.run_dir import write_command, write_resolved_config
from atelier.outputs.summary import read_summary
from atelier.sweep.outcome import JobFailed, JobInterrupted

log = logging.getLogger(__name__)

GROUPS_DIR = "fused_groups"


@dataclass
class SweepJob:
    """One job of the sweep, composed: `cfg` is None when it fails validation."""

    index: int
    name: str
    overrides: list[str]
    config: DictConfig  # with the hydra node
    task: DictConfig  # without it: .hydra/config.yaml
    cfg: AtelierConfig | None  # typed and checked (atelier.config.typed)
    run_dir: Path


class FusedLauncher(LocalGpusLauncher):
    def __init__(
        self,
        gpus: Sequence[int | str] | None = None,
        max_adapters: int = 8,
        cpu_slots: int = 1,
        stop_timeout: float = 60.0,
    ):
        super().__init__(gpus=gpus, jobs_per_gpu=1, cpu_slots=cpu_slots, stop_timeout=stop_timeout)
        self.max_adapters = max_adapters  # checked by plan_groups, before any job starts

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        sweep = [self._sweep_job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        plan = plan_groups([job.cfg for job in sweep], self.max_adapters)
        queue: list[tuple[int, Job]] = []
        group_of: dict[int, Job] = {}
        for number, members in enumerate(plan.groups):
            group = self._group_job(number, [sweep[i] for i in members])
            queue.append((members[0], group))
            group_of.update({i: group for i in members})
        for index, reason in sorted(plan.alone.items()):
            job = sweep[index]
            log.info("%s runs alone: %s", job.name, reason)
            queue.append((index, Job(job.index, job.name, child_command(self.config, job.overrides, job.run_dir),
                                     job.run_dir)))  # fmt: skip
        queue.sort(key=lambda item: item[0])
        log.info(
            "launching %d jobs as %d fused group(s) and %d alone on %d slot(s): %s",
            len(sweep), len(plan.groups), len(plan.alone), len(self.slots), ", ".join(s.label for s in self.slots),
        )  # fmt: skip
        jobs = [job for _, job in queue]
        ProcessQueue(jobs, self.slots, stop_timeout=self.stop_timeout).run()
        alone = {job.index: job for job in jobs if not job.lanes}
        return [
            lane_return(group_of[i], job) if i in group_of else job_return(alone[job.index], job.overrides)
            for i, job in enumerate(sweep)
        ]

    def _sweep_job(self, index: int, overrides: list[str]) -> SweepJob:
        config, name, run_dir = self._compose(index, overrides)
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        try:
            typed = run_config(task)
        except Exception as err:  # its own process fails with this and writes its summary
            log.warning("%s: %s", name, err)
            typed = None
        return SweepJob(index, name, overrides, config, task, typed, run_dir)

    def _group_job(self, number: int, members: list[SweepJob]) -> Job:
        # The sweep dir, not a run dir's parent: hydra.sweep.subdir may nest (a/b/...).
        group_dir = Path(str(members[0].config.hydra.sweep.dir)).absolute() / GROUPS_DIR / str(number)
        for job in members:
            self._write_run_dir(job)
            link_group_logs(group_dir, job.run_dir)
        log.info("fused group %d: %s", number, ", ".join(job.name for job in members))
        command = [sys.executable, "-m", "atelier.fused.worker", *(str(job.run_dir) for job in members)]
        return Job(members[0].index, f"fused group {number}", command, group_dir, lanes=[j.run_dir for j in members])

    def _write_run_dir(self, job: SweepJob) -> None:
        """What Hydra's run_job and train.py write before training, for a job a group trains."""
        job.run_dir.mkdir(parents=True, exist_ok=True)
        hydra_dir = job.run_dir / str(job.config.hydra.output_subdir or ".hydra")
        _save_config(job.task, "config.yaml", hydra_dir)
        _save_config(DictConfig({"hydra": job.config.hydra}), "hydra.yaml", hydra_dir)
        _save_config(job.config.hydra.overrides.task, "overrides.yaml", hydra_dir)
        write_resolved_config(job.run_dir, job.cfg)
        task_overrides = list(job.config.hydra.overrides.task)
        write_command(job.run_dir, task_overrides, str(job.config.hydra.job.config_name), user_config_dir(self.config))


def link_group_logs(group_dir: Path, run_dir: Path) -> None:
    """The run dir's stdout.log / stderr.log: its group's (one process trains them all).

    A real log already there (the job once ran alone) is kept, never replaced."""
    for name in ("stdout.log", "stderr.log"):
        link = run_dir / name
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            link.symlink_to(os.path.relpath(group_dir / name, run_dir))


def lane_return(group: Job, job: SweepJob) -> JobReturn:
    """A fused job's JobReturn: what its own summary.json says (written by its lane)."""
    ret = JobReturn(overrides=job.overrides, working_dir=str(job.run_dir), task_name=job.name)
    summary = read_summary(job.run_dir)
    if summary is not None and group.started is not None and summary.get("finished_at", 0) < group.started:
        summary = None  # from an earlier run of the sweep
    status = (summary or {}).get("status")
    if status in ("completed", "pruned"):  # a pruned run ended as its trial asked: the sweeper tells the study
        ret.status, ret._return_value = JobStatus.COMPLETED, None
        return ret
    reason = (summary or {}).get("reason")
    if group.state == "not started":
        error: JobFailed = JobInterrupted("not started: the sweep was interrupted")
    elif status == "interrupted" or (summary is None and group.state == "interrupted"):
        error = JobInterrupted(f"interrupted ({reason or 'its last saved state is kept'})")
    else:
        where = group.run_dir / "stderr.log"
        error = JobFailed(reason or f"its fused group exited with {group.returncode}; see {where}")
    ret.status, ret._return_value = JobStatus.FAILED, error
    return ret
