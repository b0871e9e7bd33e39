"""What jobs of one process share: the loaded base model and the latents they encoded.

Hydra's default (basic) launcher runs a sweep's jobs one after another in one process.
Loading the base model and encoding the dataset's latents once per job is then most of
a short job's time. Here:

- `load_base(m, load)` keeps a pristine base model per (path/builtin, version,
  prediction, config, vae, allow_pickle, file times) and hands every job a copy of it:
  fresh modules that no LoRA network has patched, no dtype/device move, attention
  processor, memory format, gradient checkpointing or torch.compile has touched. A job
  therefore trains exactly as it would alone (tests/test_speed.py checks the weights).
  The copy's weights share the kept model's memory (`fresh_copy`), so a job costs no
  second copy of the weights.
- `latent_store()` is one process-wide dict of latents keyed by the latent cache's
  content keys (image bytes, bucket, flip, VAE encoder weights): a job whose images,
  buckets and VAE are the same reads them instead of encoding them again.

Both are used only inside an in-process sweep (`in_process_sweep()`), and only when
training.reuse_base_model is true (the default): a single run, or a sweep whose jobs are
separate processes (submitit, local_gpus), keeps no second copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from atelier.config.schema import ModelConfig, TrainingConfig
    from atelier.models.loading import BaseModel

log = logging.getLogger(__name__)

_BASES: dict[tuple, tuple[Any, list[int]]] = {}  # (model, tensor versions); one entry: one base at a time
_LATENTS: dict[str, torch.Tensor] = {}
_FORCE: bool | None = None  # tests: force reuse on/off outside Hydra
_SHARE_LATENTS = False  # inside sharing_latents()
_STARTUP_FROZEN = False


def in_process_sweep() -> bool:
    """True inside a Hydra multirun whose launcher runs the jobs in this process."""
    if _FORCE is not None:
        return _FORCE
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    target = str(hydra_cfg.launcher.get("_target_", ""))
    return target.endswith("BasicLauncher")


def freeze_startup_objects() -> None:
    """Once per process, before its first job: put the objects the imports made (~600k for
    torch, transformers and diffusers) in the garbage collector's permanent generation.

    They live as long as the process anyway. Collections then walk only what the jobs
    make: the one before each reused job (`_load_or_copy`) takes ~0.01 s instead of ~0.2 s
    on the tiny model, and so do the collector's own passes during training. Only once: a
    later freeze could pin a finished job's cyclic garbage (and its model) for good.
    """
    global _STARTUP_FROZEN
    if not _STARTUP_FROZEN:
        gc.freeze()
        _STARTUP_FROZEN = True


def force_reuse(value: bool | None) -> None:
    """Tests: reuse on (True), off (False) or as detected (None); clears what is kept."""
    global _FORCE
    _FORCE = value
    clear()


def clear() -> None:
    _BASES.clear()
    _LATENTS.clear()


def _enabled(t: TrainingConfig) -> bool:
    return t.reuse_base_model and in_process_sweep()


def _stamp(value: str | None) -> tuple:
    """A file's (or a folder's files') modification times: a model rebuilt on disk is reloaded."""
    if not value:
        return ()
    path = Path(value).expanduser()
    if path.is_file():
        return (path.stat().st_mtime_ns, path.stat().st_size)
    if path.is_dir():
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in path.rglob("*.safetensors")))
    return ()


def base_key(m: ModelConfig) -> tuple:
    return (m.path, m.builtin, m.version.value, bool(m.v_parameterization), m.config, m.vae, bool(m.allow_pickle),
            _stamp(m.path), _stamp(m.vae), *[(f, _stamp(f)) for f in (m.ae, m.clip_l, m.t5xxl)])  # fmt: skip


def load_base(m: ModelConfig, t: TrainingConfig, load: Callable[[], BaseModel]) -> BaseModel:
    """The base model for model config `m`: loaded by `load()`, or a fresh copy of the kept one
    (the caller applies training config `t`'s speed settings: atelier.loop.speed)."""
    return _load_or_copy(m, t, load)


def _load_or_copy(m: ModelConfig, t: TrainingConfig, load: Callable[[], BaseModel]) -> BaseModel:
    if not _enabled(t):
        return load()
    key = base_key(m)
    if key in _BASES and _written(*_BASES[key]):
        log.warning("the last job wrote the kept base model's weights in place: loading it again")
        del _BASES[key]
    if key not in _BASES:
        _BASES.clear()  # another base model: drop the old one first (memory)
        base = load()
        _BASES[key] = (base, _versions(base))
        log.info("base model kept in memory for the next jobs of this sweep")
    else:
        log.info("base model reused from the previous job of this sweep (new modules over its weights)")
        # The previous job's copy can outlive its job in reference cycles until the collector
        # runs: free it before making the new copy (SD1.5 at 256 px: 13.3 -> 9.4 GB peak).
        gc.collect()
    return fresh_copy(_BASES[key][0])


def fresh_copy(base: Any) -> Any:
    """A copy of a BaseModel for the next job: new module objects, whose parameters and
    buffers share the kept model's memory; the tokenizers (read-only) are shared.

    Training never writes a frozen base weight in place: dtype casts, device moves and
    memory-format changes make new tensors (Module._apply swaps `param.data`), patches
    replace forwards. So the kept model stays as loaded, and no job pays a copy of the
    weights (full-size SD1.5: ~4 GB and 8-9 s a job on a CPU). `_written` checks it.
    """
    memo: dict[int, Any] = {id(t): t for t in (base.tokenizer, getattr(base, "tokenizer_2", None)) if t is not None}
    for tensor in _tensors(base):
        memo[id(tensor)] = _sharing(tensor)
    return copy.deepcopy(base, memo)


def _sharing(tensor: torch.Tensor) -> torch.Tensor:
    # detach() shares the memory and the version counter that in-place writes bump.
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
    return tensor.detach()


def _tensors(base: Any) -> Iterator[torch.Tensor]:
    modules = [v for v in vars(base).values() if isinstance(v, torch.nn.Module)]
    for module in modules:
        yield from itertools.chain(module.parameters(), module.buffers())


def _versions(base: Any) -> list[int]:
    return [tensor._version for tensor in _tensors(base)]


def _written(base: Any, versions: list[int]) -> bool:
    """True if a job wrote one of the kept model's tensors in place (through its copy)."""
    return _versions(base) != versions


def latent_store() -> dict[str, torch.Tensor] | None:
    """The process-wide latents shared by the jobs of an in-process sweep or the lanes of a
    fused group; None otherwise."""
    return _LATENTS if latent_store_active() else None


@contextlib.contextmanager
def sharing_latents() -> Iterator[None]:
    """Runs set up inside share their latents (the lanes of a fused group: one dataset, one
    VAE), without the base-model copies of an in-process sweep (the group shares one)."""
    global _SHARE_LATENTS
    previous, _SHARE_LATENTS = _SHARE_LATENTS, True
    try:
        yield
    finally:
        _SHARE_LATENTS = previous
        if not latent_store_active():
            _LATENTS.clear()  # each lane holds its own; the store's copies would only cost memory


def latent_store_active() -> bool:
    return in_process_sweep() or _SHARE_LATENTS


__all__ = [
    "base_key",
    "clear",
    "force_reuse",
    "freeze_startup_objects",
    "fresh_copy",
    "in_process_sweep",
    "latent_store",
    "sharing_latents",
    "load_base",
]
