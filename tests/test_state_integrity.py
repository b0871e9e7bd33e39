"""Integrity ([14] point 4): a training state or a LoRA file changed after it was written is
refused, naming the file, before anything is trained from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atelier.network.lora_file import LoRAIntegrityError, load_lora, save_lora
from atelier.loop.state import STATE_FILE, StateIntegrityError, load_training_state, save_training_state
from tests.helpers import TRAIN, run_train, sigterm_after_steps

STATE = {"network": {"lora_up.weight": torch.randn(4, 8), "alpha": torch.tensor(4.0)}, "steps": 3,
         "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2, 3], None]}}  # fmt: skip


def test_a_state_reads_back_as_saved(tmp_path):
    save_training_state(tmp_path, STATE)
    loaded = load_training_state(tmp_path, fingerprint=None)  # no fingerprint in this state: matches None
    assert torch.equal(loaded["network"]["lora_up.weight"], STATE["network"]["lora_up.weight"])
    assert loaded["steps"] == 3


def test_a_flipped_float_in_the_state_is_refused_naming_the_file(tmp_path):
    path = save_training_state(tmp_path, STATE)
    state = torch.load(path, weights_only=True)
    state["network"]["lora_up.weight"][0, :16] += 3.0  # 16 floats changed, digest kept
    torch.save(state, path)
    with pytest.raises(StateIntegrityError, match=f"{path}.*does not match the digest"):
        load_training_state(tmp_path, fingerprint=None)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x80\x02}q\x00."])
def test_an_empty_or_corrupt_state_is_refused_naming_the_file_and_never_suggests_unsafe_loading(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(StateIntegrityError) as err:
        load_training_state(tmp_path, fingerprint=None)
    message = str(err.value)
    assert str(tmp_path / STATE_FILE) in message and "damaged" in message
    assert "weights_only" not in message


def test_a_run_refuses_to_resume_from_a_changed_state(tmp_path):
    """The case of the issue: a killed run's state edited, then the run started again."""
    run_dir = tmp_path / "run"
    command = [str(TRAIN), "training.max_train_steps=30", "output.save_state_every_n_epochs=null",
               "sampling.sample_every_n_epochs=null", "output.save_every_n_epochs=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    code, out = sigterm_after_steps([__import__("sys").executable, *command], run_dir, steps=2)
    assert code != 0 and (run_dir / STATE_FILE).is_file(), out[-2000:]
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    first = next(k for k, v in state["network"].items() if v.dtype == torch.float32 and v.numel() >= 16)
    state["network"][first].view(-1)[:16] += 3.0
    torch.save(state, run_dir / STATE_FILE)
    proc = run_train(*command[1:])
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "StateIntegrityError" in summary["reason"]
    assert STATE_FILE in summary["reason"]
    assert not (run_dir / "demo.safetensors").exists()  # nothing trained from it


def _damage_tensor_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 5] ^= 0xFF  # one byte of the first tensor
    path.write_bytes(bytes(data))


def test_a_damaged_lora_file_is_refused_naming_it(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", {"x.lora_up.weight": torch.randn(8, 4)}, {"ss_network_dim": "4"})
    tensors, meta = load_lora(path)
    assert "sshs_model_hash" in meta and tensors["x.lora_up.weight"].shape == (8, 4)
    _damage_tensor_data(path)
    with pytest.raises(LoRAIntegrityError, match=str(path)):
        load_lora(path)


def test_metadata_edited_by_another_tool_still_loads(tmp_path):
    """The digest covers the tensors only (as sd-scripts' sshs_model_hash): a UI that adds a
    metadata entry does not make the file unusable."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = save_lora(tmp_path / "a.safetensors", {"x.lora_up.weight": torch.randn(8, 4)}, {"ss_network_dim": "4"})
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "ss_tag_frequency": "{}", "user_note": "mine"})
    assert load_lora(path)[1]["user_note"] == "mine"


def test_training_from_a_damaged_lora_file_fails_naming_it(tmp_path):
    first = tmp_path / "first"
    assert run_train("debug=smoke", f"hydra.run.dir={first}").returncode == 0
    _damage_tensor_data(first / "demo.safetensors")
    proc = run_train("debug=smoke", f"network.weights={first / 'demo.safetensors'}", f"hydra.run.dir={tmp_path / 'second'}")
    assert proc.returncode != 0
    reason = json.loads((tmp_path / "second" / "summary.json").read_text())["reason"]
    assert "LoRAIntegrityError" in reason and "demo.safetensors" in reason


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss/step"' in line]  # fmt: skip


def test_a_kill_before_the_first_state_leaves_no_step_twice_and_no_temp_file(tmp_path):
    """SIGKILL before any state was saved: the run starts again from step 0; what the killed
    run logged is dropped (no step twice in metrics.jsonl), a half-written line and the temp
    files it left are removed."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import logged_steps

    run_dir = tmp_path / "run"
    args = ["training.max_train_steps=6", "output.save_state_every_n_epochs=null", "sampling.sample_every_n_epochs=null",
            "output.save_every_n_epochs=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and logged_steps(run_dir) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / STATE_FILE).exists() and logged_steps(run_dir) >= 2
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss/st')  # cut short by the kill
    stale = run_dir / ".demo.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a LoRA")
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert not stale.exists() and not list(run_dir.rglob("*.tmp"))
