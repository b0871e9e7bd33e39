"""A config-only copy of a diffusers pipeline folder ("skeleton"): no weights.

`model.config` needs a local folder with the configs and tokenizer of the single
file's architecture (model_index.json, unet/config.json, vae/config.json,
text_encoder/config.json, tokenizer/*, scheduler/scheduler_config.json); the
weights are never read from it. A skeleton is that folder in a few hundred KB,
made once from any diffusers copy of the same base model:

    atelier skeleton /models/sd15-diffusers /models/sd15-configs
    python train.py model=sd15 model.path=/models/my-merge.safetensors model.config=/models/sd15-configs

A FLUX.1 folder (FluxPipeline) gives the model.config of FLUX's single files the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from atelier.errors import UserError

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pb", ".gguf",
)  # fmt: skip


class SkeletonError(UserError, ValueError):
    """The skeleton cannot be written; the message says why."""


def skeleton_files(source: str | os.PathLike) -> list[Path]:
    """The files of `source` (relative paths) a skeleton keeps: everything but weights."""
    from .flux_loading import check_flux_folder
    from .load_errors import ModelLoadError, read_json
    from .sources import check_pipeline_folder

    folder = Path(source).expanduser().resolve()
    if not folder.is_dir():
        raise SkeletonError(f"'{folder}' is not a folder; give a diffusers pipeline folder (with model_index.json)")
    index = folder / "model_index.json"
    flux = index.is_file() and read_json(index, "diffusers_folder").get("_class_name", "").startswith("Flux")
    try:
        (check_flux_folder if flux else check_pipeline_folder)(folder, "diffusers_folder")
    except ModelLoadError as error:
        raise SkeletonError(str(error)) from error
    kept = [Path("model_index.json")]
    for component in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(component.rglob("*")):
            if file.is_file() and not _is_weights(file):
                kept.append(file.relative_to(folder))
    return kept


def _is_weights(file: Path) -> bool:
    name = file.name.lower()
    # "diffusion_pytorch_model.safetensors.index.json" lists shards: weights bookkeeping.
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def write_skeleton(source: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Copy the configs and tokenizer of `source` to `out_dir`; returns the files written.

    The folder appears complete or not at all (built beside it, then renamed). An
    existing `out_dir` is replaced only with `force`.
    """
    source = Path(source).expanduser().resolve()
    target = Path(out_dir).expanduser().resolve()
    if target == source:
        raise SkeletonError("the output folder is the source folder")
    if target.exists() and not force:
        raise SkeletonError(f"'{target}' exists; pass --force to replace it")
    files = skeleton_files(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for relative in files:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, destination)  # follows hub-cache symlinks
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "old")
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [target / f for f in files]
