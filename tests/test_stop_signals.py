"""Ctrl-C and SIGTERM at any point of a run: it stops within seconds, says "interrupted" in
summary.json, keeps what it made, and the same command continues it.

Signals are real: sent to a real `python train.py` (or to this process, for the handler).
Each stop is placed by what the run has written so far (a cached latent, a sample image,
a logged step), not by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from atelier.runtime.signals import SECOND_CTRL_C, stop_asked, stop_on_signals
from atelier.loop.state import STATE_FILE
from tests.helpers import REPO_ROOT, TRAIN

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def signal_when(command: list[str], ready, sig: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start `command`, send `sig` as soon as `ready()` is true, wait for it to end."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the moment to signal it:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def again(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------- the handler


def test_the_first_ctrl_c_asks_a_stop_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal == signal.SIGINT and stop_asked() is flag
        with stop_on_signals() as inner:  # a block inside shares the flag: the stop is not forgotten
            assert inner is flag
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and stop_asked() is None
    assert "without saving" in SECOND_CTRL_C


def test_other_stop_signals_never_escalate():
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher repeating itself: still one graceful stop
        assert flag.signal == signal.SIGTERM


# ------------------------------------------------------------- during training


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_steps_saves_the_state_and_the_same_command_finishes(tmp_path, sig):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(TRAIN), "training.max_train_steps=40", "sampling.sample_every_n_epochs=null",
               "sampling.limit=1", "sampling.steps=1", "output.save_every_n_epochs=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    proc = signal_when(command, lambda: metrics.is_file() and metrics.read_text().count('"loss/step"') >= 3, sig)
    assert proc.returncode == 128 + sig, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and f"stopped by {signal.Signals(sig).name}" in summary["reason"]
    assert 3 <= summary["steps"] < 40 and (run_dir / STATE_FILE).is_file()
    again(command)
    assert summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["steps"] == 40


# -------------------------------------------------------------- during caching


@pytest.fixture
def many_images(tmp_path: Path) -> Path:
    """200 small images: caching their latents takes seconds, long enough to stop it midway."""
    root = tmp_path / "data"
    folder = root / "1_noise cube"
    folder.mkdir(parents=True)
    for i in range(200):
        Image.effect_noise((64, 64), 40 + i % 60).convert("RGB").save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_caching_latents_stops_between_batches_and_keeps_them(tmp_path, many_images, sig):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, str(TRAIN), "debug=smoke", "dataset=folder", f"dataset.train_data_dir={many_images}",
               "dataset.resolution=64", "dataset.cache_latents_to_disk=true", f"dataset.latent_cache_dir={cache}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    cached = lambda: len(list(cache.glob("*.safetensors")))  # noqa: E731
    proc = signal_when(command, lambda: cached() > 0, sig)
    assert proc.returncode == 128 + sig, proc.stdout[-3000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["steps"] == 0, summary
    assert f"stopped by {signal.Signals(sig).name} while caching latents" in summary["reason"]
    assert "kept on disk" in summary["reason"]
    kept = cached()
    assert 0 < kept < 200, kept  # stopped between batches, not after all of them
    assert not list(cache.glob(".*.tmp")), "a half-written latent was left in the cache"

    done = again(command)
    assert summary_of(run_dir)["status"] == "completed"
    assert f"disk_hits={kept}," in done.stdout + done.stderr  # the latents cached before the stop are read, not encoded again


# -------------------------------------------------------------- during sampling


def test_a_signal_while_sampling_stops_between_images_and_saves_the_state(tmp_path):
    run_dir = tmp_path / "run"
    prompts = ",".join(f"'atelier cube {i}'" for i in range(8))
    # Epoch 1 of 2 ends with 8 sample images of 15 steps each (~0.5 s each on a CPU); the stop comes after the first.
    command = [sys.executable, str(TRAIN), "training.max_train_epochs=2", "training.max_train_steps=null",
               f"sampling.prompts=[{prompts}]", "sampling.sample_every_n_epochs=1", "sampling.steps=15",
               "output.save_every_n_epochs=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    images = lambda: list((run_dir / "samples").glob("*.png"))  # noqa: E731
    proc = signal_when(command, lambda: len(images()) >= 1, signal.SIGTERM)
    assert proc.returncode == 143, proc.stdout[-3000:]
    assert "sampling stopped after" in proc.stdout
    assert 1 <= len(images()) < 8, len(images())
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["epochs"] == 1, summary
    assert (run_dir / STATE_FILE).is_file()
    done = again(command)
    assert "resuming from training_state.pt" in done.stdout + done.stderr
    assert summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["epochs"] == 2


# ------------------------------------------------------------------ in a sweep


def test_ctrl_c_in_a_sweep_interrupts_it_and_resume_finishes_it(tmp_path):
    """The default launcher runs the jobs in this process: Ctrl-C stops the running one
    (state saved) and the sweep, whose next job never starts."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, str(TRAIN), "-m", "network.dim=2,4", "training.max_train_steps=40",
               "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=1",
               "output.save_every_n_epochs=null", f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    metrics = sweep_dir / "network.dim=2" / "metrics.jsonl"
    proc = signal_when(command, lambda: metrics.is_file() and metrics.read_text().count('"loss/step"') >= 3, signal.SIGINT)
    assert proc.returncode == 130, proc.stdout[-3000:]
    assert "1 interrupted, 1 not started" in proc.stdout
    first = summary_of(sweep_dir / "network.dim=2")
    assert first["status"] == "interrupted" and "stopped by SIGINT" in first["reason"]
    assert not (sweep_dir / "network.dim=4" / "summary.json").exists()
    assert json.loads((sweep_dir / "sweep.json").read_text())["state"] == "interrupted"

    again([*command, "resume=true"])
    for name in ("network.dim=2", "network.dim=4"):
        assert summary_of(sweep_dir / name)["status"] == "completed"
    assert json.loads((sweep_dir / "sweep.json").read_text())["state"] == "finished"
