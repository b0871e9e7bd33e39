"""`python train.py` as a user runs it: run dir layout, replay, errors (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from atelier.network.lora_file import load_lora
from tests.helpers import REPO_ROOT, run_train


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_train("debug=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_dir_layout(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    assert {".hydra", "config.yaml", "command.sh", "env.json", "demo.safetensors", "samples", "sample_grid.png",
            "tensorboard", "metrics.jsonl", "summary.json", "train.log"} <= names
    # debug=smoke: no intermediate checkpoints, one tiny sample, 2 steps.
    assert sorted(p.name for p in smoke_run.glob("*.safetensors")) == ["demo.safetensors"]
    assert len(list((smoke_run / "samples").glob("*.png"))) == 1
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    log = (smoke_run / "train.log").read_text()
    assert "total optimization steps: 2" in log and "create LoRA for U-Net" in log


def test_resolved_config_and_env(smoke_run):
    text = (smoke_run / "config.yaml").read_text()
    assert "${" not in text
    cfg = yaml.safe_load(text)
    assert cfg["dataset"]["train_data_dir"] == str(REPO_ROOT / "atelier" / "assets" / "demo_dataset")
    assert cfg["training"]["max_train_steps"] == 2
    env = json.loads((smoke_run / "env.json").read_text())
    assert env["device"] == "cpu"
    assert {"torch", "diffusers", "transformers", "kohya-atelier"} <= set(env["versions"])
    assert all(env["versions"][p] for p in ("torch", "diffusers", "transformers"))
    assert "CUDA_VISIBLE_DEVICES" in env and env["python"]


def test_sample_grid_is_an_image(smoke_run):
    with Image.open(smoke_run / "sample_grid.png") as grid:
        assert grid.width > 64 and grid.height > 64


def test_command_sh_replays_the_job_from_any_directory(smoke_run, tmp_path):
    replay_dir = tmp_path / "replay"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", str(smoke_run / "command.sh"), f"hydra.run.dir={replay_dir}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (replay_dir / "config.yaml").read_text() == (smoke_run / "config.yaml").read_text()
    original, replayed = load_lora(smoke_run / "demo.safetensors")[0], load_lora(replay_dir / "demo.safetensors")[0]
    assert all(torch.equal(original[k], replayed[k]) for k in original)


def _copy_demo(tmp_path: Path) -> Path:
    dataset = tmp_path / "my_set"
    shutil.copytree(REPO_ROOT / "atelier" / "assets" / "demo_dataset", dataset)
    return dataset


@pytest.mark.parametrize(
    "make_dataset,expected",
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: _copy_demo(d) / "6_atelier cube", "looks like an image folder"),
    ],
)
def test_dataset_errors_name_the_path(tmp_path, make_dataset, expected):
    dataset = make_dataset(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_train("dataset=folder", f"dataset.train_data_dir={dataset}", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr and str(dataset) in proc.stderr
    assert not list(run_dir.glob("*.safetensors"))


def test_corrupt_image_is_named(tmp_path):
    dataset = _copy_demo(tmp_path)
    broken = dataset / "4_atelier orb" / "orb_01.png"
    broken.write_bytes(b"not a png")
    proc = run_train("dataset=folder", f"dataset.train_data_dir={dataset}", f"hydra.run.dir={tmp_path / 'run'}",
                     timeout=120)
    assert proc.returncode != 0
    assert "orb_01.png" in proc.stderr
    assert broken.read_bytes() == b"not a png"  # the user's file is left as it was
