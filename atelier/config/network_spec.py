"""The `network` config group checked and read once: what to build, and how sd-scripts names it.

`NetworkSpec.from_config` refuses options that do not apply to the chosen
network.module, naming the key and the fix. `kohya_module` / `kohya_network_args`
give ss_network_module / ss_network_args as sd-scripts and LyCORIS write them, and
the `--network_module` / `--network_args` of the same run (atelier export-kohya).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from atelier.errors import ConfigError

# The LoRA+ keys of the network group (NetworkConfig's rules; network_args as sd-scripts spells them).
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
from atelier.config.block_weights import BLOCK_KEYS, block_network_args
from atelier.config.network_kinds import PRESETS, NetworkKind, kind_named

if TYPE_CHECKING:  # the schema checks its network group with NetworkSpec: a runtime import would be a circle
    from atelier.config.schema import NetworkConfig

# sd-scripts' default conv_alpha when conv_dim is given without it.
DEFAULT_CONV_ALPHA = 1.0
# LyCORIS' network module for sd-scripts (a lora run with DoRA is written as its algo=lora).
LYCORIS_MODULE = "lycoris.kohya"


@dataclass(frozen=True)
class NetworkSpec:
    kind: str
    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float = DEFAULT_CONV_ALPHA
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1
    unit: int = 1
    dora_wd: bool = False
    use_tucker: bool = False
    preset: str | None = None

    @property
    def conv(self) -> bool:
        return bool(self.conv_dim)

    @property
    def entry(self) -> NetworkKind:
        """What the kind means (atelier.config.network_kinds)."""
        return kind_named(self.kind)

    @classmethod
    def from_config(cls, net: NetworkConfig) -> "NetworkSpec":
        # network.module is a NetworkModule member (a str), or the name of a kind registered
        # after the schema's enum was built: the registry is looked up by the name either way.
        entry = kind_named(net.module)
        kind = entry.name
        given = {
            "conv_dim": net.conv_dim,
            "dropout": net.dropout,
            "rank_dropout": net.rank_dropout,
            "module_dropout": net.module_dropout,
            "factor": None if net.factor in (None, -1) else net.factor,
            "unit": net.unit,
            "dora_wd": net.dora_wd,
            "use_tucker": net.use_tucker,
            "preset": net.preset,
            **{name: getattr(net, name) for name in LORAPLUS_KEYS},
            # Any value counts here, 0 too (mid_lr_weight=0 is a setting): as text, which is never falsy.
            **{name: None if getattr(net, name) is None else str(getattr(net, name)) for name in BLOCK_KEYS},
        }
        for key, value in given.items():
            if value and key not in entry.options:
                raise ConfigError(
                    f"network.{key}={value} does not apply to network.module={kind} "
                    f"(it takes: {', '.join(sorted(entry.options)) or 'none of the optional keys'}); "
                    f"unset it (network.{key}=null)"
                )
        for key in ("dropout", "rank_dropout", "module_dropout"):
            if given[key] is not None and not 0 <= given[key] < 1:
                raise ConfigError(f"network.{key}={given[key]} must be in [0, 1)")
        dim, conv_dim = int(net.dim), given["conv_dim"]  # dim >= 1: NetworkConfig's own rule
        if conv_dim is not None and conv_dim < 0:
            raise ConfigError(f"network.conv_dim={conv_dim} must be a positive rank, or null for no conv layers")
        spec = cls(
            kind=kind,
            dim=dim,
            alpha=float(net.alpha),
            conv_dim=int(conv_dim) if conv_dim else None,
            conv_alpha=float(net.conv_alpha) if net.conv_alpha is not None else DEFAULT_CONV_ALPHA,
            dropout=float(given["dropout"] or 0.0),
            rank_dropout=float(given["rank_dropout"] or 0.0),
            module_dropout=float(given["module_dropout"] or 0.0),
            factor=int(net.factor if net.factor is not None else -1),
            unit=int(given["unit"] or 1),
            dora_wd=bool(net.dora_wd),
            use_tucker=bool(net.use_tucker),
            preset=str(net.preset) if net.preset else None,
        )
        if spec.preset:
            _check_preset(spec, bool(net.train_unet_only))
        if spec.use_tucker and not spec.conv:
            # Refused, not warned: it would do nothing (LyCORIS, whose conv_dim defaults to dim, would train convs).
            raise ConfigError("network.use_tucker=true decomposes only the 3x3 convs, which network.conv_dim trains; "
                              "set network.conv_dim (e.g. to network.dim) or unset use_tucker")
        if spec.dora_wd and spec.dropout:
            # LyCORIS' DoRA rebuilds the weight, so there is no activation to drop (it only warns).
            raise ConfigError(f"network.dropout={spec.dropout} does nothing with network.dora_wd=true (LyCORIS' DoRA "
                              "has no neuron dropout); unset it (network.dropout=null) or use rank_dropout")
        entry.check(spec)
        return spec


def _check_preset(spec: NetworkSpec, train_unet_only: bool) -> None:
    """network.preset's rules: a known name, conv_dim exactly when it trains 3x3 convs, no text encoder to train
    when it has none of its layers."""
    key = f"network.preset={spec.preset}"
    if spec.preset not in PRESETS:
        raise ConfigError(f"{key} is not one of LyCORIS' presets: {', '.join(PRESETS)}")
    preset = PRESETS[spec.preset]
    if preset.conv and not spec.conv:
        raise ConfigError(f"{key} trains the 3x3 convs: set network.conv_dim (LyCORIS gives them network.dim when "
                          "it is unset), or choose a preset without them (attn-mlp, full-lin, ...)")
    if spec.conv and not preset.conv:
        raise ConfigError(f"network.conv_dim={spec.conv_dim} does nothing with {key} (LyCORIS trains no 3x3 conv "
                          "with it); unset conv_dim or choose full / unet-only / unet-convblock-only")
    if not preset.text_encoder and not train_unet_only:
        raise ConfigError(f"{key} adapts no text-encoder layer: set network.train_unet_only=true")


def kohya_module(net: NetworkConfig) -> str:
    """ss_network_module / --network_module."""
    entry = kind_named(net.module)
    if net.dora_wd and not entry.lycoris_algo:
        return LYCORIS_MODULE  # sd-scripts' networks.lora has no DoRA: LyCORIS' algo=lora writes such files
    return entry.kohya_module


def kohya_network_args(net: NetworkConfig) -> dict[str, str]:
    """ss_network_args / --network_args (sd-scripts keeps every value as a string).

    Neuron dropout of networks.lora is the separate --network_dropout
    (ss_network_dropout); LyCORIS reads it from network_args as `dropout`.
    """
    spec = NetworkSpec.from_config(net)
    entry = spec.entry
    args: dict[str, str] = {}
    if entry.lycoris_algo or spec.dora_wd:
        args["algo"] = entry.lycoris_algo or "lora"
        args["preset"] = spec.preset or entry.lycoris_preset or ("full" if spec.conv else "attn-mlp")
    if spec.conv:
        args["conv_dim"] = str(spec.conv_dim)
        args["conv_alpha"] = str(spec.conv_alpha)
    if entry.lycoris_algo and spec.dropout:
        args["dropout"] = str(spec.dropout)
    if spec.rank_dropout:
        args["rank_dropout"] = str(spec.rank_dropout)
    if spec.module_dropout:
        args["module_dropout"] = str(spec.module_dropout)
    if spec.use_tucker:
        args["use_tucker"] = "True"
    if spec.dora_wd:
        args["dora_wd"] = "True"  # as written on sd-scripts' command line (LyCORIS reads it with str_bool)
    for key in entry.always_in_args:
        args[key] = str(getattr(spec, key))
    for key in LORAPLUS_KEYS:
        if getattr(net, key) is not None:
            args[key] = str(getattr(net, key))
    args.update(block_network_args(net))
    if net.train_blocks is not None:  # FLUX's lora_flux
        args["train_blocks"] = net.train_blocks.value
    return args
