"""One writer per run dir (or sweep dir): an exclusive flock on `<dir>/.atelier.lock`.

The OS releases the lock when its holder dies (kill -9 included), so a stale lock file
never blocks a resume; while the holder lives, a second process fails at once and is
told who holds it (the pid and host written into the file).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from atelier.errors import UserError

LOCK_FILE = ".atelier.lock"

# Locks this process holds: dir -> open file (closing it would release the lock).
_held: dict[Path, int] = {}


class DirLockedError(UserError, RuntimeError):
    """Another live process writes to this dir."""


def lock_dir(directory: Path, announce: bool = True) -> Path:
    """Take `directory`'s lock for the rest of this process (or until `unlock_dir`), and
    write who holds it (or later, `announce_holder`: a run refused after taking the lock
    leaves the file as it was). Taking a lock this process already holds is a no-op."""
    directory = directory.resolve()
    if directory in _held:
        return directory / LOCK_FILE
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise DirLockedError(
            f"{directory} is being written by another run ({holder}). Wait for it to end, stop it, "
            "or write this run elsewhere (another hydra.run.dir / hydra.sweep.dir)."
        ) from None
    _held[directory] = fd
    if announce:
        announce_holder(directory)
    return path


def announce_holder(directory: Path) -> None:
    """Write this process's pid and host into the lock file of a dir it holds."""
    fd = _held[directory.resolve()]
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)


def unlock_dir(directory: Path) -> None:
    fd = _held.pop(directory.resolve(), None)
    if fd is not None:
        os.close(fd)


def holds_lock(directory: Path) -> bool:
    return directory.resolve() in _held


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not said who it is"
