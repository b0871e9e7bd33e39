"""Run jobs as child processes, at most one per slot, until all are done.

Each job is a separate `python train.py ...` process with its own
CUDA_VISIBLE_DEVICES and its stdout/stderr in its run dir. Ctrl-C (or SIGTERM to
the launcher) stops the queue and sends SIGTERM to the running jobs, which save
their state and exit; jobs that never started are reported as such.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atelier.outputs.summary import read_summary

from atelier.launch.devices import Slot
from atelier.launch.lifetime import die_with_parent
from atelier.launch.status import StatusBoard

log = logging.getLogger(__name__)


@dataclass
class Job:
    index: int
    name: str
    command: list[str]
    run_dir: Path
    slot: Slot | None = None
    process: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    state: str = "queued"  # queued | running | completed | pruned | failed | interrupted | not started
    returncode: int | None = None
    # A fused group (atelier.launch.fused): the run dirs it trains; its own run_dir holds its logs.
    lanes: list[Path] = field(default_factory=list)
    _logs: list = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.time()) - self.started


class ProcessQueue:
    def __init__(self, jobs: Sequence[Job], slots: Sequence[Slot], poll_seconds: float = 0.25, stop_timeout: float = 60):
        self.queue = deque(jobs)
        self.jobs = list(jobs)
        self.free = list(slots)
        self.running: list[Job] = []
        self.poll_seconds = poll_seconds
        self.stop_timeout = stop_timeout
        self.board = StatusBoard(self.jobs)
        self.stop_signal: int | None = None

    def run(self) -> list[Job]:
        # Ctrl-C / SIGTERM set a flag the loop reads between polls: a KeyboardInterrupt raised
        # at an arbitrary point (inside Popen, a status refresh) could be swallowed there. A
        # launcher started by a process that ignores or blocks SIGINT (a test runner's worker, a
        # background job) inherits that; a launcher is there to be stopped: both are undone.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.board:
                while (self.queue or self.running) and self.stop_signal is None:
                    self._start_jobs()
                    self._reap()
                    self.board.refresh()
                    time.sleep(self.poll_seconds)
                if self.stop_signal is not None:
                    self._stop()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: the jobs still running are killed now
            self.stop_timeout = 0
            self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.jobs

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            raise KeyboardInterrupt

    def _start_jobs(self) -> None:
        while self.queue and self.free:
            job, slot = self.queue.popleft(), self.free.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices}
            stdout = open(job.run_dir / "stdout.log", "ab")
            stderr = open(job.run_dir / "stderr.log", "ab")
            # Own session: a Ctrl-C in the terminal reaches the launcher only, which
            # then stops the jobs in order.
            job.process = subprocess.Popen(
                job.command, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent(),  # a launcher killed with SIGKILL leaves no job training
            )
            job._logs = [stdout, stderr]
            job.slot, job.started, job.state = slot, time.time(), "running"
            self.running.append(job)
            self.board.changed(job)

    def _reap(self) -> None:
        for job in list(self.running):
            code = job.process.poll()
            if code is None:
                continue
            self._finish(job, code, self._ended(job) if code == 0 else "failed")

    @staticmethod
    def _ended(job: Job) -> str:
        """A job that exited 0: "completed", or "pruned" when its search trial stopped it early."""
        if job.lanes:  # a fused group: each lane says in its own summary
            return "completed"
        return "pruned" if (read_summary(job.run_dir) or {}).get("status") == "pruned" else "completed"

    def _finish(self, job: Job, code: int, state: str) -> None:
        job.returncode, job.ended, job.state = code, time.time(), state
        for fh in job._logs:
            fh.close()
        self.running.remove(job)
        self.free.append(job.slot)
        self.free.sort(key=lambda s: s.index)
        self.board.changed(job)

    def _stop(self) -> None:
        log.warning("interrupted: stopping %d running job(s) (they save their state)", len(self.running))
        for job in self.queue:
            job.state = "not started"
        self.queue.clear()
        for job in self.running:
            _signal_group(job.process, signal.SIGTERM)
        deadline = time.time() + self.stop_timeout
        while self.running and time.time() < deadline:
            for job in list(self.running):
                if job.process.poll() is not None:
                    self._finish(job, job.process.returncode, "interrupted")
            time.sleep(self.poll_seconds)
        for job in list(self.running):
            log.warning("%s did not stop within %.0f s: killing it", job.name, self.stop_timeout)
            _signal_group(job.process, signal.SIGKILL)
            job.process.wait()
            self._finish(job, job.process.returncode, "interrupted")



def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
