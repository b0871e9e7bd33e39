"""FLUX.1 (dev and schnell): a 12B rectified-flow transformer, CLIP-L (pooled) and T5-XXL text.

Names are sd-scripts' (flux_train_network.py, library/flux_utils.py, library/sai_model_spec.py):
ss_base_model_version "flux1", modelspec.architecture flux-1-dev / flux-1-schnell, BFL's
implementation URL; the LoRA names (lora_unet_double_blocks_N_img_attn_qkv, lora_te1_ for
CLIP-L) are networks/lora_flux.py's (atelier.network.flux_lora).
"""

from __future__ import annotations

from atelier.families.family import BaseVersion, ModelFamily

FLUX1 = ModelFamily(
    version="flux1",
    label="FLUX.1",
    kohya_script="flux_train_network.py",
    kohya_v2=False,
    bases={False: BaseVersion("flux1", "flux-1-dev", 1024)},
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    text_encoders=2,  # CLIP-L, T5-XXL
    blocks=None,  # sd-scripts' SD block-wise options do not apply to FLUX's double/single blocks
    bucket_step=16,  # 8x AE downscale, then 2x2 latent patches
    loads_single_files=True,  # the BFL transformer, ae, clip_l and t5xxl files
    merges_into_single_files=True,
    unet_naming="flux",
    unet_marks={"_class_name": "FluxTransformer2DModel"},
    objective="flow_matching",
    denoiser="FluxTransformer2DModel",
    variants={"dev": "flux-1-dev", "schnell": "flux-1-schnell"},
    extra_files=("ae", "clip_l", "t5xxl"),
    merges_base_weights=False,  # merging into FusedLoRAModule's fused BFL layers is not built yet
    lora_module="networks.lora_flux",
    trainable_text_encoders=1,  # CLIP-L only: sd-scripts' T5 LoRA (train_t5xxl) is not built here
)
