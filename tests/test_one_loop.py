"""The plain run and a fused group are the K=1 and K=2 cases of one training loop
(atelier.loop): what the loop does at an epoch's end is checked once for both."""

from __future__ import annotations

import json
import os
import signal

import pytest

from atelier.fused.trainer import run_fused
from atelier.loop.adapter import Adapter
from atelier.outputs.lora_file import load_lora
from atelier.loop.run import run_training
from atelier.runtime.signals import StopRequested
from atelier.loop.state import STATE_FILE
from tests.test_fused import LANES, assert_same_weights
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (fixture)

# 56 samples, batch 8: 7 steps an epoch, 2 epochs; lanes must train the UNet only.
ARGS = ["network.train_unet_only=true", "sampling.limit=1", "training.max_train_epochs=2",
        "training.train_batch_size=8", "output.save_every_n_epochs=null", "output.save_state_every_n_epochs=null"]  # fmt: skip
LANE_COUNTS = {"plain run": 1, "fused group": 2}


def train_into(root, lanes: int) -> list:
    """Train `lanes` configs into root/<i>: a plain run for one, a fused group for more."""
    cfgs = [make_cfg(*ARGS, *LANES[i]) for i in range(lanes)]
    dirs = [root / str(i) for i in range(lanes)]
    for run_dir in dirs:
        run_dir.mkdir(parents=True, exist_ok=True)
    if lanes == 1:
        run_training(cfgs[0], dirs[0])
    else:
        run_fused(cfgs, dirs)
    return dirs


def summary_of(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("kind", LANE_COUNTS)
def test_a_stop_during_an_epochs_outputs_saves_the_state_there_and_the_run_continues(tmp_path, monkeypatch, kind):
    lanes = LANE_COUNTS[kind]
    expected = train_into(tmp_path / "expected", lanes)
    real_outputs = Adapter.epoch_outputs

    def outputs_then_stop(self, epoch):
        real_outputs(self, epoch)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Adapter, "epoch_outputs", outputs_then_stop)
    with pytest.raises(StopRequested):
        train_into(tmp_path / "run", lanes)
    monkeypatch.undo()
    dirs = [tmp_path / "run" / str(i) for i in range(lanes)]
    for run_dir in dirs:
        summary = summary_of(run_dir)
        # A lane stepping after the signal stops at its step 7, before its epoch's end: it
        # continues from that end (an epoch with no batch left, atelier.loop.epochs.Draw).
        assert summary["status"] == "interrupted" and summary["steps"] == 7, summary
        assert (run_dir / STATE_FILE).is_file()

    train_into(tmp_path / "run", lanes)  # the same runs again, in the same dirs
    for run_dir, reference in zip(dirs, expected):
        summary = summary_of(run_dir)
        assert summary["status"] == "completed" and summary["steps"] == 14 and len(summary["epoch_losses"]) == 2
        assert not (run_dir / STATE_FILE).exists()
        assert_same_weights(load_lora(run_dir / "demo.safetensors")[0], load_lora(reference / "demo.safetensors")[0])
