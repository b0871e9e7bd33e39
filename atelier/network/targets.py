"""Which layers of a model a kohya-style network adapts, and their kohya names.

A name is `<prefix>_<module path with . -> _>`: `lora_unet_...` for the UNet,
`lora_te_text_model_...` for the SD1/2 text encoder (transformers >= 5.6 dropped
the `text_model` level; the name keeps it, as every loader expects it). SDXL: the
two text encoders are `lora_te1_...` / `lora_te2_...`, and the UNet is named in
the LDM layout (`lora_unet_input_blocks_...`, see atelier.families.sd).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from atelier.families import unet_family

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# SDXL's two text encoders.
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")
# The blocks whose Linear / 1x1-conv layers sd-scripts' networks.lora targets.
UNET_TARGETS = ("Transformer2DModel",)
# Added with conv_dim (kohya's "C3Lier", LyCORIS' LoCon): their 3x3 convs get
# conv_dim, their Linear / 1x1 layers (time_emb_proj, conv_shortcut) the linear dim.
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# (IA)^3 learns a per-channel scale of keys, values and the FFN output (of its input
# for the last FFN layer), as in the paper and LyCORIS' ia3 preset.
IA3_OUTPUT_LAYERS = ("to_k", "to_v", "k_proj", "v_proj")
IA3_INPUT_LAYERS = ("ff_net_2", "mlp_fc2")


@dataclass(frozen=True)
class TargetLayer:
    lora_name: str
    module: nn.Module
    block: str = ""  # the class name of the target block it was found in (Transformer2DModel, CLIPMLP, ...)

    @property
    def is_conv_kxk(self) -> bool:
        """A conv with a spatial kernel: it takes conv_dim / conv_alpha, not dim / alpha."""
        return isinstance(self.module, nn.Conv2d) and self.module.kernel_size != (1, 1)


def is_ia3_target(target: TargetLayer) -> bool:
    return isinstance(target.module, nn.Linear) and target.lora_name.endswith(IA3_OUTPUT_LAYERS + IA3_INPUT_LAYERS)


def _in_unet(target: TargetLayer) -> bool:
    return target.lora_name.startswith(UNET_PREFIX + "_")


def _in_conv_block(target: TargetLayer) -> bool:
    return target.block in UNET_CONV_TARGETS


def _is_attention(target: TargetLayer) -> bool:
    """Attention projections: a CLIP attention block's, a transformer block's attn1 / attn2 (SDXL's LDM
    names keep them)."""
    if not _in_unet(target):
        return target.block in ("CLIPAttention", "CLIPSdpaAttention")
    return "_attn1_" in target.lora_name or "_attn2_" in target.lora_name


# network.preset (LyCORIS' presets, lycoris/config.py; atelier.config.network_kinds.PRESETS says
# which train 3x3 convs and text encoders) -> which of the targets get a module. LyCORIS'
# single layers (conv_in, conv_out, time_embedding) are not among our targets.
PRESET_SELECTIONS: dict[str, Callable[[TargetLayer], bool]] = {
    "full": lambda target: True,
    "full-lin": lambda target: True,  # ResnetBlock2D's linear / 1x1 layers too: no 3x3 conv (no conv_dim)
    "attn-mlp": lambda target: not _in_conv_block(target),
    "attn-only": _is_attention,
    "unet-only": _in_unet,
    "unet-transformer-only": lambda target: _in_unet(target) and not _in_conv_block(target),
    "unet-convblock-only": _in_conv_block,
}


# NetworkKind.layers (atelier.config.network_kinds) -> which target layers get a module.
LAYER_SELECTIONS: dict[str, Callable[[TargetLayer], bool]] = {
    "all": lambda target: True,
    "ia3": is_ia3_target,
}


def _is_target_layer(module: nn.Module, conv: bool) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d):
        return False
    return conv or module.kernel_size == (1, 1)


def is_text_encoder_name(lora_name: str) -> bool:
    """A text-encoder module name: lora_te_ (SD1/2) or lora_te1_ / lora_te2_ (SDXL)."""
    return lora_name.startswith(tuple(f"{p}_" for p in (TEXT_ENCODER_PREFIX, *SDXL_TEXT_ENCODER_PREFIXES)))


def belongs_to(lora_name: str, prefix: str) -> bool:
    """Whether module `lora_name` is part of `prefix`'s model; TEXT_ENCODER_PREFIX covers SDXL's two."""
    if prefix == TEXT_ENCODER_PREFIX:
        return is_text_encoder_name(lora_name)
    return lora_name.startswith(prefix + "_")


def find_targets(
    root: nn.Module,
    prefix: str,
    target_classes: Iterable[str],
    name_root: str = "",
    conv: bool = False,
    rename: Callable[[str], str] | None = None,
) -> Iterator[TargetLayer]:
    """Layers inside `target_classes` blocks (kxk convs too with `conv`), kohya-named.

    `rename` maps a module path to the one the name is made of (SDXL's LDM UNet names).
    """
    target_classes = tuple(target_classes)
    seen: set[str] = set()
    for block_path, block in root.named_modules():
        if type(block).__name__ not in target_classes:
            continue
        for child_path, child in block.named_modules():
            if not _is_target_layer(child, conv):
                continue
            path = ".".join(p for p in (name_root, block_path, child_path) if p)
            if rename is not None:
                path = rename(path)
            lora_name = f"{prefix}_{path.replace('.', '_')}"
            if lora_name not in seen:  # nested target blocks would repeat layers
                seen.add(lora_name)
                yield TargetLayer(lora_name, child, type(block).__name__)


def text_encoder_name_root(text_encoder: nn.Module) -> str:
    """Kohya names start at `text_model`; transformers >= 5.6 dropped that level."""
    return "" if hasattr(text_encoder, "text_model") else "text_model"


def text_encoder_prefixes(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[tuple[str, nn.Module]]:
    """(prefix, encoder) pairs: one encoder is lora_te, SDXL's pair lora_te1 / lora_te2."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [(TEXT_ENCODER_PREFIX, text_encoder)]
    encoders = list(text_encoder)
    if len(encoders) == 1:
        return [(TEXT_ENCODER_PREFIX, encoders[0])]
    if len(encoders) != len(SDXL_TEXT_ENCODER_PREFIXES):
        raise ValueError(f"expected one text encoder or SDXL's two, got {len(encoders)}")
    return list(zip(SDXL_TEXT_ENCODER_PREFIXES, encoders))


def unet_name_mapper(unet: nn.Module) -> Callable[[str], str] | None:
    """diffusers module path -> the path its kohya LoRA name is made of, for a UNet whose family
    names it after the original layout (SDXL); None: the diffusers path is the name."""
    config = getattr(unet, "config", None)
    family = None if config is None else unet_family(config)
    if family is None or family.unet_naming == "diffusers":
        return None
    from atelier.models.ldm_convert import unet_module_path_mapper

    return unet_module_path_mapper(unet)


def iter_targets(
    unet: nn.Module | None, text_encoder: nn.Module | Sequence[nn.Module] | None, conv: bool = False
) -> Iterator[TargetLayer]:
    """Text-encoder then UNet targets (None = that model is not trained).

    `text_encoder` is one encoder, or SDXL's two (a list) named lora_te1 / lora_te2.
    """
    for prefix, encoder in text_encoder_prefixes(text_encoder):
        yield from find_targets(encoder, prefix, TEXT_ENCODER_TARGETS, text_encoder_name_root(encoder))
    if unet is not None:
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
        yield from find_targets(unet, UNET_PREFIX, classes, conv=conv, rename=unet_name_mapper(unet))
