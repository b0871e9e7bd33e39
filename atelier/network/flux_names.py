"""The kohya names of a FLUX.1 LoRA (sd-scripts' networks/lora_flux.py) on diffusers' FluxTransformer2DModel.

sd-scripts trains FLUX on BFL's model, where one Linear computes a double block's q, k and v
(img_attn.qkv, txt_attn.qkv) and one a single block's q, k, v and MLP input (linear1). In
diffusers' layout those are several Linear modules that read the same input; stacking their
outputs in order gives the fused layer's rows. So a kohya module stands for one diffusers
Linear, or for such a group: its lora_down is shared, its lora_up holds the group's rows in
order (what diffusers' _convert_kohya_flux_lora_to_diffusers splits them back into).

sd-scripts' default network trains every Linear of every double and single block: 10 per
double block, 3 per single block (304 on FLUX.1), named lora_unet_<BFL path with _>; its
train_blocks=single|double keeps one kind of block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX = "lora_unet"
TRAIN_BLOCKS = ("all", "single", "double")

# BFL's Linear children of a block (sd-scripts' names, in its module order) -> the diffusers
# modules (relative to the block) whose outputs are its rows, in order.
DOUBLE_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod_lin", ("norm1.linear",)),
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_mlp_0", ("ff.net.0.proj",)),
    ("img_mlp_2", ("ff.net.2",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
)
SINGLE_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),  # reads cat(attention output, MLP activation), as BFL's linear2
    ("modulation_lin", ("norm.linear",)),
)


# The kohya names' endings of the fused BFL layers (one module over several diffusers Linears).
FUSED_SUFFIXES = tuple(f"_{name}" for name, modules in DOUBLE_BLOCK + SINGLE_BLOCK if len(modules) > 1)


def flux_module_part(name: str) -> str | None:
    """"double" or "single": the kind of block a kohya FLUX transformer module is in
    (lora_unet_double_blocks_N_..., lora_unet_single_blocks_N_...); None for any other name."""
    for part in ("double", "single"):
        if name.startswith(f"{PREFIX}_{part}_blocks_"):
            return part
    return None


@dataclass(frozen=True)
class FluxTarget:
    """One kohya LoRA module: its name and the diffusers Linear modules it adapts."""

    name: str  # lora_unet_double_blocks_0_img_attn_qkv
    modules: tuple[str, ...]  # transformer_blocks.0.attn.to_q, ...: their outputs are the fused rows, in order

    @property
    def fused(self) -> bool:
        return len(self.modules) > 1


def flux_targets(num_double: int, num_single: int, train_blocks: str = "all") -> list[FluxTarget]:
    """sd-scripts' default FLUX LoRA modules for a transformer of this many blocks, in its order."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ValueError(f"train_blocks must be one of {', '.join(TRAIN_BLOCKS)}, got {train_blocks!r}")
    targets = []
    if train_blocks in ("all", "double"):
        targets += [FluxTarget(f"{PREFIX}_double_blocks_{i}_{name}", tuple(f"transformer_blocks.{i}.{m}" for m in modules))
                    for i in range(num_double) for name, modules in DOUBLE_BLOCK]  # fmt: skip
    if train_blocks in ("all", "single"):
        targets += [FluxTarget(f"{PREFIX}_single_blocks_{i}_{name}",
                               tuple(f"single_transformer_blocks.{i}.{m}" for m in modules))
                    for i in range(num_single) for name, modules in SINGLE_BLOCK]  # fmt: skip
    return targets


def flux_targets_of(transformer: torch.nn.Module, train_blocks: str = "all") -> list[FluxTarget]:
    """flux_targets for this transformer's block counts, each module checked: a Linear, and the
    modules of a fused target reading inputs of one size (ValueError naming the one that is not)."""
    targets = flux_targets(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks), train_blocks)
    modules = dict(transformer.named_modules())
    for target in targets:
        found = [modules.get(path) for path in target.modules]
        for path, module in zip(target.modules, found):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{target.name}: the transformer has no Linear {path} (not a FLUX.1 transformer?)")
        if len({module.in_features for module in found}) > 1:
            raise ValueError(f"{target.name}: {', '.join(target.modules)} read inputs of different sizes")
    return targets


def fused_out_features(transformer: torch.nn.Module, target: FluxTarget) -> list[int]:
    """The row count of each module of `target`: how its lora_up splits."""
    modules = dict(transformer.named_modules())
    return [modules[path].out_features for path in target.modules]


__all__ = ["DOUBLE_BLOCK", "FUSED_SUFFIXES", "PREFIX", "SINGLE_BLOCK", "TRAIN_BLOCKS", "FluxTarget", "flux_targets",
           "flux_targets_of", "flux_module_part", "fused_out_features"]
