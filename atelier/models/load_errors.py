"""The error a base model that cannot be loaded raises, and the two ways loading code makes one."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atelier.errors import UserError


class ModelLoadError(UserError, ValueError):
    """The base model (or its config / VAE) cannot be loaded; the message says how to fix it."""


def read_json(file: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{key}: cannot read '{file}': {error}") from error


@contextlib.contextmanager
def reraise_as_load_error(message: str) -> Iterator[None]:
    """Turn a library failure into a ModelLoadError that says which config key to fix."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{message}: {type(error).__name__}: {error}") from error
