"""Block-wise ranks, alphas and learning-rate weights of the UNet, as sd-scripts' networks.lora has them.

sd-scripts (networks/lora.py: get_block_dims_and_alphas, get_block_lr_weight,
remove_block_dims_and_alphas, parse_block_lr_kwargs) splits the UNet into blocks:
SD1/SD2 25 (IN00-IN11, MID, OUT00-OUT11), SDXL 23 (the time/label embedding, IN01-IN09,
MID00-MID02, OUT00-OUT08, the output conv). network.block_dims / block_alphas /
conv_block_dims / conv_block_alphas give one value per block; down/mid/up_lr_weight scale
each block's learning rate (the SDXL list gets 1.0 for its first and last block, as
sd-scripts adds them). A block whose weight is 0 (or not above block_lr_zero_threshold)
gets no modules at all, as in sd-scripts. Which module is in which block:
atelier.network.blocks.

Pure Python (no torch): the config checks it, the network factory and the optimizer's
param groups read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.errors import ConfigError

if TYPE_CHECKING:
    from atelier.config.schema import NetworkConfig
    from atelier.families import BlockLayout

# network.* keys that are per-block lists of the UNet's blocks.
BLOCK_LIST_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_KEYS = (*BLOCK_LIST_KEYS, *LR_WEIGHT_KEYS, "block_lr_zero_threshold")
# The presets of down_lr_weight / up_lr_weight ("name" or "name+number"), over n blocks.
PRESETS: dict[str, Callable[[int], list[float]]] = {
    "cosine": lambda n: [math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))],
    "sine": lambda n: [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
    "linear": lambda n: [i / (n - 1) for i in range(n)],
    "reverse_linear": lambda n: [i / (n - 1) for i in reversed(range(n))],
    "zeros": lambda n: [0.0] * n,
}


def uses_lr_weights(net: NetworkConfig) -> bool:
    return any(getattr(net, key) is not None for key in LR_WEIGHT_KEYS)


def is_blockwise(net: NetworkConfig) -> bool:
    """Whether the UNet's modules are shaped per block (sd-scripts: block_dims or any lr weight given)."""
    return getattr(net, "block_dims", None) is not None or uses_lr_weights(net)


def _numbers(key: str, value: Any) -> list[float]:
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"network.{key}={value!r} must be a list of numbers") from None


def _weight_list(key: str, value: Any) -> list[float] | str:
    """A lr weight as given: a list (YAML, or sd-scripts' "1,1,0.5" text) or a preset name."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key != "mid_lr_weight":
            # sd-scripts reads a down/up value without a comma as a preset name.
            raise ConfigError(f"network.{key}={value}: one number is not a list; give [{value}] "
                              f"(the other blocks then keep 1.0) or a preset ({', '.join(PRESETS)})")
        return [float(value)]
    if isinstance(value, str):
        if "," in value or key == "mid_lr_weight":  # sd-scripts' test: mid is always a list
            try:
                return [float(s) if s.strip() else 0.0 for s in value.split(",")]  # empty: 0, as sd-scripts
            except ValueError:
                raise ConfigError(f"network.{key}={value!r} must be numbers separated by commas") from None
        return value
    return _numbers(key, value)


def _preset(key: str, text: str, n: int) -> list[float]:
    name, plus, base = text.partition("+")
    if name not in PRESETS:
        raise ConfigError(f"network.{key}={text!r} is not a list of numbers or one of the presets "
                          f"{', '.join(PRESETS)} (optionally +number, e.g. sine+0.5)")
    try:
        offset = float(base) if plus else 0.0
    except ValueError:
        raise ConfigError(f"network.{key}={text!r}: the part after + must be a number, e.g. {name}+0.5") from None
    return [w + offset for w in PRESETS[name](n)]


def check_block_fields(net: NetworkConfig) -> None:
    """The network group's own rules on the block options (the counts need the model: check_block_counts)."""
    for key in ("block_dims", "conv_block_dims"):
        values = getattr(net, key)
        if values is not None and any(not float(v).is_integer() or v < 0 for v in _numbers(key, values)):
            raise ConfigError(f"network.{key}={list(values)} must be whole ranks of 0 or more (0: no module there)")
    for key in ("block_alphas", "conv_block_alphas"):
        if getattr(net, key) is not None:
            _numbers(key, getattr(net, key))
    for key in LR_WEIGHT_KEYS:
        value = getattr(net, key)
        if value is not None:
            given = _weight_list(key, value)
            if isinstance(given, str):
                _preset(key, given, 2)  # the name checked here; the model's count applies later
    # Options sd-scripts reads only together with others: alone they would do nothing.
    if net.block_lr_zero_threshold is not None and not uses_lr_weights(net):
        raise ConfigError(f"network.block_lr_zero_threshold={net.block_lr_zero_threshold} applies to the block "
                          "lr weights; set network.down_lr_weight / mid_lr_weight / up_lr_weight or unset it")
    for key in ("block_alphas", "conv_block_dims"):
        if getattr(net, key) is not None and not is_blockwise(net):
            raise ConfigError(f"network.{key} is read only with network.block_dims or a block lr weight "
                              f"(as in sd-scripts); set network.block_dims or unset network.{key}")
    if net.conv_block_alphas is not None and net.conv_block_dims is None:
        raise ConfigError("network.conv_block_alphas needs network.conv_block_dims (sd-scripts ignores it alone); "
                          "set network.conv_block_dims or unset network.conv_block_alphas")


