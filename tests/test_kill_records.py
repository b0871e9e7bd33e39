"""After any kill ([14] point 4): no half-written .tmp file survives the next start, and
metrics.jsonl / samples.json never hold a step twice."""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter

from atelier.sampling.manifest import MANIFEST_NAME, SAMPLES_DIR, append_manifest, drop_records_after, read_manifest
from atelier.utils.atomic import remove_stale_temp_files
from tests.helpers import TRAIN, run_train, sigterm_after_steps

# demo dataset: 14 steps an epoch at batch 4; a sample of one prompt at the end of each epoch.
RUN = ["training.max_train_epochs=2", "training.train_batch_size=4", "output.save_every_n_epochs=null",
       "sampling.limit=1", "sampling.steps=2", "sampling.sample_every_n_epochs=1"]  # fmt: skip


def step_counts(run_dir) -> Counter:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return Counter(json.loads(line)["step"] for line in lines if '"loss/step"' in line)


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "samples").mkdir()
    stale = [tmp_path / ".demo.safetensors.k3j2.tmp", tmp_path / "samples" / ".samples.json.x9.tmp"]
    kept = [tmp_path / "demo.safetensors", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in stale + kept:
        path.write_text("x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_a_rerun_removes_the_tmp_files_a_kill_left(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "failed"}')  # ours: an unfinished run
    leftover = run_dir / ".training_state.pt.ab12cd.tmp"
    leftover.write_bytes(b"half a state")
    proc = run_train("debug=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not leftover.exists()
    assert not list(run_dir.rglob("*.tmp"))


def test_dropping_sample_records_after_a_step(tmp_path):
    append_manifest(tmp_path, [{"file": "s14.png", "step": 14}, {"file": "s28.png", "step": 28}])
    drop_records_after(tmp_path, 14)
    assert [r["step"] for r in read_manifest(tmp_path)] == [14]
    drop_records_after(tmp_path, -1)  # what a fresh start keeps: nothing
    assert read_manifest(tmp_path) == []


def test_a_kill_before_the_first_state_save_then_a_rerun_logs_each_step_once(tmp_path):
    """The case of the issue: kill -9 in epoch 2 (epoch 1's sample taken, no state saved)."""
    run_dir = tmp_path / "run"
    command = [str(TRAIN), *RUN, "output.save_state_every_n_epochs=null", f"hydra.run.dir={run_dir}"]
    code, out = sigterm_after_steps([sys.executable, *command], run_dir, steps=16, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    assert read_manifest(run_dir / SAMPLES_DIR), "the kill came before epoch 1's sample"
    proc = run_train(*command[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = step_counts(run_dir)
    assert sorted(counts) == list(range(1, 29)) and set(counts.values()) == {1}
    samples = read_manifest(run_dir / SAMPLES_DIR)
    assert sorted(r["step"] for r in samples) == [14, 28]
    assert all((run_dir / SAMPLES_DIR / r["file"]).is_file() for r in samples)


def test_a_kill_after_a_state_save_then_resume_logs_each_step_once(tmp_path):
    """State at step 14 (epoch 1), kill -9 well into epoch 2: steps 15.. are logged again, once."""
    run_dir = tmp_path / "run"
    command = [str(TRAIN), *RUN, "training.max_train_epochs=3", f"hydra.run.dir={run_dir}"]
    code, out = sigterm_after_steps([sys.executable, *command], run_dir, steps=20, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    proc = run_train(*command[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = step_counts(run_dir)
    assert sorted(counts) == list(range(1, 43)) and set(counts.values()) == {1}
    assert sorted(r["step"] for r in read_manifest(run_dir / SAMPLES_DIR)) == [14, 28, 42]
    assert (run_dir / SAMPLES_DIR / MANIFEST_NAME).is_file()
