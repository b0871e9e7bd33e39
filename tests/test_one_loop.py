"""The plain run and a fused group are the K=1 and K=2 cases of one training loop
(atelier.loop): what the loop does at an epoch's end is checked once for both."""

from __future__ import annotations

import json
import os
import signal

import pytest

from atelier.fused.trainer import run_fused
from atelier.loop.adapter import Adapter, NonFiniteLossError
from atelier.network.lora_file import load_lora
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


# Every epoch's outputs on: a checkpoint, samples, the validation loss and the training state.
EVERY_EPOCH = ["dataset.validation_split=0.2", "output.save_every_n_epochs=1", "sampling.sample_every_n_epochs=1",
               "output.save_state_every_n_epochs=1"]  # fmt: skip


@pytest.mark.parametrize("kind", LANE_COUNTS)
def test_each_epochs_outputs_are_the_same_for_a_plain_run_and_a_lane(tmp_path, kind, monkeypatch):
    saved_at = []
    real_save = Adapter.save_state

    def recording_save(self, *due):
        saved_at.append(self.result.steps)
        real_save(self, *due)

    monkeypatch.setattr(Adapter, "save_state", recording_save)
    lanes = LANE_COUNTS[kind]
    cfgs = [make_cfg(*ARGS, *EVERY_EPOCH, *LANES[i]) for i in range(lanes)]
    dirs = [tmp_path / str(i) for i in range(lanes)]
    for run_dir in dirs:
        run_dir.mkdir()
    if lanes == 1:
        run_training(cfgs[0], dirs[0])
    else:
        run_fused(cfgs, dirs)
    steps_per_epoch = summary_of(dirs[0])["steps"] // 2
    # The state is kept after epoch 1 (not after the last: the final LoRA supersedes it), per lane.
    assert saved_at == [steps_per_epoch] * lanes
    for run_dir in dirs:
        summary = summary_of(run_dir)
        assert summary["status"] == "completed" and len(summary["epoch_losses"]) == 2
        assert summary["checkpoints"] == ["demo-000001.safetensors"]  # the last epoch is the final LoRA
        assert (run_dir / "demo-000001.safetensors").is_file() and (run_dir / "demo.safetensors").is_file()
        assert summary["validation_loss"] is not None and summary["best_validation_loss"] is not None
        validations = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                       if "loss/validation" in line]  # fmt: skip
        assert [v["epoch"] for v in validations] == [1, 2]
        epochs = sorted({p.name.split("_e")[1][:6] for p in (run_dir / "samples").glob("*.png")})
        assert epochs == ["000001", "000002"] and (run_dir / "sample_grid.png").is_file()
        assert not (run_dir / STATE_FILE).exists()


@pytest.mark.parametrize("kind", LANE_COUNTS)
def test_a_nan_loss_stops_the_adapter_before_its_optimizer_uses_it(tmp_path, kind, monkeypatch):
    """Lane 0 gets a NaN loss at its 3rd step: a plain run fails with the message that names the
    fix; in a fused group that lane fails with the same message and the other lane completes."""
    real_loss = Adapter.step_loss
    calls = {}

    def nan_at_third_step_of_lane_0(self, batch, inputs, pred):
        loss = real_loss(self, batch, inputs, pred)
        if self.run_dir.name == "0":
            calls[self.run_dir] = calls.get(self.run_dir, 0) + 1
            if calls[self.run_dir] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Adapter, "step_loss", nan_at_third_step_of_lane_0)
    lanes = LANE_COUNTS[kind]
    if lanes == 1:
        with pytest.raises(NonFiniteLossError):
            train_into(tmp_path, 1)
    else:
        train_into(tmp_path, 2)
    failed = summary_of(tmp_path / "0")
    assert failed["status"] == "failed" and failed["steps"] == 2
    assert failed["reason"].startswith("NonFiniteLossError: loss is nan at step 3 (epoch 1)")
    assert "optimizer.learning_rate" in failed["reason"]
    assert not (tmp_path / "0" / "demo.safetensors").exists()
    if lanes == 2:
        assert summary_of(tmp_path / "1")["status"] == "completed"
