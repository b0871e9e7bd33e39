"""`atelier dataset check` agrees with train.py: same options, same steps; bucket bounds that work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.cli import main
from atelier.data.buckets import BucketSettings, make_bucket_resolutions, single_bucket_warning, suggested_bucket_bounds
from tests.helpers import REPO_ROOT, run_train

# Buckets on, a held-out split, an odd batch size and several processes' worth of arithmetic.
RUN = ["dataset.enable_bucket=true", "dataset.validation_split=0.2", "training.train_batch_size=3",
       "training.max_train_epochs=1", "sampling.sample_every_n_epochs=null", "output.save_every_n_epochs=null",
       "sampling.limit=1", "sampling.steps=1"]
SD_BOUNDS = ["dataset.min_bucket_reso=256", "dataset.max_bucket_reso=1024", "dataset.bucket_reso_steps=64"]


def check_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atelier.cli", "dataset", "check", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


def total_steps(text: str, pattern: str) -> int:
    match = re.search(pattern, text)
    assert match, text[-3000:]
    return int(match.group(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "run"
    proc = run_train(*RUN, f"hydra.run.dir={path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


@pytest.mark.slow
def test_check_counts_the_steps_the_run_trained(run_dir: Path) -> None:
    trained = total_steps((run_dir / "train.log").read_text(), r"total optimization steps: (\d+)")
    same_overrides = check_cli(*RUN)
    assert same_overrides.returncode == 0, same_overrides.stderr
    assert total_steps(same_overrides.stdout, r"total steps: (\d+)") == trained
    from_run = check_cli("--config", str(run_dir))
    assert from_run.returncode == 0, from_run.stderr
    assert total_steps(from_run.stdout, r"total steps: (\d+)") == trained
    assert "batch size 3" in from_run.stdout and "validation_split 0.2" in from_run.stdout
    # The tiny model's own bucket bounds: several buckets, no warning.
    assert "bucketing on (32-128, step 16)" in from_run.stdout and "single" not in from_run.stdout
    assert int(re.search(r"sum over (\d+) bucket", from_run.stdout).group(1)) > 1


@pytest.mark.slow
def test_a_single_bucket_is_a_warning_in_training_and_in_the_check(tmp_path: Path) -> None:
    proc = run_train("debug=smoke", "dataset.enable_bucket=true", *SD_BOUNDS, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fix = "dataset.min_bucket_reso=32 dataset.max_bucket_reso=128 dataset.bucket_reso_steps=16"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "dataset.enable_bucket=true gives a single 64x64 bucket" in log and fix in log
    check = check_cli("dataset.enable_bucket=true", *SD_BOUNDS)
    assert check.returncode == 0 and "WARNING" in check.stdout and fix in check.stdout


def test_suggested_bounds_give_several_buckets() -> None:
    assert suggested_bucket_bounds((512, 512)) == (256, 1024, 64)  # sd-scripts' defaults
    assert suggested_bucket_bounds((64, 64)) == (32, 128, 16)
    for side in (64, 96, 512, 768, 1024):
        low, high, step = suggested_bucket_bounds((side, side))
        assert len(make_bucket_resolutions((side, side), low, high, step)) > 1
        settings = BucketSettings((side, side), enable_bucket=True, min_bucket_reso=low, max_bucket_reso=high,
                                  bucket_reso_steps=step)  # fmt: skip
        assert single_bucket_warning(settings) is None
    assert single_bucket_warning(BucketSettings((64, 64), enable_bucket=False)) is None
    assert single_bucket_warning(BucketSettings((64, 64), enable_bucket=True, bucket_no_upscale=True)) is None


def test_config_of_a_run_takes_only_dotted_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text("dataset: {train_data_dir: x}\n")
    assert main(["dataset", "check", "--config", str(tmp_path), "model=sd15"]) == 2
    assert "with --config give key.subkey=value overrides only" in capsys.readouterr().err
    assert main(["dataset", "check", "--config", str(tmp_path / "nowhere")]) == 2
    assert "pass a run folder" in capsys.readouterr().err
    assert main(["dataset", "check", "dataset.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
