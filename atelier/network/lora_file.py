"""Reading and writing kohya LoRA .safetensors files (atomically, with hashes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load, save

from atelier.config.schema import SavePrecision
from atelier.utils.atomic import write_bytes

SAVE_DTYPES = {
    SavePrecision.float: torch.float32,
    SavePrecision.fp16: torch.float16,
    SavePrecision.bf16: torch.bfloat16,
}


def addnet_model_hash(data: bytes) -> str:
    """sha256 of the tensor data (the bytes after the JSON header): sshs_model_hash."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


def addnet_legacy_hash(data: bytes) -> str:
    """sha256 of 64 KiB at offset 1 MiB, first 8 hex digits: sshs_legacy_hash."""
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def save_lora(
    path: str | Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    precision: SavePrecision | str = SavePrecision.float,
) -> Path:
    """Write a kohya LoRA file; the sshs_* hashes are computed on the tensor data."""
    dtype = SAVE_DTYPES[SavePrecision(precision)]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    # As sd-scripts: hash a file holding only the ss_* entries, so user metadata
    # added later does not change the hash.
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    body = save(tensors, training_only)
    metadata = {**metadata, "sshs_model_hash": addnet_model_hash(body), "sshs_legacy_hash": addnet_legacy_hash(body)}
    path = Path(path)
    write_bytes(path, save(tensors, metadata))
    return path


class LoRAIntegrityError(ValueError):
    """A LoRA file whose tensors do not match the digest written with them."""


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata. Its tensor data is checked against the digest
    saved with it (sshs_model_hash, which sd-scripts writes too) before it is used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    data = path.read_bytes()
    tensors = load(data)  # a malformed file raises here, before its header is read below
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    expected = metadata.get("sshs_model_hash")
    if expected and addnet_model_hash(data) != expected:
        raise LoRAIntegrityError(
            f"{path}: its tensors do not match the digest saved with them (sshs_model_hash): the file was "
            "damaged or changed after it was written. Use another copy, or an earlier checkpoint of the run."
        )
    return tensors, metadata
