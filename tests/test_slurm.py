"""A sweep through a real SLURM cluster (scripts/slurm-test-cluster.sh up; CI starts one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from atelier.network.lora_file import load_lora
from atelier.loop.run import run_training
from tests.helpers import REPO_ROOT, TRAIN, final_lora, run_train
from tests.test_trainer import make_cfg


def cluster_up() -> bool:
    if not os.environ.get("SLURM_CONF") or not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


# CI brings a cluster up; elsewhere these tests need `scripts/slurm-test-cluster.sh up`.
pytestmark = pytest.mark.skipif(
    not cluster_up() and not os.environ.get("CI"), reason="no SLURM test cluster (scripts/slurm-test-cluster.sh up)"
)

SMALL_JOBS = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
              "hydra.launcher.timeout_min=10"]


def test_sweep_runs_through_slurm(tmp_path):
    assert cluster_up(), "CI must start the SLURM test cluster before the tests"
    sweep_dir = tmp_path / "sweep"
    proc = run_train("-m", "optimizer=adamw,lion", "network.dim=4,8", "debug=smoke", "hydra/launcher=slurm",
                     *SMALL_JOBS, f"hydra.sweep.dir={sweep_dir}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == sorted(f"optimizer={o},network.dim={d}" for o in ("adamw", "lion") for d in (4, 8))
    for job in jobs:
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 2
        assert final_lora(sweep_dir / job).is_file()
        env = json.loads((sweep_dir / job / "env.json").read_text())
        assert env["hostname"]
    # submitit ran them as SLURM array tasks.
    assert list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    rows = json.loads((sweep_dir / "runs.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)


def _sweep_jobs(sweep_dir, state: str | None = None) -> list[str]:
    """SLURM ids of this sweep's array tasks (submitit names its folders by the array id)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
    mine = {p.name for p in (sweep_dir / ".submitit").iterdir()} if (sweep_dir / ".submitit").is_dir() else set()
    rows = [line.split() for line in out.splitlines()]
    return [i for i, s in rows if i.split("_")[0] in mine and (state is None or s == state)]


def test_a_signalled_job_is_requeued_and_resumes_to_the_same_weights(tmp_path):
    """SLURM's warning signal (USR2, as before a timeout or preemption): the job saves its state,
    submitit requeues it, and the requeued job continues from the state to the weights of an
    uninterrupted run."""
    assert cluster_up(), "CI must start the SLURM test cluster before the tests"
    sweep_dir = tmp_path / "sweep"
    args = ["training.max_train_epochs=2", "training.train_batch_size=1", "output.save_every_n_epochs=null",
            "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "-m", "network.dim=4", *args, "hydra/launcher=slurm", *SMALL_JOBS,
         "hydra.launcher.max_num_timeout=2", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    job_dir = sweep_dir / "job0"  # nothing varies in a one-job sweep
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (job_dir / "metrics.jsonl").is_file() and len((job_dir / "metrics.jsonl").read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        ids = _sweep_jobs(sweep_dir, "RUNNING")
        assert len(ids) == 1, f"expected one running job, squeue says {ids}"
        subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        for job in _sweep_jobs(sweep_dir):
            subprocess.run(["scancel", job], check=False)
    assert proc.returncode == 0, out[-4000:]
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "stopped by SIGUSR2" in logs and "Requeued job" in logs
    assert "resuming from training_state.pt" in (job_dir / "train.log").read_text()
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 112

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    reference = tmp_path / "reference"
    reference.mkdir()
    run_training(make_cfg(*args, "network.dim=4"), reference)
    a, b = load_lora(final_lora(reference))[0], load_lora(final_lora(job_dir))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (job_dir / "metrics.jsonl").read_text().splitlines()
             if "loss/step" in line]  # fmt: skip
    assert steps == list(range(1, 113))


def test_a_search_runs_its_trials_through_slurm(tmp_path):
    """hparams_search with hydra/launcher=slurm: each round's trials are SLURM array tasks that
    find the study in the sweep dir (shared file system) and report to it from the node."""
    assert cluster_up(), "CI must start the SLURM test cluster before the tests"
    sweep_dir = tmp_path / "search"
    proc = run_train("-m", "hparams_search=lr_dim", "hydra.sweeper.search.n_trials=2", "hydra.sweeper.search.n_jobs=2",
                     "training.max_train_steps=24", "sampling.limit=1", "sampling.sample_every_n_epochs=null",
                     "hydra/launcher=slurm", *SMALL_JOBS, f"hydra.sweep.dir={sweep_dir}", timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from optuna.trial import TrialState

    from atelier.search.study import load_study

    study = load_study(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        assert trial.intermediate_values.keys() == {12}  # epoch 1's report, from the node
        summary = json.loads((sweep_dir / trial.user_attrs["name"] / "summary.json").read_text())
        assert trial.value == summary["best_validation_loss"]
    assert list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
