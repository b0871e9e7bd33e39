"""Where a base model comes from, checked before anything heavy is loaded: a built-in
model, a diffusers pipeline folder, or an original-layout single file (what its keys say it
is, and which diffusers configs describe it offline)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier.families import FAMILIES
from atelier.models.load_errors import ModelLoadError, read_json
from atelier.models.pickles import PICKLE_SUFFIXES, is_pickle_file, pickle_refusal_message

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = tuple(FAMILIES)
# Versions the config accepts but this release cannot train yet.
PLANNED_VERSIONS: dict[str, str] = {}
# SDXL is trained from diffusers folders; its single files need a converter we lack.
SDXL_SINGLE_FILE_MESSAGE = (
    "SDXL single-file checkpoints cannot be loaded yet; load the SDXL base model as a diffusers folder "
    "(StableDiffusionXLPipeline.save_pretrained) and set model.path to that folder"
)

SINGLE_FILE_SUFFIX = ".safetensors"
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
SDXL_PIPELINE_COMPONENTS = (*PIPELINE_COMPONENTS, "text_encoder_2", "tokenizer_2")
_COMPONENT_FOLDER_NAMES = (*PIPELINE_COMPONENTS, "scheduler", "text_encoder_2", "tokenizer_2")

# Where diffusers would look for the configs of a single file when none is given.
DEFAULT_CONFIG_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
}



def check_version(version: str) -> None:
    if version in PLANNED_VERSIONS:
        raise ModelLoadError(f"model.version={version}: {PLANNED_VERSIONS[version]}.")
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join((*SUPPORTED_VERSIONS, *PLANNED_VERSIONS))
        raise ModelLoadError(f"model.version={version!r} is not a known version; use one of: {known}")


# Built-in models that exist for the tests of a family the trainer does not load yet.
NOT_TRAINABLE_YET: dict[str, str] = {}


def _builtin_models() -> dict[str, Any]:
    import functools

    from .tiny import TINY_MODEL_DIRNAMES, ensure_tiny_model

    return {name: functools.partial(ensure_tiny_model, name=name) for name in TINY_MODEL_DIRNAMES
            if name not in NOT_TRAINABLE_YET}  # fmt: skip


def resolve_source(
    path: str | os.PathLike | None, builtin: str | None, cache_dir: str | os.PathLike | None
) -> tuple[Path, str]:
    """The absolute path to load and the model's human name."""
    if builtin is not None:
        if path is not None:
            raise ModelLoadError(
                f"both model.path ({path}) and model.builtin ({builtin}) are set; set only one of them"
            )
        builtins = _builtin_models()
        if builtin in NOT_TRAINABLE_YET:
            raise ModelLoadError(f"model.builtin={builtin}: {NOT_TRAINABLE_YET[builtin]}")
        if builtin not in builtins:
            raise ModelLoadError(f"model.builtin={builtin!r} is not a built-in model; known: {', '.join(builtins)}")
        return Path(builtins[builtin](cache_dir)).resolve(), builtin

    if path is None:
        raise ModelLoadError(
            "model.path is not set: set it to a diffusers folder or a .safetensors checkpoint, "
            "or set model.builtin=tiny-sd15 to try the trainer on a tiny built-in model"
        )
    source = existing_path(path, "model.path")
    return source, source.name if source.is_dir() else source.stem


