"""A sweep through a real SLURM cluster (scripts/slurm-test-cluster.sh up; CI starts one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import run_train


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
        assert (sweep_dir / job / "demo.safetensors").is_file()
        env = json.loads((sweep_dir / job / "env.json").read_text())
        assert env["hostname"]
    # submitit ran them as SLURM array tasks.
    assert list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    rows = json.loads((sweep_dir / "runs.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
