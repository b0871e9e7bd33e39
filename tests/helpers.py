"""Running train.py the way a user does: a real subprocess with Hydra."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = REPO_ROOT / "train.py"


def run_train(*overrides: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The one-line errors train.py printed (atelier.errors.one_line)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]


def logged_steps(run_dir: Path) -> int:
    """How many optimizer steps a run has logged so far (0 before its metrics.jsonl exists)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"loss/step"') if metrics.is_file() else 0


def sigterm_after_steps(
    command: list[str], run_dir: Path, steps: int, env: dict | None = None, sig: int = signal.SIGTERM
) -> tuple[int, str]:
    """Start `command`, send it `sig` once `run_dir` has logged `steps` steps; (exit code, output)."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and logged_steps(run_dir) < steps:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def final_loras(run_dir: Path) -> list[Path]:
    """The run's final LoRA files (not the -NNNNNN epoch checkpoints); a sweep job's name
    carries its swept values (demo_dim-4.safetensors), so tests do not spell it."""
    return sorted(p for p in run_dir.glob("*.safetensors") if not re.search(r"-\d{6}\.safetensors$", p.name))


def final_lora(run_dir: Path) -> Path:
    """The one final LoRA file of a finished run (the one its summary.json names, when it has one)."""
    found = final_loras(run_dir)
    assert len(found) == 1, (run_dir, found)
    if (run_dir / "summary.json").is_file():
        assert json.loads((run_dir / "summary.json").read_text())["output_file"] == found[0].name
    return found[0]
