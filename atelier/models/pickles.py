"""Pickled checkpoints (.ckpt, .pt, .pth, .bin): refused unless allowed, and then read with
torch's restricted (weights-only) unpickler, every non-tensor object they name replaced by an
inert stub, so no code from the file runs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atelier.models.load_errors import ModelLoadError, reraise_as_load_error

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def is_pickle_file(file: str | os.PathLike) -> bool:
    return Path(file).suffix.lower() in PICKLE_SUFFIXES


def pickle_refusal_message(file: Path, key: str) -> str:
    suffix = file.suffix.lower()
    converted = file.with_suffix(".safetensors")  # what atelier convert-ckpt writes
    setting = "model.allow_pickle=true" if key.startswith("model.") else "--allow-pickle"
    return (
        f"{key}: refusing to load '{file}': {suffix} files are Python pickles, and loading a pickle "
        f"can run arbitrary code hidden in the file. Convert it once to .safetensors, on a file you trust:\n"
        f"    atelier convert-ckpt {file} {converted} --allow-pickle\n"
        f"and set {key} to the .safetensors file (or set {setting} to read it as it is, with torch's "
        f"restricted unpickler)."
    )



class InertPickleGlobal:
    """Stands in for any non-tensor object a pickled checkpoint names (a Lightning
    callback, or a payload): it accepts whatever it is given and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


@contextlib.contextmanager
def inert_pickle_globals(file: Path, key: str) -> Iterator[None]:
    """While active, torch's weights-only unpickler accepts the globals `file` names
    (it refuses them otherwise) and builds inert stubs for them: nothing runs.

    A no-op for non-pickle files. torch.load(..., weights_only=True) (which diffusers
    uses) then reads old checkpoints that also pickled e.g. a Lightning callback.
    """
    if not is_pickle_file(file):
        yield
        return
    import torch.serialization as serialization

    names = pickled_globals(file, key)
    if names:
        logger.warning(
            "%s: %s pickles non-tensor objects (%s); they are replaced by inert stubs and dropped",
            key, file, ", ".join(names),
        )  # fmt: skip
    with serialization.safe_globals([(InertPickleGlobal, name) for name in names]):
        yield


def pickled_globals(file: Path, key: str = "input") -> list[str]:
    """The Python objects (module.name) a torch pickle names beyond tensors and containers,
    read from the pickle's opcodes without executing it."""
    import torch.serialization as serialization

    try:
        return list(serialization.get_unsafe_globals_in_checkpoint(str(file)))
    except Exception as error:  # a legacy (non-zip) pickle, or not a torch file at all
        logger.warning("%s: cannot list the objects pickled in %s (%s); loading it as it is", key, file, error)
        return []


def load_pickled_state_dict(file: str | os.PathLike, key: str = "input") -> dict[str, Any]:
    """The tensors of a pickled checkpoint, read with torch's weights-only unpickler
    (plus inert stubs: see inert_pickle_globals). The `state_dict` level is unwrapped."""
    import torch

    file = Path(file)
    with inert_pickle_globals(file, key), reraise_as_load_error(f"{key}: cannot read the pickled checkpoint '{file}'"):
        checkpoint = torch.load(str(file), map_location="cpu", weights_only=True)
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{key}: '{file}' holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint
