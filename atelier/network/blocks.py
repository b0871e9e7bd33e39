"""Which of sd-scripts' UNet blocks a kohya module name is in (networks/lora.py: get_block_index).

SD1/SD2 names are diffusers' (lora_unet_down_blocks_1_attentions_0_...): down block i's
resnet / attention j is IN(1 + 3i + j) and its downsampler IN(3 + 3i); mid_block is block 12;
up block i's j is OUT(3i + j) (index 13 + 3i + j), its upsampler OUT(3i + 2). SDXL names are
LDM's (atelier.families.sd): time_embed / label_emb 0, input_blocks_k 1 + k,
middle_block_k 10 + k, output_blocks_k 13 + k, out_ 22. The per-block values themselves:
atelier.config.block_weights.
"""

from __future__ import annotations

import re

from atelier.network.targets import UNET_PREFIX

_DIFFUSERS = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_DOWN_BLOCKS = 12  # sd-scripts' LoRANetwork.NUM_OF_BLOCKS
_SDXL_FIRST = {"time_embed_": 0, "label_emb_": 0, "input_blocks_": 1, "middle_block_": 10, "output_blocks_": 13}


def block_index(lora_name: str) -> int | None:
    """The block of UNet module `lora_name` (None: not a UNet block module; sd-scripts says -1)."""
    if not lora_name.startswith(UNET_PREFIX + "_"):
        return None
    name = lora_name[len(UNET_PREFIX) + 1 :]
    for start, first in _SDXL_FIRST.items():
        if name.startswith(start):
            return first if first == 0 else first + int(name[len(start) :].split("_")[0])
    if name.startswith("out_"):
        return 22
    found = _DIFFUSERS.search(name)
    if found:
        side, i, kind, j = found.groups()
        index = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
        return 1 + index if side == "down" else _DOWN_BLOCKS + 1 + index
    if "mid_block_" in name:
        return _DOWN_BLOCKS
    return None
