"""Load a Stable Diffusion base model for LoRA training.

A base model comes from one of:
- a built-in model (`model.builtin`, e.g. "tiny-sd15"), built on first use and
  then loaded exactly like a user's diffusers folder;
- a diffusers pipeline folder (`model.path` with model_index.json);
- an original-layout single-file `.safetensors` checkpoint (`model.path`), which
  needs the diffusers configs + tokenizer of its architecture (`model.config`)
  because nothing is downloaded.

Everything is loaded in float32 on the CPU and left trainable: moving, casting
and freezing is the trainer's job. Pickled checkpoints (.ckpt, ...) are refused,
never opened, unless `allow_pickle=True`; even then they are read with torch's
restricted (weights-only) unpickler, and every non-tensor object they name is
replaced by an inert stub, so no code from the file runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("sd1", "sd2", "sdxl")
# Versions the config accepts but this release cannot train yet.
PLANNED_VERSIONS: dict[str, str] = {}
# SDXL is trained from diffusers folders; its single files need a converter we lack.
SDXL_SINGLE_FILE_MESSAGE = (
    "SDXL single-file checkpoints cannot be loaded yet; load the SDXL base model as a diffusers folder "
    "(StableDiffusionXLPipeline.save_pretrained) and set model.path to that folder"
)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIX = ".safetensors"
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
SDXL_PIPELINE_COMPONENTS = (*PIPELINE_COMPONENTS, "text_encoder_2", "tokenizer_2")
_COMPONENT_FOLDER_NAMES = (*PIPELINE_COMPONENTS, "scheduler", "text_encoder_2", "tokenizer_2")

# The text encoder's width identifies the real architectures (the tiny test
# model matches none of them and is accepted as any version).
_VERSION_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Where diffusers would look for the configs of a single file when none is given.
_DEFAULT_CONFIG_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
}


class ModelLoadError(UserError, ValueError):
    """The base model (or its config / VAE) cannot be loaded; the message says how to fix it."""


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # prediction_type set from v_parameterization
    version: str  # "sd1" | "sd2" | "sdxl"
    v_parameterization: bool
    name: str  # human name for metadata (folder or file stem, or the builtin's name)
    path: str  # absolute path actually loaded
    # SDXL's second (OpenCLIP-bigG) text encoder and its tokenizer; None for SD1/2.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """[text_encoder], or SDXL's [text_encoder, text_encoder_2]."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])


@dataclass
class _Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None


