"""What Atelier must know of one model family, in one place.

A model family (SD1.x, SD2.x, SDXL, FLUX.1) is a `ModelFamily`: the facts that differ between
families. Code that used to branch on `model.version` asks the family of the config instead
(atelier.families.family_of), so a family is added by writing one module (atelier/families/sd.py,
atelier/families/flux.py) and registering it. Behaviour is named by facts here and lives in the
layer it belongs to: `objective` picks the training step (atelier.objective.steps), `denoiser`
the loader and the sampling pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BlockLayout:
    """A UNet's blocks as sd-scripts' block-wise options count them (LoRANetwork.NUM_OF_BLOCKS /
    NUM_OF_MID_BLOCKS and their SDXL counterparts): down blocks, as many up blocks, the middle
    ones, and with `edges` the embedding and the output conv as a first and last block."""

    name: str  # as error messages name the model: "SD1/SD2"
    down: int
    mid: int
    edges: bool
    blocks: str  # the blocks in order, as the messages list them

    @property
    def count(self) -> int:
        """How many values each per-block list takes: 25 (SD1/SD2), 23 (SDXL)."""
        return self.down * 2 + self.mid + (2 if self.edges else 0)


@dataclass(frozen=True)
class BaseVersion:
    """One base model of a family as kohya files name it (train_util's ss_base_model_version and
    sai_model_spec's architecture) and the resolution it was trained at."""

    ss_name: str  # ss_base_model_version: sd_v2_v
    architecture: str  # modelspec.architecture without "/lora": stable-diffusion-v2-768-v
    resolution: int


@dataclass(frozen=True)
class ModelFamily:
    """One family's facts and calls. `version` is its model.version value."""

    version: str
    label: str  # how messages name it: "SDXL"
    kohya_script: str  # sd-scripts' LoRA training script for it
    kohya_v2: bool  # the script's --v2 (SD2), written as ss_v2
    # Its base models by model.v_parameterization; a combination not listed (an SD1 model
    # fine-tuned to v-prediction) is named as sd-scripts names it: "<version>_v".
    bases: Mapping[bool, BaseVersion]
    modelspec_implementation: str  # the modelspec.implementation its LoRA files carry
    text_encoders: int  # how many (SDXL: 2, whose learning rates may differ)
    blocks: BlockLayout | None  # its UNet's blocks for block_dims / down_lr_weight ... (None: no such options)
    bucket_step: int  # the size step its latents need (a resolution off it is warned of)
    loads_single_files: bool  # model.path may be an original-layout single file (else a diffusers folder)
    merges_into_single_files: bool  # `atelier merge` writes LoRAs into its single-file checkpoints
    # What its UNet's kohya LoRA names are made of: "diffusers" module paths, or "ldm" (the
    # original layout's paths, atelier.models.ldm_convert), as sd-scripts' loaders expect.
    unet_naming: str = "diffusers"
    # What tells a loaded UNet of this family apart (config key -> value), checked on load.
    unet_marks: Mapping[str, Any] = field(default_factory=dict)
    cross_attention_dim: int | None = None  # its full-size text width (the tiny models have others)
    # What it is trained to predict and how noise is drawn: "diffusion" (DDPM noise / v, the SD
    # families) or "flow_matching" (a velocity along a straight path, FLUX.1).
    objective: str = "diffusion"
    denoiser: str = "UNet2DConditionModel"  # the diffusers class of its denoiser
    # modelspec.architecture of its named variants (FLUX.1 dev / schnell), read from the model.
    variants: Mapping[str, str] = field(default_factory=dict)
    trainable_text_encoders: int | None = None  # how many of text_encoders a LoRA may train (None: all)
    # model.* file options of its own besides model.path (FLUX.1's ae, clip_l, t5xxl single files).
    extra_files: tuple[str, ...] = ()
    merges_base_weights: bool = True  # model.base_weights can be merged into it before training
    lora_module: str | None = None  # sd-scripts' --network_module of its LoRA (None: the network kind's)

    @property
    def lora_text_encoders(self) -> int:
        """How many text encoders a LoRA can train (SDXL: 2, each its own lr; FLUX.1: CLIP-L only)."""
        return self.text_encoders if self.trainable_text_encoders is None else self.trainable_text_encoders

    def base(self, v_parameterization: bool) -> BaseVersion:
        if v_parameterization in self.bases:
            return self.bases[v_parameterization]
        plain = self.bases[False]
        name = f"{self.version}{'_v' if v_parameterization else ''}"
        return BaseVersion(name, name, plain.resolution)

    def base_model_version(self, v_parameterization: bool) -> str:
        """ss_base_model_version, as sd-scripts writes it."""
        return self.base(v_parameterization).ss_name

    def is_unet_of(self, config: Mapping[str, Any]) -> bool:
        """Whether a UNet with this diffusers config has this family's marks."""
        return all(config.get(key) == value for key, value in self.unet_marks.items())
