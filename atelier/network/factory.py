"""Build the configured network (any kind) for a model, fresh or from an existing file."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from atelier.config.validate import ConfigError
from atelier.network.dylora import DyLoRAModule
from atelier.network.lora import LoRAModule, LoRANetwork
from atelier.network.spec import DISPLAY_NAMES, NetworkSpec
from atelier.network.targets import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    TargetLayer,
    belongs_to,
    is_ia3_target,
    iter_targets,
)
from atelier.outputs.lora_file import load_lora

log = logging.getLogger(__name__)

# The tensor that identifies each file family (the first key found wins).
FILE_FAMILIES = (
    ("hada_w1_a", "loha"),
    ("lokr_w1", "lokr"),
    ("lokr_w1_a", "lokr"),
    ("on_input", "ia3"),
    ("lora_down.weight", "lora"),
)
# Kinds that read and write the same lora_down / lora_up / alpha tensors.
LORA_FAMILY = ("lora", "locon", "dylora")


def build_network(net: Any, unet: nn.Module | None, text_encoder: nn.Module | None) -> LoRANetwork:
    """The network the `network` config group describes; from `network.weights` when set."""
    spec = NetworkSpec.from_config(net)
    weights = net.get("weights") if hasattr(net, "get") else getattr(net, "weights", None)
    if not weights:
        network = create_network(spec, unet, text_encoder)
    else:
        try:
            state, _ = load_lora(weights)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"network.weights={weights}: no such file (train the first stage first?)") from error
        network = network_from_state(spec, unet, text_encoder, state, str(weights))
        log.info("starting from %s (rank and alpha per module from the file)", weights)
    network.log_counts(DISPLAY_NAMES[spec.kind], unet is not None, text_encoder is not None)
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
    conv = spec.conv or (names is not None and any(_is_conv_block(n) for n in names))
    targets = [
        target
        for target in iter_targets(unet, text_encoder, conv=conv)
        if (names is None or target.lora_name in names) and (spec.kind != "ia3" or is_ia3_target(target))
    ]
    check_ranks_fit(spec, [t for t in targets if t.lora_name not in per_module])  # file shapes are as they are
    modules = {t.lora_name: make_module(spec, t, **per_module.get(t.lora_name, {})) for t in targets}
    return LoRANetwork(modules)


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
    wrong. LoKr (a dim past its factors means full matrices) and (IA)^3 (no rank) are not
    checked.
    """
    if spec.kind not in (*LORA_FAMILY, "loha"):
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
    if spec.kind in ("lora", "locon"):
        return LoRAModule(target.lora_name, target.module, dim, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout)
    if spec.kind == "dylora":
        return DyLoRAModule(target.lora_name, target.module, dim, alpha, spec.unit)
    if spec.kind == "lokr":
        options = {"factor": spec.factor, **options}
    # Imported here: lycoris pulls in peft and bitsandbytes (~3 s), which LoRA runs never need.
    from atelier.network.lycoris_modules import make_lycoris_module

    return make_lycoris_module(spec.kind, target, dim, alpha, spec.rank_dropout, spec.module_dropout, **options)


def file_family(state: dict[str, torch.Tensor]) -> str:
    suffixes = {key.split(".", 1)[1] for key in state if "." in key}
    for suffix, family in FILE_FAMILIES:
        if suffix in suffixes:
            return family
    raise ValueError("holds no kohya network tensors (lora_down / hada_* / lokr_* / on_input)")


def module_shapes(family: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per module: the dim / alpha (and LoKr layout) the file was trained with."""
    shapes: dict[str, dict[str, Any]] = {}
    names = {key.split(".", 1)[0] for key in state}
    for name in names:
        def get(suffix: str) -> torch.Tensor | None:
            return state.get(f"{name}.{suffix}")

        entry: dict[str, Any] = {}
        if get("alpha") is not None:
            entry["alpha"] = float(get("alpha"))
        if family == "lora":
            entry["dim"] = get("lora_down.weight").shape[0]
        elif family == "loha":
            entry["dim"] = get("hada_w1_b").shape[0]
        elif family == "lokr":
            decomposed = get("lokr_w2_a") if get("lokr_w2_a") is not None else get("lokr_w1_a")
            if decomposed is not None:
                entry["dim"] = decomposed.shape[1]
            else:
                entry["full_matrix"] = True  # both Kronecker factors stored whole
        else:  # (IA)^3: no dim or alpha
            entry = {}
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
        family = file_family(state)
    except ValueError as error:
        raise ValueError(f"network.weights={source} {error}") from error
    if family != spec.kind and not (family == "lora" and spec.kind in LORA_FAMILY):
        raise ValueError(
            f"network.weights={source} holds {family} modules, but network.module={spec.kind}; "
            f"continue it with network={family if family != 'lora' else 'lora (or locon, dylora)'}"
        )
    for prefix, trained, key in ((UNET_PREFIX, unet, "train_text_encoder_only"), (TEXT_ENCODER_PREFIX, text_encoder, "train_unet_only")):
        if trained is not None and not any(belongs_to(name, prefix) for name in state):
            raise ValueError(
                f"network.weights={source} has no {prefix}_ modules, but this run trains them; "
                f"set network.{key}=true to train only what the file holds"
            )
    shapes = module_shapes(family, state)
    network = create_network(spec, unet, text_encoder, per_module=shapes, names=set(shapes))
    network.load_kohya_state_dict(state, source)
    return network
