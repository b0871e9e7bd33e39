"""Build the configured network (any kind) for a model, fresh or from an existing file."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atelier.errors import ConfigError
from atelier.config.network_kinds import FILE_FAMILIES, PRESETS, VARIANT_TENSORS, family, kinds_of_family
from atelier.config.network_spec import NetworkSpec
from atelier.config.block_weights import BlockShapes, block_shapes, is_blockwise
from atelier.network.blocks import block_index
from atelier.network.flux_lora import build_flux_network, flux_network_from_state
from atelier.network.lora import LoRANetwork
from atelier.network.lora_file import load_lora
from atelier.families import unet_blocks
from atelier.network.targets import LAYER_SELECTIONS, PRESET_SELECTIONS, TEXT_ENCODER_PREFIX, UNET_PREFIX, TargetLayer, belongs_to, iter_targets

if TYPE_CHECKING:
    from atelier.config.schema import NetworkConfig

log = logging.getLogger(__name__)


def build_network(net: NetworkConfig, unet: nn.Module | None, text_encoder: nn.Module | None) -> LoRANetwork:
    """The network the `network` config group describes; from `network.weights` when set."""
    spec = NetworkSpec.from_config(net)
    weights = net.weights
    if not weights:
        blockwise = unet is not None and is_blockwise(net)
        shapes = block_shapes(net, unet_blocks(unet), spec.conv_dim, spec.conv_alpha) if blockwise else None
        if shapes is None or unet is None:
            network = create_network(spec, unet, text_encoder)
        else:
            network = create_network(spec, unet, text_encoder, *blockwise_modules(spec, unet, text_encoder, shapes))
    else:
        try:
            state, _ = load_lora(weights)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"network.weights={weights}: no such file (train the first stage first?)") from error
        network = network_from_state(spec, unet, text_encoder, state, str(weights))
        if net.block_dims is not None or net.conv_block_dims is not None:
            log.warning("network.block_dims / conv_block_dims: the modules and their ranks come from network.weights")
        log.info("starting from %s (rank and alpha per module from the file)", weights)
    network.log_counts(spec.entry.display, unet is not None, text_encoder is not None)
    return network


def build_flux(
    net: NetworkConfig, transformer: nn.Module, text_encoder: nn.Module, unet: bool, clip: bool
) -> LoRANetwork:
    """sd-scripts' lora_flux network (atelier.network.flux_lora) the `network` group describes: on
    the transformer's network.train_blocks unless train_text_encoder_only, on CLIP-L unless
    train_unet_only; from network.weights (ranks and alphas from the file) when set."""
    options = {"dropout": net.dropout, "rank_dropout": net.rank_dropout, "module_dropout": net.module_dropout}
    if net.weights:
        try:
            state, _ = load_lora(net.weights)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"network.weights={net.weights}: no such file (train the first stage first?)") \
                from error
        kept = {key: value for key, value in state.items()
                if (belongs_to(key, TEXT_ENCODER_PREFIX) and clip) or (belongs_to(key, UNET_PREFIX) and unet)}  # fmt: skip
        log.info("starting from %s (rank and alpha per module from the file)", net.weights)
        return flux_network_from_state(transformer, kept, text_encoder if clip else None, str(net.weights), **options)
    blocks = net.train_blocks.value if net.train_blocks is not None else "all"
    network = build_flux_network(transformer, net.dim, net.alpha, blocks, text_encoder=text_encoder if clip else None,
                                 **options)  # fmt: skip
    if not unet:  # network.train_text_encoder_only: CLIP-L's modules alone
        network = LoRANetwork({name: m for name, m in network.loras.items() if belongs_to(name, TEXT_ENCODER_PREFIX)})
    return network


def create_network(
    spec: NetworkSpec,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    per_module: dict[str, dict[str, Any]] | None = None,
    names: set[str] | None = None,
) -> LoRANetwork:
    """Fresh modules on every target (or only `names`), `per_module` overriding dim/alpha/options."""
    per_module = per_module or {}
    targets = network_targets(spec, unet, text_encoder, names)
    check_ranks_fit(spec, [t for t in targets if t.lora_name not in per_module])  # file shapes are as they are
    modules = {t.lora_name: make_module(spec, t, **per_module.get(t.lora_name, {})) for t in targets}
    return LoRANetwork(modules)


def network_targets(
    spec: NetworkSpec, unet: nn.Module | None, text_encoder: nn.Module | None, names: set[str] | None = None
) -> list[TargetLayer]:
    """The layers a network of `spec` adapts (only `names` when given): its kind's layers, its
    preset's blocks, kxk convs with conv_dim; text encoders then UNet, in kohya's order."""
    preset = PRESETS[spec.preset] if spec.preset else None
    # network.preset=full-lin: ResnetBlock2D's linear and 1x1 layers without its 3x3 convs.
    from_file = names is not None and any(_is_conv_block(n) for n in names)
    conv = spec.conv or (preset is not None and preset.blocks) or from_file
    selected = PRESET_SELECTIONS[spec.preset] if spec.preset else None
    return [
        target
        for target in iter_targets(unet, text_encoder, conv=conv)
        if (names is None or target.lora_name in names) and LAYER_SELECTIONS[spec.entry.layers](target)
        and (selected is None or (selected(target) and (spec.conv or names is not None or not target.is_conv_kxk)))
    ]


def blockwise_modules(
    spec: NetworkSpec, unet: nn.Module, text_encoder: nn.Module | None, shapes: BlockShapes
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(per-module dim/alpha, module names) of a block-wise UNet (network.block_dims, lr weights):
    sd-scripts' LoRANetwork with block_dims: linear / 1x1 layers take their block's dim, kxk convs
    its conv dim; a block at rank 0 has no modules. The text encoders are as usual."""
    per_module: dict[str, dict[str, Any]] = {}
    names = {t.lora_name for t in iter_targets(None, text_encoder)}
    skipped = 0
    for target in iter_targets(unet, None, conv=shapes.conv_dims is not None):
        skipped += 1
        block = block_index(target.lora_name)
        if block is None:
            raise ValueError(f"{target.lora_name} is in none of sd-scripts' UNet blocks")
        conv = target.is_conv_kxk
        dims, alphas = (shapes.conv_dims, shapes.conv_alphas) if conv else (shapes.dims, shapes.alphas)
        if dims[block] == 0:
            continue
        if layer_width(target.module) < dims[block]:
            key = "network.conv_block_dims (or conv_dim)" if conv else "network.block_dims (or dim)"
            raise ConfigError(f"{key}: UNet block {block} has rank {dims[block]}, more than the width of layer "
                              f"{target.lora_name} ({layer_width(target.module)}); lower that block's rank")
        per_module[target.lora_name] = {"dim": dims[block], "alpha": alphas[block]}
        names.add(target.lora_name)
        skipped -= 1
    if skipped:  # sd-scripts lists them too
        log.info("block-wise ranks: %d UNet layers get no module (their block's rank or lr weight is 0)", skipped)
    return per_module, names


