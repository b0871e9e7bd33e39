"""Errors a user can cause and fix: printed as one line (no traceback) by train.py and `atelier`.

Each message names the key or file at fault and says how to fix it. HYDRA_FULL_ERROR=1
shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A problem in the user's input (config, files, disk); the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config that composes but cannot be trained; the message names the key."""


class DatasetError(UserError, ValueError):
    """A problem with the training data (a `dataset.*` value, an image, a caption): the message
    names the key or path and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config names does not exist; the message names it."""


class DiskFullError(UserError, OSError):
    """Writing a file failed for lack of space; the message names the file."""


def one_line(err: BaseException) -> str:
    """`Error: <message>` on one line (a message's later lines are joined)."""
    return "Error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def full_errors_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def user_errors_as_one_line(exit_code: int = 1) -> Iterator[None]:
    """Within the block, a UserError ends the process with one line on stderr and `exit_code`."""
    try:
        yield
    except UserError as err:
        if full_errors_wanted():
            raise
        print(one_line(err), file=sys.stderr, flush=True)
        raise SystemExit(exit_code) from None
