"""Stopping a run and continuing it: signals, periodic states, equal final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from atelier.loop.adapter import Adapter
from atelier.network.lora_file import load_lora
from atelier.loop.run import run_training
from atelier.runtime.signals import StopRequested
from atelier.loop.state import STATE_FILE
from tests.helpers import REPO_ROOT, TRAIN, sigterm_after_steps
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401

# 56 samples, batch 4: 14 batches an epoch; with accumulation 3: 5 optimizer steps an epoch.
ARGS = ["training.max_train_epochs=2", "training.train_batch_size=4", "output.save_every_n_epochs=null"]


def same_weights(a, b) -> bool:
    wa, wb = load_lora(a / "demo.safetensors")[0], load_lora(b / "demo.safetensors")[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def signal_at_forward(monkeypatch, call: int, sig: int) -> None:
    """Send `sig` to this process during the `call`-th forward pass (a real signal, a real handler)."""
    real_forward = Adapter.step_inputs
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return real_forward(self, batch)

    monkeypatch.setattr(Adapter, "step_inputs", forward)


def fail_at_forward(monkeypatch, call: int) -> None:
    """A crash (not a signal) during the `call`-th forward pass: only periodic states survive it."""
    real_forward = Adapter.step_inputs
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("simulated crash")
        return real_forward(self, batch)

    monkeypatch.setattr(Adapter, "step_inputs", forward)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same runs, never stopped."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, extra in {"plain": [], "accum": ["training.gradient_accumulation_steps=3"]}.items():
        AcceleratorState._reset_state(True)
        runs[name], _ = train(root, *ARGS, *extra, name=name)
    return runs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_mid_epoch_saves_the_state_and_the_run_continues_to_the_same_weights(
    tmp_path, monkeypatch, uninterrupted, sig
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    signal_at_forward(monkeypatch, call=6, sig=sig)
    with pytest.raises(StopRequested) as stopped:
        run_training(make_cfg(*ARGS), run_dir)
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + sig
    # The step that was running when the signal came is finished, then the state saved.
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert state["steps"] == 6 and state["epoch"] == 0 and state["position"]["batches_done"] == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 6
    assert signal.Signals(sig).name in summary["reason"] and "run the same command again" in summary["reason"]
    # The process's own handlers are back.
    assert signal.getsignal(sig) is signal.SIG_DFL

    summary = run_training(make_cfg(*ARGS), run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 28
    assert same_weights(uninterrupted["plain"], run_dir)
    assert [r["step"] for r in steps_logged(run_dir)] == list(range(1, 29))
    reference = json.loads((uninterrupted["plain"] / "summary.json").read_text())
    assert summary["epoch_losses"] == reference["epoch_losses"]  # the resumed epoch's mean counts every batch
    assert not (run_dir / STATE_FILE).exists()


def test_a_signal_waits_for_the_accumulation_group_to_end(tmp_path, monkeypatch, uninterrupted):
    args = [*ARGS, "training.gradient_accumulation_steps=3"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    signal_at_forward(monkeypatch, call=8, sig=signal.SIGTERM)  # the 2nd batch of the 3rd group
    with pytest.raises(StopRequested):
        run_training(make_cfg(*args), run_dir)
    monkeypatch.undo()
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert state["steps"] == 3 and state["position"]["batches_done"] == 9
    summary = run_training(make_cfg(*args), run_dir)
    assert summary["steps"] == 10 and same_weights(uninterrupted["accum"], run_dir)


def test_periodic_states_survive_a_crash(tmp_path, monkeypatch, uninterrupted):
    args = [*ARGS, "output.save_state_every_n_steps=4", "output.save_state_every_n_epochs=null"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fail_at_forward(monkeypatch, call=19)  # epoch 2, after the state of step 16
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(make_cfg(*args), run_dir)
    monkeypatch.undo()
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert state["steps"] == 16 and state["epoch"] == 1 and state["position"]["batches_done"] == 2
    summary = run_training(make_cfg(*args), run_dir)
    assert summary["steps"] == 28 and same_weights(uninterrupted["plain"], run_dir)


def test_no_state_is_kept_when_save_state_is_off(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    signal_at_forward(monkeypatch, call=3, sig=signal.SIGTERM)
    with pytest.raises(StopRequested, match="cannot be continued"):
        run_training(make_cfg(*ARGS, "output.save_state=false"), run_dir)
    assert not (run_dir / STATE_FILE).exists()


def test_sigterm_to_train_py_then_the_same_command_again(tmp_path, uninterrupted):
    """The user's view: a killed `python train.py` exits 143 and the same command finishes the run."""
    run_dir = tmp_path / "run"
    command = [sys.executable, str(TRAIN), *ARGS, "sampling.sample_every_n_epochs=null", "sampling.limit=1",
               "sampling.steps=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    code, out = sigterm_after_steps(command, run_dir, steps=3)
    assert code == 143, out[-3000:]
    assert "stopped by SIGTERM" in out and (run_dir / STATE_FILE).is_file()
    assert not (run_dir / "demo.safetensors").exists()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from training_state.pt" in again.stderr + again.stdout
    assert same_weights(uninterrupted["plain"], run_dir)
