"""Start the processes of one data-parallel run (training.num_processes > 1) and wait for them.

Each process is `python -m atelier.loop.worker <run_dir>` with the environment
torch.distributed expects (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
accelerate reads it and forms the process group (one GPU per process, in
CUDA_VISIBLE_DEVICES order, or gloo on the CPU). The processes read the run dir's
resolved config.yaml, so they train exactly what was recorded there.

A stop signal to this process (SIGTERM, SIGUSR1/2, a launcher stopping the job) is
passed to every process, which save the training state together and exit; when a
process fails, the others are stopped rather than left waiting for its gradients.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from atelier.launch.lifetime import die_with_parent
from atelier.runtime.signals import StopFlag, stop_on_signals

log = logging.getLogger(__name__)

# How long the other processes get to exit on their own after one has failed.
FAILURE_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = {**os.environ}
    if rank > 0:
        env["TQDM_DISABLE"] = "1"  # one set of progress bars: the main process's
    return {
        **env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }


def run_processes(run_dir: Path, num_processes: int, poll_seconds: float = 0.2) -> tuple[list[int], StopFlag]:
    """Train the run in `run_dir` on `num_processes` processes; their exit codes and any stop signal."""
    port = free_port()
    command = [sys.executable, "-m", "atelier.loop.worker", str(run_dir)]
    log.info("data-parallel training on %d processes (port %d)", num_processes, port)
    with stop_on_signals() as flag:
        procs = [subprocess.Popen(command, env=worker_env(r, num_processes, port), preexec_fn=die_with_parent())
                 for r in range(num_processes)]
        _wait(procs, flag, poll_seconds)
    return [p.returncode for p in procs], flag


def _wait(procs: list[subprocess.Popen], flag: StopFlag, poll_seconds: float) -> None:
    forwarded = False
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        if flag and not forwarded:
            # Each process saves the state at the same step and exits; SIGTERM, whatever
            # came here (SIGUSR2 is for submitit in this process, not for them).
            _signal_all(procs, signal.SIGTERM)
            forwarded = True
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs) and not flag:
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > FAILURE_GRACE_SECONDS:
            log.error("a training process failed: stopping the others")
            _signal_all(procs, signal.SIGKILL)
        time.sleep(poll_seconds)


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
