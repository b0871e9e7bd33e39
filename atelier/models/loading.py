"""Load a Stable Diffusion base model for LoRA training (atelier.models.sources checks where
it comes from first; atelier.models.pickles keeps pickles inert).

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
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.families import FAMILIES, family_of, unet_family
from atelier.models.load_errors import ModelLoadError, read_json, reraise_as_load_error
from atelier.models.random_builtins import RANDOM_BUILTINS, build_random_base
from atelier.models.pickles import PICKLE_SUFFIXES, inert_pickle_globals
from atelier.models.sources import (
    SDXL_SINGLE_FILE_MESSAGE,
    check_file_type,
    check_pipeline_folder,
    check_single_file,
    check_version,
    existing_path,
    resolve_source,
    single_file_config_folder,
)

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

@dataclass
class BaseModel:
    unet: UNet2DConditionModel  # the denoiser: an SD UNet, or FLUX.1's FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # prediction_type set from v_parameterization; FLUX: flow-match Euler
    version: str  # model.version: "sd1" | "sd2" | "sdxl" | "flux1"
    v_parameterization: bool
    name: str  # human name for metadata (folder or file stem, or the builtin's name)
    path: str  # absolute path actually loaded
    # SDXL's second (OpenCLIP-bigG) text encoder and its tokenizer, FLUX's T5-XXL; None for SD1/2.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    variant: str | None = None  # FLUX.1: "dev" (guidance-distilled) or "schnell", read from the transformer

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """[text_encoder], or SDXL's / FLUX's [text_encoder, text_encoder_2]."""
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

    check_version(version)
    # Hydra configs may spell "unset" as an empty string.
    path, builtin, config, vae = (None if value == "" else value for value in (path, builtin, config, vae))
    if builtin in RANDOM_BUILTINS:  # built in memory: no folder to load
        if path:
            raise ModelLoadError(f"both model.path ({path}) and model.builtin ({builtin}) are set; set only one of them")
        return build_random_base(builtin, v_parameterization=v_parameterization)
    source, name = resolve_source(path, builtin, cache_dir)

    if source.is_dir():
        check_pipeline_folder(source, "model.path")
        if config is not None:
            logger.warning("model.config is only used for single-file checkpoints; ignoring it for %s", source)
        config_folder = source
    else:
        check_single_file(
            source, "model.path", version, allow_pickle=allow_pickle, v_parameterization=v_parameterization
        )
        if not family_of(version).loads_single_files:
            raise ModelLoadError(f"model.path: '{source}': {SDXL_SINGLE_FILE_MESSAGE}")
        config_folder = single_file_config_folder(source, config, version)

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

# --- loading --------------------------------------------------------------------


def _load_pipeline_folder(folder: Path, vae: AutoencoderKL | None) -> _Components:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load_weights(cls: Any, subfolder: str, dtype_kwarg: str) -> Any:
        variant = _weights_variant(folder / subfolder, "model.path")
        with reraise_as_load_error(f"model.path: cannot load {subfolder}/ of '{folder}'"):
            return cls.from_pretrained(
                folder,
                subfolder=subfolder,
                variant=variant,
                use_safetensors=True,
                local_files_only=True,
                **{dtype_kwarg: torch.float32},
            )

    def load_tokenizer(subfolder: str) -> CLIPTokenizer:
        with reraise_as_load_error(f"model.path: cannot load {subfolder}/ of '{folder}'"):
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
    with _quiet_dtype_cast_warning(), inert_pickle_globals(file, "model.path"), reraise_as_load_error(
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

    source = existing_path(spec, "model.vae")
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
        with reraise_as_load_error(f"model.vae: cannot load the VAE in '{source}'"):
            return AutoencoderKL.from_pretrained(
                folder,
                subfolder=subfolder,
                variant=variant,
                use_safetensors=True,
                local_files_only=True,
                torch_dtype=torch.float32,
            )

    check_file_type(source, "model.vae", allow_pickle=allow_pickle)
    with _quiet_dtype_cast_warning(), inert_pickle_globals(source, "model.vae"), reraise_as_load_error(
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
    """Raise unless the loaded UNet has the marks of model.version's family and, where its text
    width names one family, is of that family (the tiny models' widths name none)."""
    family, config = family_of(version), unet.config
    if not family.is_unet_of(config):
        fits = [other.version for other in FAMILIES.values() if other.is_unet_of(config)]
        shown = ", ".join(f"{key}={value}" for key, value in family.unet_marks.items())
        actual = (f"an {FAMILIES[fits[0]].label} model" if len(fits) == 1
                  else f"not an {family.label} model (its UNet config has no {shown})")  # fmt: skip
        fix = (f"model.version={fits[0]}" if len(fits) == 1 else f"model.version to {' or '.join(fits)}" if fits
               else f"model.path to a base model of one of: {', '.join(FAMILIES)}")  # fmt: skip
        raise ModelLoadError(f"model.version={version}, but model.path '{source}' is {actual}; set {fix}")
    found = unet_family(config)
    if found is not None and found is not family:
        raise ModelLoadError(
            f"model.version={version}, but model.path '{source}' is an {found.version} model "
            f"(cross_attention_dim {config.cross_attention_dim}); set model.version={found.version}"
        )


def _warn_on_prediction_type_mismatch(folder: Path, v_parameterization: bool) -> None:
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_config.is_file():
        return
    shipped = read_json(scheduler_config, "model.path").get("prediction_type")
    expected = "v_prediction" if v_parameterization else "epsilon"
    if shipped in ("epsilon", "v_prediction") and shipped != expected:
        logger.warning(
            "model.v_parameterization=%s, but the scheduler shipped with %s predicts %s; "
            "training with the wrong target ruins the LoRA",
            v_parameterization,
            folder,
            shipped,
        )



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
