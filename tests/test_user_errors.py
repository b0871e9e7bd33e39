"""Errors a user can cause: one short line naming the key or file, no traceback, rc != 0;
HYDRA_FULL_ERROR=1 still shows the traceback. Real train.py runs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.optim.schedulers import warmup_steps
from tests.helpers import TRAIN, error_lines, run_train

FAST = ("debug=smoke", "sampling.steps=1")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["dataset=folder"], "dataset.train_data_dir"),
        (["dataset=folder", "dataset.train_data_dir=/nonexistent/pics"], "/nonexistent/pics"),
        (["optimizer.learning_rate=nan"], "optimizer.learning_rate"),
        (["optimizer.learning_rate=-1e-4"], "optimizer.learning_rate"),
        (["optimizer.unet_lr=inf"], "optimizer.unet_lr"),
        (["sampling.sampler=foo"], "sampling.sampler"),
        (["sampling.prompts=['a cat --s notanumber']"], "sampling.prompts"),
        (["sampling.prompt_file=/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
        (["dataset.resolution=60"], "dataset.resolution"),
    ],
)
def test_user_error_is_one_line_naming_the_key(tmp_path: Path, overrides: list[str], named: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(*FAST, f"hydra.run.dir={run_dir}", *overrides, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
    # Checked before anything heavy: no LoRA, no latent cache.
    assert not list(run_dir.glob("*.safetensors"))


def test_clip_skip_beyond_the_text_encoder_names_the_key(tmp_path: Path) -> None:
    proc = run_train(*FAST, f"hydra.run.dir={tmp_path / 'run'}", "training.clip_skip=100", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "training.clip_skip=100" in lines[0], proc.stderr[-2000:]


def test_full_error_env_still_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(TRAIN), *FAST, f"hydra.run.dir={tmp_path / 'run'}",
                           "optimizer.learning_rate=nan"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "optimizer.learning_rate" in proc.stderr


def test_warmup_steps_override_wins_over_the_presets_ratio(tmp_path: Path) -> None:
    assert warmup_steps(100, 7, 0.05) == 7  # explicit steps beat the preset's ratio
    assert warmup_steps(100, 0, 0.05) == 5
    run_dir = tmp_path / "run"
    proc = run_train(*FAST, f"hydra.run.dir={run_dir}", "scheduler=constant_with_warmup",
                     "scheduler.warmup_steps=1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(run_dir.glob("*.safetensors"))


def test_alpha_zero_trains_with_a_warning(tmp_path: Path) -> None:
    proc = run_train(*FAST, f"hydra.run.dir={tmp_path / 'run'}", "network.alpha=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "network.alpha=0" in proc.stdout + proc.stderr
