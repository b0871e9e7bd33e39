"""The resumable training state kept in a run dir (one file, replaced atomically).

A job started again in a run dir that holds a state continues from it: a resumed
sweep job, a requeued SLURM job. The state is tied to the config that made it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from atelier.utils.atomic import atomic_path

STATE_FILE = "training_state.pt"
# Keys that do not change what is trained.
IGNORED_KEYS = ("resume", "sampling")


class StateMismatchError(ValueError):
    """The run dir's state was made by another config."""


def config_fingerprint(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_KEYS:
        container.pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(container)).encode()).hexdigest()


def save_training_state(run_dir: Path, state: dict[str, Any]) -> Path:
    path = run_dir / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config_fingerprint") != fingerprint:
        raise StateMismatchError(
            f"{path} was saved by a run with a different config, so it cannot be continued. "
            f"Train into a new run dir, or delete {path.name} to start this one over."
        )
    return state
