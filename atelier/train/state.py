"""The resumable training state kept in a run dir (one file, replaced atomically).

A job started again in a run dir that holds a state continues from it: a resumed
sweep job, a requeued SLURM job. The state is tied to the config that made it.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from atelier.utils.atomic import atomic_path

STATE_FILE = "training_state.pt"
# Bumped when the state's layout changes; an older state is refused, not misread.
STATE_VERSION = 2
# Keys that do not change what is trained.
IGNORED_KEYS = ("resume", "sampling")


class StateMismatchError(ValueError):
    """The run dir's state was made by another config."""


def config_fingerprint(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_KEYS:
        container.pop(key, None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(container)).encode()).hexdigest()


def rng_states() -> dict[str, Any]:
    """The process-wide random states (torch CPU and CUDA, Python's `random`)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(as_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def as_tuples(value: Any) -> Any:
    # random.setstate wants tuples; a saved state may come back with lists.
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_training_state(run_dir: Path, state: dict[str, Any]) -> Path:
    path = run_dir / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save({**state, "version": STATE_VERSION}, tmp)
    return path


def load_training_state(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise StateMismatchError(
            f"{path} was saved by another version of the trainer and cannot be read. "
            f"Delete {path.name} to start this run over, or train into a new run dir."
        )
    if state.get("config_fingerprint") != fingerprint:
        raise StateMismatchError(
            f"{path} was saved by a run with a different config, so it cannot be continued. "
            f"Train into a new run dir, or delete {path.name} to start this one over."
        )
    return state
