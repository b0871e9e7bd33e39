"""The resumable training state kept in a run dir (one file, replaced atomically).

A job started again in a run dir that holds a state continues from it: a resumed
sweep job, a requeued SLURM job. The state is tied to the config that made it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from atelier.config.schema import AtelierConfig
from atelier.config.typed import as_dictconfig
from atelier.errors import UserError
from atelier.outputs.rotation import fallen_out
from atelier.utils.atomic import atomic_path
from atelier.utils.rng import as_tuples

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
# The suffix of the states kept to train on from later (training.resume_from): <output_name>-state.pt
# (output.save_state_on_train_end), -<epoch>-state.pt and -step<step>-state.pt (save_last_n_*_state).
KEPT_STATE = "-state.pt"
# Bumped when the state's layout changes; an older state is refused, not misread.
# 3: the state carries a sha256 digest of its content, checked before use.
STATE_VERSION = 3
# Keys that do not change what is trained.
IGNORED_KEYS = ("resume", "sampling", "trial")


class StateMismatchError(UserError, ValueError):
    """The run dir's state was made by another config."""


class StateIntegrityError(UserError, ValueError):
    """The run dir's state cannot be read, or does not match its digest."""


class ResumeError(UserError, ValueError):
    """training.resume_from's state cannot go on under this config."""


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


def save_training_state(run_dir: Path, state: dict[str, Any], name: str = STATE_FILE) -> Path:
    path = run_dir / name
    state = {**state, "version": STATE_VERSION}
    # Our own file object: on a full disk it is closed at once, so the space the partial
    # file took is free again for summary.json (torch's writer would hold it until collected).
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({**state, "digest": content_digest(state)}, fh)
    return path


def load_training_state(run_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The run dir's own state (None: there is none), refused when another config made it."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state = read_state(path, f"Move {path.name} away to start this run over, or train into a new run dir.")
    if state.get("config_fingerprint") != fingerprint:
        raise StateMismatchError(
            f"{path} was saved by a run with a different config, so it cannot be continued. "
            f"Train into a new run dir, or delete {path.name} to start this one over."
        )
    return state


def read_state(path: Path, fix: str) -> dict[str, Any]:
    """A state file's content, checked: readable, of this trainer's version, matching its digest.
    `fix` ends each error (what to do about the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, truncated or not a torch file: never unpickle it further
        raise StateIntegrityError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'empty'}); "
            f"the file is damaged. {fix}"
        ) from None
    if not isinstance(state, dict):
        raise StateIntegrityError(f"{path} is not a training state. {fix}")
    digest = state.pop("digest", None)
    if state.get("version") == STATE_VERSION and digest != content_digest(state):
        raise StateIntegrityError(
            f"{path} does not match the digest saved in it: its content changed after it was written "
            f"(damaged disk or an edit). {fix}"
        )
    if state.get("version") != STATE_VERSION:
        raise StateMismatchError(f"{path} was saved by another version of the trainer and cannot be read. {fix}")
    return state


def state_to_resume_from(path: Path, total_steps: int | None) -> dict[str, Any]:
    """training.resume_from's state, checked, for a run of `total_steps` steps (the config that
    saved it may differ: more epochs, another schedule...); None: its step count is not used."""
    state = read_state(path, "Give another state file in training.resume_from.")
    if total_steps is not None and state["steps"] >= total_steps:
        raise ResumeError(f"training.resume_from={path}: the state is at step {state['steps']} and this run ends at "
                          f"step {total_steps}: raise training.max_train_epochs or training.max_train_steps")
    return state


def kept_state_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    """<output_name>-state.pt (the last step's), -<epoch:06d>-state.pt, or -step<step:08d>-state.pt."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}{KEPT_STATE}"
    if step is not None:
        return f"{output_name}-step{step:08d}{KEPT_STATE}"
    return f"{output_name}{KEPT_STATE}"


def drop_old_states(run_dir: Path, output_name: str, last_n_epochs: int | None, last_n_steps: int | None,
                    step: int) -> list[Path]:  # fmt: skip
    """output.save_last_n_epochs_state / _steps_state: delete the kept states that fell out (the
    epoch ones beyond the last n, the step ones older than the last n steps, as sd-scripts); the
    deleted paths. Only names kept_state_name makes are touched."""
    old = fallen_out(run_dir.iterdir(), output_name, KEPT_STATE, last_n_epochs, last_n_steps, step)
    for path in old:
        path.unlink(missing_ok=True)
        log.info("removed %s (output.save_last_n_epochs_state / save_last_n_steps_state)", path.name)
    return old
