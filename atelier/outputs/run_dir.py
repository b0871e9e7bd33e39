"""What a run dir keeps so the run can be understood and replayed later.

Beside Hydra's .hydra/ folder: the fully resolved config, a command.sh that
re-runs this exact job from any directory, and env.json (versions and device).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from omegaconf import OmegaConf

from atelier.config.schema import AtelierConfig
from atelier.config.typed import RUN_CONFIG_FILE, as_dictconfig
from atelier.utils.atomic import write_text

RESOLVED_CONFIG = RUN_CONFIG_FILE
COMMAND = "command.sh"
ENV = "env.json"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "hydra-core", "omegaconf", "kohya-atelier")
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_resolved_config(run_dir: Path, cfg: AtelierConfig) -> Path:
    """config.yaml: every value the run trains with (what a worker process and a resume read)."""
    path = run_dir / RESOLVED_CONFIG
    write_text(path, OmegaConf.to_yaml(as_dictconfig(cfg)))
    return path


def replay_command(overrides: list[str], config_name: str, config_dir: str | None, cwd: str) -> str:
    """A bash script that re-runs the job with the same overrides, from any directory.

    A search's trial link (`trial=<n>`) is left out: the replay trains the config alone."""
    argv = [sys.executable, str(REPO_ROOT / "train.py")]
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "trial"]
    if config_dir:
        argv += ["--config-dir", config_dir]
    if config_name != "config":
        argv += ["--config-name", config_name]
    argv += overrides
    return (
        "#!/usr/bin/env bash\n"
        f"# Re-runs this job (written by kohya-atelier {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}).\n"
        "# It writes a new run dir; extra arguments are added as further overrides.\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(cwd)}\n"
        f"exec {shlex.join(argv)} \"$@\"\n"
    )


def write_command(run_dir: Path, overrides: list[str], config_name: str, config_dir: str | None) -> Path:
    path = run_dir / COMMAND
    write_text(path, replay_command(overrides, config_name, config_dir, os.getcwd()))
    path.chmod(0o755)
    return path


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "versions": {p: _version(p) for p in PACKAGES},
        "atelier_git_commit": _git_commit(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "num_processes": int(os.environ.get("WORLD_SIZE", "1")),
        "started_at": time.time(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def write_environment(run_dir: Path, device: str) -> Path:
    path = run_dir / ENV
    write_text(path, json.dumps(environment(device), indent=2) + "\n")
    return path
