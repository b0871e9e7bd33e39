"""A full disk: the error names the file that could not be written, nothing half-written stays.

The disk is real: a small tmpfs mounted in a private user + mount namespace
(`unshare -rm`), so no root and no cleanup are needed; the commands run inside it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, TRAIN

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_work() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="unshare --user --mount is not allowed here")


def on_small_disk(mount: Path, size_kb: int, command: list[str], then: str = "") -> subprocess.CompletedProcess:
    """Run `command` (then the shell line `then`) with a `size_kb` tmpfs at `mount`, seen by them alone."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size_kb}k none {shlex.quote(str(mount))} && {shlex.join(command)}"
    if then:
        script += f"; code=$?; {then}; exit $code"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*UNSHARE, "sh", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_a_state_or_lora_that_does_not_fit_names_its_file_and_keeps_the_previous_one(tmp_path):
    mount = tmp_path / "disk"
    probe = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from atelier.errors import DiskFullError
        from atelier.network.lora_file import load_lora, save_lora
        from atelier.loop.state import save_training_state
        disk = Path({str(mount)!r})
        small = {{"lora_unet_a.lora_down.weight": torch.ones(4, 4)}}
        save_lora(disk / "demo.safetensors", small, {{}}, "float")
        save_training_state(disk, {{"steps": 1}})
        for save in (lambda: save_training_state(disk, {{"steps": 2, "w": torch.zeros(2_000_000)}}),
                     lambda: save_lora(disk / "demo.safetensors", {{"lora_unet_a.lora_down.weight": torch.zeros(1000, 1000)}}, {{}}, "float")):
            try:
                save()
            except DiskFullError as err:
                print("ERROR", err)
        print("FILES", sorted(p.name for p in disk.iterdir()))
        print("STEPS", torch.load(disk / "training_state.pt", weights_only=True)["steps"])
        print("LORA", tuple(load_lora(disk / "demo.safetensors")[0]["lora_unet_a.lora_down.weight"].shape))
    """)
    proc = on_small_disk(mount, 1024, [sys.executable, "-c", probe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2, proc.stdout
    assert f"no space left to write {mount}/training_state.pt" in errors[0]
    assert f"no space left to write {mount}/demo.safetensors" in errors[1]
    assert "Free some space" in errors[0]
    # No temp file left behind; the earlier state and LoRA are intact.
    assert "FILES ['demo.safetensors', 'training_state.pt']" in lines
    assert "STEPS 1" in lines and "LORA (4, 4)" in lines


def test_train_py_on_a_full_disk_says_which_file_in_one_line_and_in_summary_json(tmp_path):
    mount = tmp_path / "disk"
    run_dir = mount / "run"
    # The run's records fit in 384 KiB; its first training state (AdamW moments: ~3x the
    # 225 KB LoRA) does not. The summary (small) fits once the state's temp file is gone.
    command = [sys.executable, str(TRAIN), "debug=smoke", "training.max_train_steps=3",
               "output.save_state_every_n_steps=1", f"hydra.run.dir={run_dir}"]  # fmt: skip
    # The mount is private to the command: what it left is shown before the namespace ends.
    then = f"echo SUMMARY; cat {shlex.quote(str(run_dir / 'summary.json'))}; echo; echo FILES; ls -a {shlex.quote(str(run_dir))}"
    proc = on_small_disk(mount, 384, command, then)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"no space left to write {run_dir}/training_state.pt" in error[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    summary_text, files = proc.stdout.split("SUMMARY", 1)[1].split("FILES")
    summary = json.loads(summary_text)
    assert summary["status"] == "failed" and summary["reason"].startswith("DiskFullError: no space left to write")
    assert "training_state.pt" in summary["reason"]
    assert not [name for name in files.split() if name.endswith(".tmp")], files
