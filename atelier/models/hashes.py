"""Hashes of a base checkpoint, as sd-scripts writes them into LoRA metadata.

- `ss_sd_model_hash`: A1111's legacy model hash: sha256 of the 64 KiB at offset
  1 MiB of the file, first 8 hex digits.
- `ss_new_sd_model_hash`: sha256 of the whole file (A1111 shows its first 10 hex
  digits as the model hash; CivitAI looks models up by it).

Files are read in chunks (never whole into memory), and the result is cached per
(absolute path, size, mtime) in `$ATELIER_CACHE/model_hashes.json`, so a sweep
hashes a multi-GB checkpoint once. For a diffusers folder the UNet weights are
hashed (`unet/*.safetensors`, FLUX's `transformer/*.safetensors`, the shards of a sharded UNet in name order as one
stream), since there is no single file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from atelier.utils.atomic import write_text

CACHE_FILE = "model_hashes.json"
CACHE_VERSION = 1
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
_CHUNK = 8 * 1024 * 1024


def model_hashes(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{"ss_sd_model_hash": 8 hex, "ss_new_sd_model_hash": 64 hex} of a base model.

    `path`: a single-file checkpoint or a diffusers pipeline folder. `cache_dir`:
    where the hash cache lives (default: $ATELIER_CACHE, as the tiny model).
    Raises FileNotFoundError / ValueError when there is nothing to hash.
    """
    if str(path).startswith("builtin:"):  # built in memory with random weights: no file to hash
        return {}
    files = weights_files(path)
    key = "|".join(str(f) for f in files)
    stamp = [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_path = _cache_path(cache_dir)
    with _locked(cache_path):
        cached = _read_cache(cache_path).get(key)
    if cached and cached.get("stamp") == stamp and cached.get("version") == CACHE_VERSION:
        return dict(cached["hashes"])

    hashes = {"ss_sd_model_hash": legacy_hash(files), "ss_new_sd_model_hash": full_hash(files)}
    with _locked(cache_path):
        # Re-read under the lock: another job may have added its own entries meanwhile.
        cache = _read_cache(cache_path)
        cache[key] = {"version": CACHE_VERSION, "stamp": stamp, "hashes": hashes}
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
            write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True))
    return hashes


def weights_files(path: str | os.PathLike) -> list[Path]:
    """The file(s) whose bytes stand for the model at `path`."""
    source = Path(path).expanduser().resolve()
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"cannot hash '{source}': no such file or folder")
    unet = source
    if (source / "model_index.json").is_file():  # the denoiser's weights: SD's unet/, FLUX's transformer/
        unet = source / "transformer" if (source / "transformer").is_dir() else source / "unet"
    weights = sorted(unet.glob("*.safetensors"))
    # "diffusion_pytorch_model.safetensors" or its shards "...-00001-of-00002.safetensors";
    # else a variant ("diffusion_pytorch_model.fp16.safetensors"), fp16 first, as the loader.
    plain = [w for w in weights if "." not in w.name.removesuffix(".safetensors")]
    if plain:
        return plain
    variants = sorted({w.name.split(".")[1].split("-")[0] for w in weights})
    if not variants:
        raise ValueError(f"cannot hash '{source}': no UNet .safetensors weights in '{unet}'")
    variant = "fp16" if "fp16" in variants else variants[0]
    return [w for w in weights if w.name.split(".")[1].split("-")[0] == variant]


def legacy_hash(files: list[Path] | Path) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    data = b"".join(_read_range(_as_list(files), LEGACY_OFFSET, LEGACY_LENGTH))
    return hashlib.sha256(data).hexdigest()[:8]


def full_hash(files: list[Path] | Path) -> str:
    """sha256 of the whole file (or of the files one after the other), streamed."""
    digest = hashlib.sha256()
    for file in _as_list(files):
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _as_list(files: list[Path] | Path) -> list[Path]:
    return [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]


def _read_range(files: list[Path], offset: int, length: int) -> Iterator[bytes]:
    """`length` bytes from `offset` of the files' concatenation (fewer at its end)."""
    for file in files:
        size = file.stat().st_size
        if offset >= size:
            offset -= size
            continue
        with open(file, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        yield data
        length -= len(data)
        offset = 0
        if length <= 0:
            return


def _cache_path(cache_dir: str | os.PathLike | None) -> Path:
    from .tiny import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(cache_path: Path) -> Iterator[None]:
    """Serialise cache updates between processes (best effort: no lock, no problem)."""
    try:
        import fcntl

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(cache_path.with_suffix(".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
