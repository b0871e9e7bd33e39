"""Load a FLUX.1 base model (dev or schnell) for LoRA training.

From a diffusers FluxPipeline folder (`model.path`, or the built-in `tiny-flux`), or from the
single files FLUX users have, as sd-scripts' flux_train_network.py and ComfyUI take them: the
BFL transformer in `model.path` with `model.ae`, `model.clip_l` and `model.t5xxl`, configs and
tokenizers from a local diffusers FLUX folder (`model.config`; nothing is downloaded). As for
SD, everything is float32 on the CPU; moving, casting and freezing is the trainer's job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.models.load_errors import ModelLoadError, read_json, reraise_as_load_error
from atelier.models.sources import resolve_source

if TYPE_CHECKING:
    from atelier.models.loading import BaseModel

log = logging.getLogger(__name__)

FLUX_PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                            "scheduler")  # fmt: skip


def load_flux_base(
    path: str | None,
    *,
    builtin: str | None = None,
    config: str | None = None,
    ae: str | None = None,
    clip_l: str | None = None,
    t5xxl: str | None = None,
    cache_dir: str | None = None,
) -> BaseModel:
    """The FLUX.1 model `path` / `builtin` names (see the module docstring)."""
    from atelier.models.loading import BaseModel

    source, name = resolve_source(path, builtin, cache_dir)
    if source.is_dir():
        given = [key for key, value in (("ae", ae), ("clip_l", clip_l), ("t5xxl", t5xxl)) if value]
        if given:
            raise ModelLoadError(f"model.{given[0]}: model.path '{source}' is a diffusers FLUX folder, which holds its "
                                 f"own {', '.join(given)}; drop model.{given[0]} (the single files go with a single-file "
                                 "transformer in model.path)")
        check_flux_folder(source, "model.path")
        parts = _load_flux_folder(source)
    else:
        parts = _load_flux_files(source, config, ae, clip_l, t5xxl)
    transformer = parts["transformer"]
    variant = "dev" if transformer.config.get("guidance_embeds") else "schnell"
    log.info("FLUX.1-%s: %d double and %d single blocks", variant, transformer.config.num_layers,
             transformer.config.num_single_layers)
    return BaseModel(
        unet=transformer,
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        noise_scheduler=parts["scheduler"],
        version="flux1",
        v_parameterization=False,
        name=name,
        path=str(source),
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=parts["tokenizer_2"],
        variant=variant,
    )


def check_flux_folder(folder: Path, key: str) -> None:
    """Raise unless `folder` is a diffusers FLUX.1 pipeline folder with all its parts."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{key}: '{folder}' has no model_index.json: give a diffusers FLUX.1 folder "
                             "(FluxPipeline.save_pretrained) or the BFL transformer file (flux1-dev.safetensors)")
    class_name = read_json(index, key).get("_class_name", "")
    if not class_name.startswith("Flux"):
        raise ModelLoadError(f"{key}: '{folder}' is a {class_name or 'diffusers'} folder, not FLUX.1 (FluxPipeline): "
                             "set model.version to its family (model=sd15 / sdxl ...) or give a FLUX.1 folder")
    missing = [part for part in FLUX_PIPELINE_COMPONENTS if not (folder / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{key}: the FLUX.1 folder '{folder}' lacks {', '.join(p + '/' for p in missing)}; it "
                             f"needs {', '.join(p + '/' for p in FLUX_PIPELINE_COMPONENTS)}")


def _load_flux_folder(folder: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    def part(subfolder: str, load: Any) -> Any:
        with reraise_as_load_error(f"model.path: cannot load {subfolder}/ of '{folder}'"):
            return load(folder, subfolder=subfolder, local_files_only=True)

    def weights(cls: Any, dtype_kwarg: str) -> Any:
        return lambda folder, **kw: cls.from_pretrained(folder, use_safetensors=True, **{dtype_kwarg: torch.float32},
                                                        **kw)  # fmt: skip

    return {
        "transformer": part("transformer", weights(FluxTransformer2DModel, "torch_dtype")),
        "vae": part("vae", weights(AutoencoderKL, "torch_dtype")),
        "text_encoder": part("text_encoder", weights(CLIPTextModel, "dtype")),  # transformers 5: dtype
        "text_encoder_2": part("text_encoder_2", weights(T5EncoderModel, "dtype")),
        "tokenizer": part("tokenizer", CLIPTokenizer.from_pretrained),
        "tokenizer_2": part("tokenizer_2", AutoTokenizer.from_pretrained),
        "scheduler": part("scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained),
    }


def _load_flux_files(transformer: Path, config: str | None, ae: str | None, clip_l: str | None,
                     t5xxl: str | None) -> dict[str, Any]:  # fmt: skip
    from diffusers import FlowMatchEulerDiscreteScheduler

    from atelier.models.flux_files import load_flux_single_files

    missing = [key for key, value in (("model.ae", ae), ("model.clip_l", clip_l), ("model.t5xxl", t5xxl),
                                      ("model.config", config)) if not value]  # fmt: skip
    if missing:
        raise ModelLoadError(
            f"model.path '{transformer}' is a single-file FLUX.1 transformer; it needs {', '.join(missing)} too: "
            "model.ae=<ae.safetensors> model.clip_l=<clip_l.safetensors> model.t5xxl=<t5xxl_fp16.safetensors> and "
            "model.config=<a local diffusers FLUX.1 folder, for the configs and tokenizers>"
        )
    # The files are checked (keys, shapes, which file is which) before any weights are read.
    files = load_flux_single_files(transformer, ae, clip_l, t5xxl, config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(files.scheduler_config)
    return {"transformer": files.transformer, "vae": files.vae, "text_encoder": files.text_encoder,
            "text_encoder_2": files.text_encoder_2, "tokenizer": files.tokenizer, "tokenizer_2": files.tokenizer_2,
            "scheduler": scheduler}  # fmt: skip


__all__ = ["FLUX_PIPELINE_COMPONENTS", "check_flux_folder", "load_flux_base"]
