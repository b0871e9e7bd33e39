"""Reading and writing kohya LoRA .safetensors files (atomically, with hashes)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

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


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return load_file(str(path)), metadata