def load_base_model(
    path: str | os.PathLike | None,
    *,
    builtin: str | None = None,
    version: str = "sd1",
    v_parameterization: bool = False,
    config: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load the base model named by `path` or `builtin` (see the module docstring).

    allow_pickle: load pickled single files (.ckpt/.pt/.pth/.bin) too (model.allow_pickle).
    """
    from .architectures import build_noise_scheduler

    _check_version(version)
    # Hydra configs may spell "unset" as an empty string.
    path, builtin, config, vae = (None if value == "" else value for value in (path, builtin, config, vae))
    source, name = _resolve_source(path, builtin, cache_dir)

    if source.is_dir():
        _check_pipeline_folder(source, "model.path")
        if config is not None:
            logger.warning("model.config is only used for single-file checkpoints; ignoring it for %s", source)
        config_folder = source
    else:
        _check_single_file(
            source, "model.path", version, allow_pickle=allow_pickle, v_parameterization=v_parameterization
        )
        if version == "sdxl":
            raise ModelLoadError(f"model.path: '{source}': {SDXL_SINGLE_FILE_MESSAGE}")
        config_folder = _single_file_config_folder(source, config, version)

    vae_model = _load_vae(vae, config_folder, allow_pickle=allow_pickle) if vae is not None else None
    if source.is_dir():
        components = _load_pipeline_folder(source, vae_model)
        _warn_on_prediction_type_mismatch(source, v_parameterization)
    else:
        components = _load_single_file(source, config_folder, vae_model, config_given=config is not None)

    _check_matches_version(components.unet, version, source)
    return BaseModel(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        noise_scheduler=build_noise_scheduler(v_parameterization),
        version=version,
        v_parameterization=v_parameterization,
        name=name,
        path=str(source),
        text_encoder_2=components.text_encoder_2,
        tokenizer_2=components.tokenizer_2,
    )


# --- where the model comes from -------------------------------------------------


def _check_version(version: str) -> None:
    if version in PLANNED_VERSIONS:
        raise ModelLoadError(f"model.version={version}: {PLANNED_VERSIONS[version]}.")
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join((*SUPPORTED_VERSIONS, *PLANNED_VERSIONS))
        raise ModelLoadError(f"model.version={version!r} is not a known version; use one of: {known}")


def _builtin_models() -> dict[str, Any]:
    import functools

    from .tiny import TINY_MODEL_DIRNAMES, ensure_tiny_model

    return {name: functools.partial(ensure_tiny_model, name=name) for name in TINY_MODEL_DIRNAMES}


def _resolve_source(
    path: str | os.PathLike | None, builtin: str | None, cache_dir: str | os.PathLike | None
) -> tuple[Path, str]:
    """The absolute path to load and the model's human name."""
    if builtin is not None:
        if path is not None:
            raise ModelLoadError(
                f"both model.path ({path}) and model.builtin ({builtin}) are set; set only one of them"
            )
        builtins = _builtin_models()
        if builtin not in builtins:
            raise ModelLoadError(f"model.builtin={builtin!r} is not a built-in model; known: {', '.join(builtins)}")
        return Path(builtins[builtin](cache_dir)).resolve(), builtin

    if path is None:
        raise ModelLoadError(
            "model.path is not set: set it to a diffusers folder or a .safetensors checkpoint, "
            "or set model.builtin=tiny-sd15 to try the trainer on a tiny built-in model"
        )
    source = _existing_path(path, "model.path")
    return source, source.name if source.is_dir() else source.stem


def _existing_path(path: str | os.PathLike, key: str) -> Path:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelLoadError(
            f"{key}: '{resolved}' does not exist. Set {key} to an existing diffusers folder "
            f"or .safetensors file (relative paths are taken from the working directory, {Path.cwd()})"
        )
    return resolved


def _check_pipeline_folder(folder: Path, key: str) -> None:
    """Raise unless `folder` is a diffusers Stable Diffusion pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(_not_a_pipeline_message(folder, key))

    class_name = _read_json(folder / "model_index.json", key).get("_class_name", "")
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
        class_name = _read_json(folder / "config.json", key).get("_class_name", "a single model")
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


def is_pickle_file(file: str | os.PathLike) -> bool:
    return Path(file).suffix.lower() in PICKLE_SUFFIXES


def pickle_refusal_message(file: Path, key: str) -> str:
    suffix = file.suffix.lower()
    converted = file.with_suffix(SINGLE_FILE_SUFFIX)
    setting = "model.allow_pickle=true" if key.startswith("model.") else "--allow-pickle"
    return (
        f"{key}: refusing to load '{file}': {suffix} files are Python pickles, and loading a pickle "
        f"can run arbitrary code hidden in the file. Convert it once to .safetensors, on a file you trust:\n"
        f"    atelier convert-ckpt {file} {converted} --allow-pickle\n"
        f"and set {key} to the .safetensors file (or set {setting} to read it as it is, with torch's "
        f"restricted unpickler)."
    )


def _check_file_type(file: Path, key: str, *, allow_pickle: bool = False) -> None:
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
        raise refuse("a Flux checkpoint (double_blocks.*), not Stable Diffusion 1/2")
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


def _check_single_file(
    file: Path, key: str, version: str, *, allow_pickle: bool = False, v_parameterization: bool | None = None
) -> None:
    """Raise unless `file` is an original-layout checkpoint of `version`."""
    _check_file_type(file, key, allow_pickle=allow_pickle)
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


def _single_file_config_folder(file: Path, config: str | os.PathLike | None, version: str) -> Path:
    """The diffusers folder whose configs and tokenizer describe `file`."""
    if config is not None:
        folder = _existing_path(config, "model.config")
        if not folder.is_dir():
            raise ModelLoadError(
                f"model.config: '{folder}' is a file; set model.config to a local diffusers folder "
                f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/; weights are not needed)"
            )
        _check_pipeline_folder(folder, "model.config")
        return folder

    cached = _cached_hub_configs(_DEFAULT_CONFIG_REPOS[version])
    if cached is not None:
        return cached
    raise ModelLoadError(
        f"model.config is not set, and the single-file checkpoint '{file}' cannot be loaded offline without "
        f"the diffusers configs and tokenizer of its architecture (no cached copy of "
        f"{_DEFAULT_CONFIG_REPOS[version]} was found). Set model.config to a local diffusers folder of the same "
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


# --- loading --------------------------------------------------------------------


def _load_pipeline_folder(folder: Path, vae: AutoencoderKL | None) -> _Components:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load_weights(cls: Any, subfolder: str, dtype_kwarg: str) -> Any:
        variant = _weights_variant(folder / subfolder, "model.path")
        with _reraise_as_load_error(f"model.path: cannot load {subfolder}/ of '{folder}'"):
            return cls.from_pretrained(
                folder,
                subfolder=subfolder,
                variant=variant,
                use_safetensors=True,
                local_files_only=True,
                **{dtype_kwarg: torch.float32},
            )

    def load_tokenizer(subfolder: str) -> CLIPTokenizer:
        with _reraise_as_load_error(f"model.path: cannot load {subfolder}/ of '{folder}'"):
            return CLIPTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)

    sdxl = (folder / "text_encoder_2").is_dir()
    return _Components(
        unet=load_weights(UNet2DConditionModel, "unet", "torch_dtype"),
        vae=vae if vae is not None else load_weights(AutoencoderKL, "vae", "torch_dtype"),
        # transformers 5 renamed torch_dtype to dtype.
        text_encoder=load_weights(CLIPTextModel, "text_encoder", "dtype"),
        tokenizer=load_tokenizer("tokenizer"),
        text_encoder_2=load_weights(CLIPTextModelWithProjection, "text_encoder_2", "dtype") if sdxl else None,
        tokenizer_2=load_tokenizer("tokenizer_2") if sdxl else None,
    )


def _weights_variant(component: Path, key: str) -> str | None:
    """None for plain safetensors weights, else the variant (e.g. "fp16") to load."""
    weights = sorted(p.name for p in component.glob("*.safetensors"))
    if any("." not in name.removesuffix(".safetensors") for name in weights):
        return None
    # "diffusion_pytorch_model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors"
    variants = sorted({name.split(".")[1].split("-")[0] for name in weights})
    if variants:
        return "fp16" if "fp16" in variants else variants[0]
    pickles = sorted(p.name for p in component.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{key}: '{component}' has only pickled weights ({', '.join(pickles)}); loading a pickle can run "
            f"arbitrary code, so they are refused. Re-save the pipeline with safetensors "
            f"(save_pretrained(..., safe_serialization=True)) on a machine where you trust it."
        )
    raise ModelLoadError(f"{key}: '{component}' has no .safetensors weights")


def _load_single_file(
    file: Path, config_folder: Path, vae: AutoencoderKL | None, *, config_given: bool
) -> _Components:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from .architectures import SD1_PIPELINE_SCHEDULER

    config_hint = "model.config" if config_given else "the cached hub config"
    passed: dict[str, Any] = {"vae": vae} if vae is not None else {}
    with _quiet_dtype_cast_warning(), inert_pickle_globals(file, "model.path"), _reraise_as_load_error(
        f"model.path: cannot load the checkpoint '{file}' with the configs of '{config_folder}' "
        f"(does {config_hint} describe the same architecture?)"
    ):
        pipeline = StableDiffusionPipeline.from_single_file(
            str(file),
            config=str(config_folder),
            local_files_only=True,
            torch_dtype=torch.float32,
            # Passed in, so the config folder needs no scheduler or safety checker.
            # (The pipeline's scheduler is unused here; a PNDM config is the one
            # StableDiffusionPipeline accepts without deprecation warnings.)
            scheduler=PNDMScheduler(**SD1_PIPELINE_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **passed,
        )
    components = _Components(pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer)
    for part in ("unet", "vae", "text_encoder"):
        _check_fully_loaded(getattr(components, part), part, file, config_hint)
    return components


def _load_vae(spec: str | os.PathLike, config_folder: Path, *, allow_pickle: bool = False) -> AutoencoderKL:
    import torch
    from diffusers import AutoencoderKL

    source = _existing_path(spec, "model.vae")
    if source.is_dir():
        if (source / "model_index.json").is_file():
            folder, subfolder = source, "vae"  # a whole pipeline: take its VAE
        elif (source / "config.json").is_file():
            folder, subfolder = source, None
        else:
            raise ModelLoadError(
                f"model.vae: '{source}' is neither a diffusers AutoencoderKL folder (config.json + weights) "
                f"nor a pipeline folder with vae/; set model.vae to one of those or to a .safetensors VAE file"
            )
        variant = _weights_variant(folder / (subfolder or ""), "model.vae")
        with _reraise_as_load_error(f"model.vae: cannot load the VAE in '{source}'"):
            return AutoencoderKL.from_pretrained(
                folder,
                subfolder=subfolder,
                variant=variant,
                use_safetensors=True,
                local_files_only=True,
                torch_dtype=torch.float32,
            )

    _check_file_type(source, "model.vae", allow_pickle=allow_pickle)
    with _quiet_dtype_cast_warning(), inert_pickle_globals(source, "model.vae"), _reraise_as_load_error(
        f"model.vae: cannot load the single-file VAE '{source}'"
    ):
        model = AutoencoderKL.from_single_file(
            str(source),
            config=str(config_folder),
            subfolder="vae",
            local_files_only=True,
            torch_dtype=torch.float32,
        )
    _check_fully_loaded(model, "vae", source, "model.vae")
    return model


# --- pickles, when allowed -------------------------------------------------------


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
    with inert_pickle_globals(file, key), _reraise_as_load_error(f"{key}: cannot read the pickled checkpoint '{file}'"):
        checkpoint = torch.load(str(file), map_location="cpu", weights_only=True)
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{key}: '{file}' holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


# --- checks after loading -------------------------------------------------------


def _check_fully_loaded(module: torch.nn.Module, part: str, file: Path, config_hint: str) -> None:
    # diffusers builds single-file models on the meta device and fills in the
    # checkpoint's tensors; a weight the checkpoint lacks silently stays on meta.
    missing = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"'{file}' lacks {len(missing)} {part} weights ({shown}); check that {config_hint} "
            f"describes the checkpoint's architecture"
        )


def _check_matches_version(unet: UNet2DConditionModel, version: str, source: Path) -> None:
    is_sdxl = unet.config.get("addition_embed_type") == "text_time"
    if is_sdxl != (version == "sdxl"):
        actual = "an SDXL model" if is_sdxl else "not an SDXL model (its UNet has no text_time embedding)"
        fix = "model.version=sdxl (e.g. model=sdxl)" if is_sdxl else "model.version to sd1 or sd2"
        raise ModelLoadError(f"model.version={version}, but model.path '{source}' is {actual}; set {fix}")
    detected = _VERSION_BY_CONTEXT_DIM.get(unet.config.cross_attention_dim)
    if detected is not None and detected != version:
        raise ModelLoadError(
            f"model.version={version}, but model.path '{source}' is an {detected} model "
            f"(cross_attention_dim {unet.config.cross_attention_dim}); set model.version={detected}"
        )


def _warn_on_prediction_type_mismatch(folder: Path, v_parameterization: bool) -> None:
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_config.is_file():
        return
    shipped = _read_json(scheduler_config, "model.path").get("prediction_type")
    expected = "v_prediction" if v_parameterization else "epsilon"
    if shipped in ("epsilon", "v_prediction") and shipped != expected:
        logger.warning(
            "model.v_parameterization=%s, but the scheduler shipped with %s predicts %s; "
            "training with the wrong target ruins the LoRA",
            v_parameterization,
            folder,
            shipped,
        )


# --- helpers --------------------------------------------------------------------


def _read_json(file: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{key}: cannot read '{file}': {error}") from error


@contextlib.contextmanager
def _reraise_as_load_error(message: str) -> Iterator[None]:
    """Turn a library failure into a ModelLoadError that says which config key to fix."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{message}: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _quiet_dtype_cast_warning() -> Iterator[None]:
    # from_single_file casts with .to(dtype), which makes diffusers warn about
    # "modules that should be kept in float32: []" on every load; nothing is wrong.
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        diffusers_logger.setLevel(level)