def layer_width(layer: nn.Module) -> int:
    """The largest rank a low-rank update of `layer` can have: min(inputs, outputs), a kxk
    conv's inputs counted per kernel position."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return min(layer.in_channels * kh * kw, layer.out_channels)
    return min(layer.in_features, layer.out_features)


def check_ranks_fit(spec: NetworkSpec, targets: list[TargetLayer]) -> None:
    """network.dim (network.conv_dim for kxk convs) no wider than each layer it adapts.

    Checked before any module is allocated: dim=100000 on a 320-wide layer would build a
    32M-parameter "low-rank" pair per layer and exhaust memory instead of saying what is
    wrong. Kinds whose rank is not bounded by the layer (LoKr, (IA)^3) are not checked.
    """
    if not spec.entry.rank_bounded_by_layer:
        return
    for convs in (False, True):
        chosen = [t for t in targets if t.is_conv_kxk == convs]
        key, dim = ("network.conv_dim", spec.conv_dim) if convs and spec.conv_dim else ("network.dim", spec.dim)
        too_narrow = [t for t in chosen if layer_width(t.module) < dim]
        if too_narrow:
            first = too_narrow[0]
            fits = min(layer_width(t.module) for t in chosen)
            more = f" and {len(too_narrow) - 1} more layers" if len(too_narrow) > 1 else ""
            raise ConfigError(
                f"{key}={dim} is more than the width of layer {first.lora_name} ({layer_width(first.module)})"
                f"{more}: a LoRA's rank can be at most min(inputs, outputs) of its layer. Set {key} to "
                f"{fits} or less (the narrowest layer this network adapts)."
            )


def _is_conv_block(name: str) -> bool:
    return any(part in name for part in ("_resnets_", "_downsamplers_", "_upsamplers_"))


def make_module(spec: NetworkSpec, target: TargetLayer, dim: int | None = None, alpha: float | None = None, **options: Any) -> nn.Module:
    if dim is None:  # conv layers of a file trained with conv_dim take dim if none is set now
        dim = (spec.conv_dim if target.is_conv_kxk else None) or spec.dim
    if alpha is None:
        alpha = spec.conv_alpha if target.is_conv_kxk else spec.alpha
    return builder(spec.entry.builder)(spec, target, dim, alpha, options)


@cache
def builder(path: str) -> Callable[..., nn.Module]:
    """The module builder a kind names ("package.module:function"); imported once, when first used
    (LyCORIS' modules bring peft and bitsandbytes, ~3 s, which LoRA runs never need)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def file_family(state: dict[str, torch.Tensor]) -> str:
    suffixes = {key.split(".", 1)[1] for key in state if "." in key}
    for candidate in FILE_FAMILIES:
        if suffixes.intersection(candidate.identifying):
            return candidate.name
    markers = " / ".join(f.identifying[0].split(".")[0] for f in FILE_FAMILIES)
    raise ValueError(f"holds no kohya network tensors ({markers})")


def file_variants(state: dict[str, torch.Tensor]) -> set[str]:
    """The network.* variant keys (VARIANT_TENSORS: dora_wd, ...) a file's modules were trained with."""
    suffixes = {key.split(".", 1)[1] for key in state if "." in key}
    return {key for key, tensors in VARIANT_TENSORS.items() if suffixes.intersection(tensors)}


def check_variants(spec: NetworkSpec, state: dict[str, torch.Tensor], source: str) -> None:
    """A file continues only with the variant keys it was trained with (its tensors say which)."""
    found = file_variants(state)
    for key, tensors in VARIANT_TENSORS.items():
        wanted = bool(getattr(spec, key))
        if (key in found) != wanted and (key in found or key == "dora_wd"):
            said = "holds" if key in found else "has no"
            raise ValueError(f"network.weights={source} {said} {' / '.join(tensors)} tensors, but network.{key}="
                             f"{str(wanted).lower()}; continue it with network.{key}={str(not wanted).lower()}")


def module_shapes(family_name: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per module: the dim / alpha (and LoKr layout) the file was trained with."""
    shape_of = family(family_name).shape_of
    shapes: dict[str, dict[str, Any]] = {}
    for name in {key.split(".", 1)[0] for key in state}:
        entry = shape_of(lambda suffix: state.get(f"{name}.{suffix}"))
        if entry and state.get(f"{name}.alpha") is not None:
            entry = {"alpha": float(state[f"{name}.alpha"]), **entry}
        shapes[name] = entry
    return shapes


def network_from_state(
    spec: NetworkSpec,
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    state: dict[str, torch.Tensor],
    source: str,
) -> LoRANetwork:
    """Modules named in the file, shaped as in the file, holding its weights."""
    try:
        found = file_family(state)
    except ValueError as error:
        raise ValueError(f"network.weights={source} {error}") from error
    if spec.entry.family != found:
        first, *others = kinds_of_family(found)
        raise ValueError(
            f"network.weights={source} holds {found} modules, but network.module={spec.kind}; "
            f"continue it with network={first}" + (f" (or {', '.join(others)})" if others else "")
        )
    for prefix, trained, key in ((UNET_PREFIX, unet, "train_text_encoder_only"), (TEXT_ENCODER_PREFIX, text_encoder, "train_unet_only")):
        if trained is not None and not any(belongs_to(name, prefix) for name in state):
            raise ValueError(
                f"network.weights={source} has no {prefix}_ modules, but this run trains them; "
                f"set network.{key}=true to train only what the file holds"
            )
    check_variants(spec, state, source)
    shapes = module_shapes(found, state)
    network = create_network(spec, unet, text_encoder, per_module=shapes, names=set(shapes))
    network.load_kohya_state_dict(state, source)
    return network
