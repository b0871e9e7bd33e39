"""The local_gpus launcher: a real sweep through train.py, one job per device slot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.launch.devices import Slot, make_slots
from tests.helpers import REPO_ROOT, TRAIN, final_lora, run_train


def test_slots_per_gpu_and_cpu():
    assert [s.label for s in make_slots(["0", "1"], 2, 1)] == ["gpu 0", "gpu 0", "gpu 1", "gpu 1"]
    assert [s.cuda_visible_devices for s in make_slots([], 1, 3)] == ["", "", ""]  # CPU jobs see no GPU
    assert make_slots([], 1, 2) == [Slot(0, None), Slot(1, None)]
    with pytest.raises(ValueError, match="jobs_per_gpu"):
        make_slots(["0"], 0, 1)


def test_slots_for_data_parallel_jobs_group_gpus():
    slots = make_slots(["0", "1", "2", "3", "4"], 1, 1, gpus_per_job=2)
    # The fifth GPU stays idle: a 2-process job cannot run on one.
    assert [s.cuda_visible_devices for s in slots] == ["0,1", "2,3"]
    assert [s.label for s in slots] == ["gpu 0,1", "gpu 2,3"]
    with pytest.raises(ValueError, match="gpus_per_job=4, but only 2 GPU"):
        make_slots(["0", "1"], 1, 1, gpus_per_job=4)


@pytest.fixture(scope="module")
def gpu_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("gpus") / "sweep"
    proc = run_train("-m", "hydra/launcher=local_gpus", "hydra.launcher.gpus=[0,1]",
                     "optimizer=adamw,prodigy,lion,adafactor,dadapt_adam", "debug=smoke",
                     f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return sweep_dir


def _intervals(sweep_dir: Path) -> list[tuple[float, float, str]]:
    out = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        env = json.loads((job / "env.json").read_text())
        summary = json.loads((job / "summary.json").read_text())
        out.append((env["started_at"], summary["finished_at"], env["CUDA_VISIBLE_DEVICES"]))
    return out


def test_five_jobs_on_two_gpus_never_share_a_device(gpu_sweep):
    intervals = _intervals(gpu_sweep)
    assert len(intervals) == 5
    assert {device for _, _, device in intervals} == {"0", "1"}
    events = sorted([(start, 1) for start, _, _ in intervals] + [(end, -1) for _, end, _ in intervals])
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    for i, (s1, e1, d1) in enumerate(intervals):
        for s2, e2, d2 in intervals[i + 1:]:
            if d1 == d2:
                assert e1 <= s2 or e2 <= s1, "two jobs ran on the same device at once"


def test_each_job_has_its_logs_and_outputs(gpu_sweep):
    for job in (p for p in gpu_sweep.iterdir() if p.is_dir()):
        assert (job / "stdout.log").is_file() and (job / "stderr.log").is_file()
        assert "total optimization steps" in (job / "train.log").read_text()
        assert final_lora(job).is_file()
    assert (gpu_sweep / "report.html").is_file()


def test_ctrl_c_stops_the_queue_and_running_jobs(tmp_path):
    """SIGINT to the launcher: running jobs get SIGTERM, queued ones never start. The launcher is
    started ignoring SIGINT (as a background job or a test runner's worker may leave it): it
    takes Ctrl-C all the same."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "-m", "hydra/launcher=local_gpus", "hydra.launcher.cpu_slots=1",
         "hydra.launcher.gpus=null", "network.dim=4,8,16", "training.max_train_epochs=50", "output.save_every_n_epochs=null",
         "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    first = sweep_dir / "network.dim=4"
    deadline = time.time() + 240
    while not (first / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert (first / "metrics.jsonl").is_file(), "the first job never started training"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert "interrupted: stopping 1 running job(s)" in out
    assert "not started: the sweep was interrupted" in out
    assert "1 interrupted, 2 not started" in out
    assert not (sweep_dir / "network.dim=16" / "summary.json").exists()
    # The running job finished its step, saved its state and said so.
    summary = json.loads((first / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "stopped by SIGTERM" in summary["reason"]
    assert (first / "training_state.pt").is_file() and (first / "config.yaml").is_file()
    assert (sweep_dir / "report.html").is_file()
