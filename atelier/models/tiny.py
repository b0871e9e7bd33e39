"""The built-in tiny models (random weights) for tests, demos and CI.

tiny-sd15 (SD1.5-shaped), tiny-sd2-v (SD2 768-v-shaped) and tiny-sdxl (SDXL-shaped;
these two are built by atelier.models.tiny_variants), and tiny-flux (FLUX.1-dev-shaped,
built by atelier.models.tiny_flux). Each is built once per cache directory,
deterministically, and saved as an ordinary diffusers pipeline folder, so it goes
through exactly the same loading code as a user's model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TINY_MODEL_NAME = "tiny-sd15"
# Bump the suffix whenever the recipe changes: old caches then hold an old,
# still valid folder and the new one is built beside it.
TINY_MODEL_DIRNAME = "tiny-sd15-v1"
TINY_SD2_V_NAME = "tiny-sd2-v"
TINY_SDXL_NAME = "tiny-sdxl"
TINY_FLUX_NAME = "tiny-flux"
# Built-in name -> cache folder name (same versioning rule as TINY_MODEL_DIRNAME).
TINY_MODEL_DIRNAMES = {
    TINY_MODEL_NAME: TINY_MODEL_DIRNAME,
    TINY_SD2_V_NAME: "tiny-sd2-v-v1",
    TINY_SDXL_NAME: "tiny-sdxl-v1",
    TINY_FLUX_NAME: "tiny-flux-v1",
}
CACHE_ENV_VAR = "ATELIER_CACHE"

# One seed per component, so changing one component leaves the others' weights alone.
# FLUX's denoiser is a "transformer"; its text_encoder_2 (T5) shares SDXL's seed, by name.
_SEEDS = {"unet": 1234, "vae": 2345, "text_encoder": 3456, "text_encoder_2": 4567, "transformer": 5678}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def default_cache_dir() -> Path:
    """`$ATELIER_CACHE`, else `~/.cache/kohya-atelier`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kohya-atelier"


def ensure_tiny_model(cache_dir: Path | str | None = None, name: str = TINY_MODEL_NAME) -> Path:
    """Return the diffusers folder of the tiny model `name`, building it on first use.

    The build happens in a temp folder beside the target that is renamed into
    place, so readers never see a half-written model. When several processes
    race, the first rename wins and the others use its folder.
    """
    if name not in TINY_MODEL_DIRNAMES:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODEL_DIRNAMES)}")
    dirname = TINY_MODEL_DIRNAMES[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / dirname
    if _is_complete(target):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dirname}.", suffix=".building", dir=cache))
    try:
        _builder(name)(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _builder(name: str):
    if name == TINY_MODEL_NAME:
        return build_tiny_model
    from . import tiny_flux, tiny_variants

    return {
        TINY_SD2_V_NAME: tiny_variants.build_tiny_sd2_v,
        TINY_SDXL_NAME: tiny_variants.build_tiny_sdxl,
        TINY_FLUX_NAME: tiny_flux.build_tiny_flux,
    }[name]


def _is_complete(folder: Path) -> bool:
    # Only fully written folders are ever renamed into place, so the index file tells a
    # usable folder; a model component without its weights (a cache damaged since) makes
    # it one to rebuild, not one to fail on at every run.
    if not (folder / "model_index.json").is_file():
        return False
    components = [folder / name for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")]
    return all(any(part.glob("*.safetensors")) for part in components if part.is_dir())


def _move_into_place(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)
        return
    except OSError:
        if _is_complete(target):
            return  # another process won the race
        if not target.exists():
            raise
    # A folder without model_index.json is left over from manual tampering:
    # set it aside (atomically, in case another process is doing the same) and retry.
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
    with contextlib.suppress(OSError):
        os.replace(target, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_complete(target):
            raise


def build_tiny_model(folder: Path | str) -> None:
    """Build the tiny model with fixed seeds and save it as a pipeline folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from . import architectures as arch

    modules = build_seeded(
        TINY_MODEL_NAME,
        {"unet": arch.build_unet, "vae": arch.build_vae, "text_encoder": arch.build_text_encoder},
    )
    pipeline = StableDiffusionPipeline(
        **modules,
        tokenizer=build_tiny_tokenizer(),
        scheduler=PNDMScheduler(**arch.SD1_PIPELINE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipeline, folder)


def save_pipeline(pipeline, folder: Path | str, tokenizers: tuple[str, ...] = ("tokenizer",)) -> None:
    """save_pretrained, plus the slow-tokenizer files, readable by everyone."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name in tokenizers:
        _write_slow_tokenizer_files(Path(folder) / name, getattr(pipeline, name))
    _make_readable(Path(folder))


def build_seeded(arch_name: str, builders: dict) -> dict:
    """Component name -> module built from its own fixed seed (see _SEEDS), in eval mode."""
    import torch

    modules = {}
    for name, build in builders.items():
        # fork_rng leaves the caller's global RNG state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEEDS[name])
            modules[name] = build(arch_name).eval()
    return modules


def _write_slow_tokenizer_files(folder: Path, tokenizer: CLIPTokenizer) -> None:
    # transformers 5 saves only tokenizer.json; older transformers' slow
    # CLIPTokenizer (used by other trainers) needs vocab.json and merges.txt.
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _make_readable(folder: Path) -> None:
    # mkdtemp and the libraries' own temp files leave owner-only modes; the cache
    # may be shared between users (e.g. sweep jobs on a cluster).
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_tiny_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte-level symbols (no merges).

    Every character becomes one token, so any prompt tokenizes without unknown
    tokens, and the vocab stays 514 entries instead of CLIP's 49408. SD2's and
    SDXL's second (OpenCLIP) tokenizers pad with "!" (id 0): pad_token="!".
    """
    from transformers import CLIPTokenizer

    from .architectures import TINY_VOCAB_SIZE

    symbols = list(_byte_level_alphabet().values())
    vocab_list = symbols + [s + END_OF_WORD for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    assert len(vocab) == TINY_VOCAB_SIZE
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=77,
    )


def _byte_level_alphabet() -> dict[int, str]:
    """Byte value -> printable unicode symbol, as in GPT-2 / CLIP byte-level BPE.

    Printable latin-1 bytes stand for themselves; the others (control chars,
    space, ...) are shifted to code points from 256 on. The dict lists the
    printable bytes first, the order of the real CLIP vocab, so single-character
    tokens get CLIP's ids (e.g. "a</w>" is 320 in both).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in alphabet]
    alphabet.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return alphabet
