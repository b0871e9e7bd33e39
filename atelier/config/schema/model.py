"""model: the base model a LoRA is trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

from atelier.config.schema.enums import ModelVersion
from atelier.config.schema.fields import option
from atelier.errors import ConfigError, MissingFileError
from atelier.families import family_of


@dataclass
class ModelConfig:
    name: str = option(MISSING, doc="The model option's name (conf/model/<name>.yaml).",
                       kohya="the model group option; its keys are mapped")
    path: Optional[str] = option(
        MISSING, flag="pretrained_model_name_or_path", ss="ss_sd_model_name",
        doc="A diffusers folder or a single-file .safetensors checkpoint. Null when `builtin` names an "
        "embedded model.",
        kohya="the built-in tiny model: its diffusers folder in the cache",
    )
    builtin: Optional[str] = option(None, doc="An embedded tiny model (tiny, tiny_sd2_v, tiny_sdxl) instead of `path`.",
                                    kohya="given as --pretrained_model_name_or_path")
    config: Optional[str] = option(
        None, doc="Local diffusers folder (configs + tokenizer) used to load a single-file checkpoint offline.",
        kohya="sd-scripts finds (or downloads) a single file's configs itself",
    )
    vae: Optional[str] = option(None, flag="vae", doc="A VAE to use instead of the checkpoint's.")
    # FLUX.1's other single files, as sd-scripts' flux_train_network.py and ComfyUI take them
    # (model.path is then the BFL transformer file, model.config a local diffusers FLUX folder).
    ae: Optional[str] = option(None, flag="ae", doc="FLUX: the autoencoder file (ae.safetensors) beside a single-file "
                               "transformer in model.path.")
    clip_l: Optional[str] = option(None, flag="clip_l", doc="FLUX: the CLIP-L text encoder file (clip_l.safetensors).")
    t5xxl: Optional[str] = option(None, flag="t5xxl",
                                  doc="FLUX: the T5-XXL text encoder file (t5xxl_fp16.safetensors, or an fp8 one).")
    allow_pickle: bool = option(
        False, doc="Pickled checkpoints (.ckpt/.pt/.bin) can run code when loaded; they are refused unless this "
        "is true (and even then read with torch's weights-only loader).",
        kohya="sd-scripts loads pickled .ckpt files without asking",
    )
    version: ModelVersion = option(ModelVersion.sd1, flag="v2", ss=("ss_base_model_version", "ss_v2"),
                                   doc="The model family: sd1, sd2, sdxl or flux1.",
                                   kohya="--v2 for sd2; sdxl: sdxl_train_network.py; flux1: flux_train_network.py")
    v_parameterization: bool = option(False, flag="v_parameterization",
                                      ss=("ss_v_parameterization", "ss_base_model_version"),
                                      doc="The model predicts v (SD2 768-v), not the noise.")
    resolution: int = option(512, doc="The resolution the model was trained at; the dataset's default.",
                             kohya="the default of dataset.resolution")
    min_bucket_reso: int = option(
        256, doc="Aspect-bucket bounds that suit the model's resolution: the dataset's defaults (conf/dataset/*.yaml "
        "read them as ${model.min_bucket_reso} ...). sd-scripts' values fit 512-1024 px models; a 64 px model "
        "needs smaller ones, or bucketing collapses to a single bucket.",
        kohya="the model's default for dataset.min_bucket_reso (exported there)",
    )
    max_bucket_reso: int = option(1024, doc="The dataset's default max_bucket_reso (see min_bucket_reso).",
                                  kohya="the model's default for dataset.max_bucket_reso (exported there)")
    bucket_reso_steps: int = option(64, doc="The dataset's default bucket_reso_steps (see min_bucket_reso).",
                                    kohya="the model's default for dataset.bucket_reso_steps (exported there)")
    base_weights: List[str] = option(
        default_factory=list, flag="base_weights",
        doc="LoRA files merged into the base model before training (their updates become part of the base).",
    )
    base_weights_multiplier: List[float] = option(
        default_factory=list, flag="base_weights_multiplier",
        doc="The weight of each base_weights file, in order (1.0 for those without one).",
    )

    def __post_init__(self) -> None:
        if len(self.base_weights_multiplier) > len(self.base_weights):
            raise ConfigError(f"model.base_weights_multiplier has {len(self.base_weights_multiplier)} values for "
                              f"{len(self.base_weights)} model.base_weights files; give one per file")  # fmt: skip
        for index, path in enumerate(self.base_weights):
            if not Path(str(path)).expanduser().is_file():
                raise MissingFileError(f"model.base_weights[{index}]={path}: no such file (a LoRA .safetensors)")
        family = family_of(self.version)
        foreign = [key for key in FAMILY_FILES if getattr(self, key) and key not in family.extra_files]
        if foreign:
            raise ConfigError(f"model.{foreign[0]} is a FLUX.1 file and model.version={family.version}: drop "
                              f"{', '.join('model.' + k for k in foreign)}, or use model=flux1")
        if self.base_weights and not family.merges_base_weights:
            raise ConfigError(f"model.base_weights: merging LoRAs into a {family.label} model before training is not "
                              "supported yet; merge them first (atelier merge) and train on the merged file")


FAMILY_FILES = ("ae", "clip_l", "t5xxl")  # the families' extra_files
