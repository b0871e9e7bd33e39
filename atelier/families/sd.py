"""The Stable Diffusion families: SD1.x, SD2.x (epsilon or v-prediction) and SDXL.

The names and numbers are sd-scripts' (library/train_util.py, library/sai_model_spec.py,
networks/lora.py's block counts) so that files and options match what kohya users know.
"""

from __future__ import annotations

from dataclasses import replace

from atelier.families.family import BaseVersion, BlockLayout, ModelFamily

SD_BLOCKS = BlockLayout("SD1/SD2", down=12, mid=1, edges=False, blocks="IN00-IN11, MID, OUT00-OUT11")
SDXL_BLOCKS = BlockLayout("SDXL", down=9, mid=3, edges=True,
                          blocks="the embedding, IN01-IN09, MID00-MID02, OUT00-OUT08, the output conv")  # fmt: skip


SD1 = ModelFamily(
    version="sd1",
    label="SD1",
    kohya_script="train_network.py",
    kohya_v2=False,
    bases={False: BaseVersion("sd_v1", "stable-diffusion-v1", 512)},
    modelspec_implementation="diffusers",
    text_encoders=1,
    blocks=SD_BLOCKS,
    bucket_step=8,
    loads_single_files=True,
    merges_into_single_files=True,
    unet_marks={"addition_embed_type": None},
    cross_attention_dim=768,
)
# SD2 is SD1's architecture with OpenCLIP's wider text encoder: sd-scripts' --v2.
SD2 = replace(
    SD1,
    version="sd2",
    label="SD2",
    kohya_v2=True,
    bases={False: BaseVersion("sd_v2", "stable-diffusion-v2-512", 512),
           True: BaseVersion("sd_v2_v", "stable-diffusion-v2-768-v", 768)},  # fmt: skip
    merges_into_single_files=False,
    cross_attention_dim=1024,
)
SDXL = ModelFamily(
    version="sdxl",
    label="SDXL",
    kohya_script="sdxl_train_network.py",
    kohya_v2=False,
    bases={False: BaseVersion("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024)},
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    text_encoders=2,
    blocks=SDXL_BLOCKS,
    bucket_step=64,
    loads_single_files=False,  # no SDXL converter here yet: a diffusers folder
    merges_into_single_files=False,
    unet_naming="ldm",  # sd-scripts trains SDXL on Stability's own UNet: every SDXL loader expects LDM names
    unet_marks={"addition_embed_type": "text_time"},
    cross_attention_dim=2048,
)
