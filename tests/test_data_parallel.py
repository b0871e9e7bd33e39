"""One run on two processes (gloo on the CPU): sd-scripts' step arithmetic, the same
training as one process with the gradients of both batches, stop and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from atelier.network.lora_file import load_lora
from atelier.conditioning.training_data import Batch, shard
from atelier.loop.state import STATE_FILE
from tests.helpers import REPO_ROOT, TRAIN, sigterm_after_steps
from tests.test_trainer import fresh_accelerate_state, steps_logged, train  # noqa: F401

# demo: 56 samples, batch 4 -> 14 batches an epoch; 2 processes -> 7 steps an epoch.
ARGS = ["training.max_train_epochs=2", "training.train_batch_size=4", "output.save_every_n_epochs=null",
        "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=2"]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(run_dir) -> list[str]:
    return [sys.executable, str(TRAIN), *ARGS, "training.num_processes=2", f"hydra.run.dir={run_dir}"]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_lora(run_dir / "demo.safetensors")[0]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp") / "run"
    proc = subprocess.run(command(run_dir), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_shard_gives_every_process_the_same_number_of_batches():
    batches = [Batch([i], [False], [0], [""]) for i in range(5)]
    shares = [[b.indices[0] for b in shard(batches, rank, 2)] for rank in (0, 1)]
    assert shares == [[0, 2, 4], [1, 3, 0]]  # the short process wraps to the first batch
    assert shard(batches, 0, 1) is batches


def test_steps_per_epoch_follow_the_processes(two_processes):
    summary = json.loads((two_processes / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 14 and summary["epochs"] == 2
    # One writer: each step logged once, by the main process.
    assert [r["step"] for r in steps_logged(two_processes)] == list(range(1, 15))
    assert json.loads((two_processes / "env.json").read_text())["num_processes"] == 2
    log = (two_processes / "train.log").read_text()
    assert "processes: 2" in log and "total batch size: 8" in log


def test_two_processes_train_what_one_process_trains_with_both_batches(two_processes, tmp_path):
    # One process, batches 2i and 2i+1 accumulated into one step: the same gradients.
    reference, _ = train(tmp_path, *ARGS, "training.gradient_accumulation_steps=2")
    a, b = weights(reference), weights(two_processes)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert any(b[k].abs().sum() > 0 for k in b if k.endswith("lora_up.weight"))


def test_sigterm_stops_every_process_at_one_step_and_the_run_resumes(two_processes, tmp_path):
    run_dir = tmp_path / "run"
    code, out = sigterm_after_steps(command(run_dir), run_dir, steps=2, env=ENV)
    assert code == 143, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < 14
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert state["steps"] == summary["steps"]

    again = subprocess.run(command(run_dir), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    a, b = weights(two_processes), weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