def block_lr_weights(net: NetworkConfig, layout: BlockLayout) -> list[float] | None:
    """One learning-rate factor per block (None: not block-wise), as sd-scripts' get_block_lr_weight:
    down/up presets over the model's blocks, short lists filled with 1.0, an unset part all 1.0,
    weights not above block_lr_zero_threshold (default 0) made 0; SDXL's first and last block 1.0."""
    if not uses_lr_weights(net):
        return None
    threshold = float(net.block_lr_zero_threshold or 0.0)
    parts = []
    for key, n in (("down_lr_weight", layout.down), ("mid_lr_weight", layout.mid), ("up_lr_weight", layout.down)):
        value = getattr(net, key)
        given = [1.0] * n if value is None else _weight_list(key, value)
        weights = _preset(key, given, n) if isinstance(given, str) else given
        if len(weights) > n:
            raise ConfigError(f"network.{key} has {len(weights)} values; this model has {n} such blocks "
                              f"({layout.name}): give at most {n} (sd-scripts drops the rest)")
        weights = weights + [1.0] * (n - len(weights))
        parts += [w if w > threshold else 0.0 for w in weights] if value is not None else weights
    return [1.0, *parts, 1.0] if layout.edges else parts


@dataclass(frozen=True)
class BlockShapes:
    """Per block: the rank and alpha of its linear / 1x1 layers and of its kxk convs (None: no conv modules)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None


def block_shapes(net: NetworkConfig, layout: BlockLayout, conv_dim: int | None, conv_alpha: float) -> BlockShapes | None:
    """sd-scripts' get_block_dims_and_alphas then remove_block_dims_and_alphas: unset lists take
    network.dim / alpha (conv_dim / conv_alpha), and a block whose lr weight is 0 gets rank 0."""
    if not is_blockwise(net):
        return None
    n = layout.count
    check_block_counts(net, layout)

    def given(key: str, default: float | None) -> list[float] | None:
        value = getattr(net, key)
        return _numbers(key, value) if value is not None else (None if default is None else [default] * n)

    dims = [int(d) for d in given("block_dims", net.dim)]
    alphas = given("block_alphas", float(net.alpha))
    conv_dims = given("conv_block_dims", conv_dim)
    conv_alphas = None
    if conv_dims is not None:
        conv_dims = [int(d) for d in conv_dims]
        conv_alphas = given("conv_block_alphas", conv_alpha)
    for i, weight in enumerate(block_lr_weights(net, layout) or []):
        if weight == 0:
            dims[i] = 0
            if conv_dims is not None:
                conv_dims[i] = 0
    return BlockShapes(dims, alphas, conv_dims, conv_alphas)


def check_block_counts(net: NetworkConfig, layout: BlockLayout | None, label: str = "this model") -> None:
    """Each block list has one value per block of the model (sd-scripts asserts the same); a
    family without a block layout (None: FLUX.1) takes none of the block options."""
    if layout is None:
        given = [key for key in BLOCK_KEYS if getattr(net, key) is not None]
        if given:
            raise ConfigError(f"network.{given[0]}: block-wise ranks and learning rates are the SD UNet's (IN/MID/OUT "
                              f"blocks); {label} has none of them: unset {', '.join('network.' + k for k in given)}")
        return
    n = layout.count
    for key in BLOCK_LIST_KEYS:
        values = getattr(net, key)
        if values is not None and len(values) != n:
            raise ConfigError(f"network.{key} has {len(values)} values; {layout.name} has {n} "
                              f"blocks ({layout.blocks}): give {n}")
    block_lr_weights(net, layout)  # raises on a list longer than the model's blocks


def _text(values: Sequence[float], whole: bool = False) -> str:
    return ",".join(str(int(v)) if whole else str(float(v)) for v in values)


def block_network_args(net: NetworkConfig) -> dict[str, str]:
    """The block options as sd-scripts' --network_args / ss_network_args keep them: "2,2,4,..." strings."""
    args: dict[str, str] = {}
    for key in BLOCK_LIST_KEYS:
        if getattr(net, key) is not None:
            args[key] = _text(_numbers(key, getattr(net, key)), whole=key.endswith("dims"))
    for key in LR_WEIGHT_KEYS:
        value = getattr(net, key)
        if value is None:
            continue
        given = _weight_list(key, value)
        if isinstance(given, str):
            args[key] = given
        elif len(given) == 1 and key != "mid_lr_weight":
            # sd-scripts reads "0.5" as a preset name; "0.5,1.0" is the same weights (short lists fill with 1.0).
            args[key] = _text([given[0], 1.0])
        else:
            args[key] = _text(given)
    if net.block_lr_zero_threshold is not None:
        args["block_lr_zero_threshold"] = str(float(net.block_lr_zero_threshold))
    return args
