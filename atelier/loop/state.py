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
from omegaconf import OmegaConf

from atelier.config.schema import AtelierConfig
from atelier.config.typed import as_dictconfig
from atelier.errors import UserError
from atelier.utils.atomic import atomic_path
from atelier.utils.rng import as_tuples

STATE_FILE = "training_state.pt"
# Bumped when the state's layout changes; an older state is refused, not misread.
# 3: the state carries a sha256 digest of its content, checked before use.
STATE_VERSION = 3
# Keys that do not change what is trained.
IGNORED_KEYS = ("resume", "sampling", "trial")


class StateMismatchError(UserError, ValueError):
    """The run dir's state was made by another config."""


class StateIntegrityError(UserError, ValueError):
    """The run dir's state cannot be read, or does not match its digest."""


def config_fingerprint(cfg: AtelierConfig) -> str:
    container = OmegaConf.to_container(as_dictconfig(cfg))
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


def content_digest(value: Any) -> str:
    """sha256 of a state's content: every key, tensor (dtype, shape, bytes) and value, in a
    fixed order, so a changed float anywhere changes it."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, dict):
        h.update(b"{%d" % len(value))
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"[%d" % len(value))
        for item in value:
            _feed(h, item)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())


def save_training_state(run_dir: Path, state: dict[str, Any]) -> Path:
    path = run_dir / STATE_FILE
    state = {**state, "version": STATE_VERSION}
    # Our own file object: on a full disk it is closed at once, so the space the partial
    # file took is free again for summary.json (torch's writer would hold it until collected).
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({**state, "digest": content_digest(state)}, fh)
    return path


def load_training_state(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, truncated or not a torch file: never unpickle it further
        raise StateIntegrityError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'empty'}); "
            f"the file is damaged. Move {path.name} away to start this run over, or train into a new run dir."
        ) from None
    if not isinstance(state, dict):
        raise StateIntegrityError(f"{path} is not a training state; move it away or train into a new run dir.")
    digest = state.pop("digest", None)
    if state.get("version") == STATE_VERSION and digest != content_digest(state):
        raise StateIntegrityError(
            f"{path} does not match the digest saved in it: its content changed after it was written "
            f"(damaged disk or an edit). Move {path.name} away to start this run over from step 0, "
            "or train into a new run dir."
        )
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
