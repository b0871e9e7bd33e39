"""Atomic file writes: write to a temp file beside the target, then rename.

A reader (or a crash) never sees a half-written file, and an existing file is only
replaced once its successor is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from atelier.errors import DiskFullError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed writer left below `directory` (`.<name>.<random>.tmp`).
    Called by the one writer of a run dir as it starts, so none of them is in use."""
    removed = []
    for path in Path(directory).rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# How a full disk (or quota) shows through the writers used here: Python's OSError, torch.save's
# "[enforce fail at inline_container.cc] ... file write failed / unexpected pos", safetensors'
# "IoError(Os { code: 28, kind: StorageFull })".
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded",
                    "file write failed", "inline_container")  # fmt: skip


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(err, (OSError, RuntimeError, ValueError)) and any(text in str(err) for text in _DISK_FULL_TEXTS)


@contextlib.contextmanager
def naming_a_full_disk(target: str | os.PathLike) -> Iterator[None]:
    """Within the block, a write that fails for lack of space raises DiskFullError naming `target`."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise _disk_full_error(Path(target)) from err
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto target on success.

    A write that fails for lack of space raises DiskFullError naming `target`; the temp
    file is removed and an existing `target` is left as it was.
    """
    target = Path(target)
    with naming_a_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the file the permissions a plain open() would.
    tmp_path.chmod(0o666 & ~_umask())
    try:
        with naming_a_full_disk(target):
            yield tmp_path
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _disk_full_error(target: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"no space left to write {target}: {free} on its disk. Free some space (or train into a run dir "
        f"on another disk) and run the same command again; what was saved before is kept."
    )


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file for writing; it replaces `target` only if the block succeeds."""
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_open(target, "wb") as fh:
        fh.write(data)