def existing_path(path: str | os.PathLike, key: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelLoadError(
            f"{key}: '{resolved}' does not exist. Set {key} to an existing diffusers folder "
            f"or .safetensors file (relative paths are taken from the working directory, {Path.cwd()})"
        )
    return resolved


def check_pipeline_folder(folder: Path, key: str) -> None:
    """Raise unless `folder` is a diffusers Stable Diffusion pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(_not_a_pipeline_message(folder, key))

    class_name = read_json(folder / "model_index.json", key).get("_class_name", "")
    if class_name.startswith("Flux"):
        raise ModelLoadError(f"{key}: '{folder}' is a FLUX.1 pipeline ({class_name}); train it with model=flux1 "
                             "(model.version=flux1), or model=tiny_flux for the built-in tiny one")
    if "Img2Img" in class_name and "XL" in class_name:
        raise ModelLoadError(
            f"{key}: '{folder}' is an SDXL refiner / img2img pipeline ({class_name}); "
            "train LoRAs on the SDXL base model"
        )
    components = SDXL_PIPELINE_COMPONENTS if "XL" in class_name else PIPELINE_COMPONENTS
    missing = [name for name in components if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{key}: the diffusers folder '{folder}' ({class_name or 'unknown pipeline'}) lacks "
            f"{', '.join(f'{m}/' for m in missing)}; a {'SDXL' if 'XL' in class_name else 'Stable Diffusion'} "
            f"pipeline folder has {', '.join(f'{c}/' for c in components)}"
        )


def _not_a_pipeline_message(folder: Path, key: str) -> str:
    if folder.name in _COMPONENT_FOLDER_NAMES and (folder.parent / "model_index.json").is_file():
        return (
            f"{key}: '{folder}' is the {folder.name}/ subfolder of a diffusers pipeline, not the pipeline. "
            f"Set {key} to its parent folder '{folder.parent}' (the one with model_index.json)."
        )
    if (folder / "config.json").is_file():
        class_name = read_json(folder / "config.json", key).get("_class_name", "a single model")
        return (
            f"{key}: '{folder}' holds only {class_name} (config.json, no model_index.json), not a whole "
            f"diffusers pipeline. Set {key} to the pipeline folder that contains it (with model_index.json, "
            f"{', '.join(f'{c}/' for c in PIPELINE_COMPONENTS)})."
        )
    hint = ""
    checkpoints = sorted(folder.glob(f"*{SINGLE_FILE_SUFFIX}"))
    if len(checkpoints) == 1:
        hint = f" It contains {checkpoints[0].name}: to load that checkpoint, set {key} to the file itself."
    return (
        f"{key}: '{folder}' is not a diffusers pipeline folder (no model_index.json). Set {key} to a folder "
        f"written by save_pretrained or to a .safetensors checkpoint file.{hint}"
    )


def check_file_type(file: Path, key: str, *, allow_pickle: bool = False) -> None:
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if allow_pickle:
            return
        raise ModelLoadError(pickle_refusal_message(file, key))
    if suffix != SINGLE_FILE_SUFFIX:
        raise ModelLoadError(
            f"{key}: unsupported file type '{suffix or file.name}' for '{file}'. "
            f"Expected a {SINGLE_FILE_SUFFIX} checkpoint or a diffusers folder."
        )


@dataclass(frozen=True)
class SingleFileInfo:
    """What the keys (and header metadata) of a single-file checkpoint say it is."""

    version: str  # "sd1" | "sd2" | "sdxl"
    # True / False when the file says (modelspec metadata); None when it cannot be told.
    v_parameterization: bool | None
    description: str  # e.g. "SD 2.x 768-v (v-prediction)"
    refiner: bool = False


# Text-encoder key prefixes of the original-layout single files.
_SD1_TEXT = "cond_stage_model.transformer."  # CLIP ViT-L in transformers layout
_SD2_TEXT = "cond_stage_model.model."  # OpenCLIP ViT-H in open_clip layout
_SDXL_TEXT_1 = "conditioner.embedders.0.transformer."  # CLIP ViT-L
_SDXL_TEXT_2 = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG
_SDXL_REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner has only bigG
_UNET = "model.diffusion_model."
_UNET_CONV_IN = _UNET + "input_blocks.0.0.weight"


def identify_single_file(
    keys: list[str] | set[str],
    metadata: dict[str, str] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    file: str | os.PathLike = "the file",
    key: str = "model.path",
) -> SingleFileInfo:
    """Tell SD1 / SD2 (512 eps or 768-v) / SDXL (base or refiner) from a checkpoint's keys.

    Raises ModelLoadError, naming what the file is instead, for anything else (a LoRA,
    a VAE, a diffusers UNet file, Flux / SD3, an inpainting model, ...).
    """
    keys = set(keys)
    metadata, shapes = metadata or {}, shapes or {}

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def refuse(what: str, fix: str = "") -> ModelLoadError:
        fix = fix or f"Set {key} to a full Stable Diffusion base-model checkpoint or diffusers folder."
        return ModelLoadError(f"{key}: '{file}' is {what}. {fix}")

    if has("lora_unet_") or has("lora_te") or has("lycoris_"):
        raise refuse("a LoRA / LyCORIS network, not a base model")
    if has(_SDXL_TEXT_1) or has(_SDXL_TEXT_2):
        return SingleFileInfo("sdxl", False, "SDXL base")
    if has(_SDXL_REFINER_TEXT) or has("conditioner.embedders."):
        return SingleFileInfo("sdxl", False, "SDXL refiner", refiner=True)
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        raise refuse("a Flux checkpoint (double_blocks.*), not Stable Diffusion 1/2",
                     "Train it with model=flux1 (model.path=<this file> model.ae=... model.clip_l=... model.t5xxl=... "
                     "model.config=<a local diffusers FLUX.1 folder>).")
    if has("joint_blocks.") or has("model.diffusion_model.joint_blocks."):
        raise refuse("a Stable Diffusion 3 checkpoint (joint_blocks.*), not Stable Diffusion 1/2")
    if not has(_UNET):
        if "conv_in.weight" in keys and has("down_blocks.0."):
            raise refuse(
                "a diffusers UNet weights file (a pipeline's unet/ folder), not a single-file checkpoint",
                f"Set {key} to the whole diffusers pipeline folder (the one with model_index.json).",
            )
        if has("encoder.down.") or has("first_stage_model.") or has("encoder.down_blocks."):
            raise refuse("a VAE only", "Set model.vae to it, and model.path to the base model.")
        raise refuse("not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.* keys)")

    conv_in = shapes.get(_UNET_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise refuse(
            f"an inpainting / instruct checkpoint (its UNet takes {conv_in[1]} input channels, not 4)",
            f"Train LoRAs on the standard model of the same family and set {key} to it.",
        )
    if has(_SD1_TEXT):
        return SingleFileInfo("sd1", False, "SD 1.x (epsilon)")
    if has(_SD2_TEXT):
        v = _prediction_from_metadata(metadata)
        if v is None:
            return SingleFileInfo("sd2", None, "SD 2.x (512 epsilon or 768-v: the keys are the same)")
        return SingleFileInfo("sd2", v, "SD 2.x 768-v (v-prediction)" if v else "SD 2.x (epsilon)")
    raise refuse(
        "a UNet without a text encoder (no cond_stage_model.* keys)",
        f"Set {key} to a full checkpoint (UNet, VAE and text encoder) or a diffusers folder.",
    )


def _prediction_from_metadata(metadata: dict[str, str]) -> bool | None:
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if prediction in ("v", "v_prediction", "v-prediction"):
        return True
    if prediction in ("epsilon", "eps"):
        return False
    architecture = metadata.get("modelspec.architecture", "").lower()
    if architecture.startswith("stable-diffusion-v2"):
        return architecture.endswith("-v")
    return None


def inspect_single_file(file: str | os.PathLike, key: str = "model.path") -> SingleFileInfo:
    """identify_single_file on a .safetensors file's header (no tensor is read)."""
    file = Path(file)
    keys, metadata, shapes = _safetensors_header(file, key)
    return identify_single_file(keys, metadata, shapes, file=file, key=key)


def check_single_file(
    file: Path, key: str, version: str, *, allow_pickle: bool = False, v_parameterization: bool | None = None
) -> None:
    """Raise unless `file` is an original-layout checkpoint of `version`."""
    check_file_type(file, key, allow_pickle=allow_pickle)
    if is_pickle_file(file):
        # Its keys cannot be listed without unpickling; the loaded UNet is checked instead.
        logger.warning("%s: loading the pickled checkpoint %s (model.allow_pickle=true)", key, file)
        return
    info = inspect_single_file(file, key)
    if info.version == "sdxl":
        kind = "an SDXL refiner" if info.refiner else "an SDXL"
        raise ModelLoadError(f"{key}: '{file}' is {kind} checkpoint; {SDXL_SINGLE_FILE_MESSAGE}")
    if info.version != version:
        prefix = _SD1_TEXT if info.version == "sd1" else _SD2_TEXT
        raise ModelLoadError(
            f"model.version={version}, but {key} '{file}' is an {info.version} checkpoint "
            f"({prefix}* keys); set model.version={info.version}"
        )
    if v_parameterization is not None and info.v_parameterization not in (None, v_parameterization):
        logger.warning(
            "model.v_parameterization=%s, but %s says it is %s; training with the wrong target ruins the LoRA",
            v_parameterization, file, info.description,
        )  # fmt: skip


def _safetensors_header(file: Path, key: str) -> tuple[list[str], dict[str, str], dict[str, tuple[int, ...]]]:
    """Keys, metadata and tensor shapes of a .safetensors file (only its header is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys if k == _UNET_CONV_IN}
            return keys, handle.metadata() or {}, shapes
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(
            f"{key}: '{file}' is not a readable .safetensors file ({error}); it may be truncated, re-download it"
        ) from error


def single_file_config_folder(file: Path, config: str | os.PathLike | None, version: str) -> Path:
    """The diffusers folder whose configs and tokenizer describe `file`."""
    if config is not None:
        folder = existing_path(config, "model.config")
        if not folder.is_dir():
            raise ModelLoadError(
                f"model.config: '{folder}' is a file; set model.config to a local diffusers folder "
                f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/; weights are not needed)"
            )
        check_pipeline_folder(folder, "model.config")
        return folder

    cached = _cached_hub_configs(DEFAULT_CONFIG_REPOS[version])
    if cached is not None:
        return cached
    raise ModelLoadError(
        f"model.config is not set, and the single-file checkpoint '{file}' cannot be loaded offline without "
        f"the diffusers configs and tokenizer of its architecture (no cached copy of "
        f"{DEFAULT_CONFIG_REPOS[version]} was found). Set model.config to a local diffusers folder of the same "
        f"base model (model_index.json, unet/, vae/, text_encoder/, tokenizer/; the weights are not needed)."
    )


def _cached_hub_configs(repo_id: str) -> Path | None:
    """A locally cached snapshot of `repo_id`, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.txt"]))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return snapshot if (snapshot / "model_index.json").is_file() else None

