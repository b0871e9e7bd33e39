"""Every network kind Atelier trains, one entry each: the only table of kinds.

The config's `network.module` choices, the spec's checks, the factory's modules, the
kohya names in metadata and export-kohya, the tools' file recognition and the fused
launcher all read KINDS and FILE_FAMILIES. Adding a kind is one `NetworkKind(...)` in
KINDS (and the function that builds its module): nothing else lists kinds.

It lives with the config because the config's choices and rules are made of it. It names
each kind's module builder by import path (`"atelier.network.lora:build_module"`, as Hydra's
`_target_` does), so the config layer imports neither torch nor atelier.network; the
network factory imports the builder when a module is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.config.block_weights import BLOCK_KEYS
from atelier.errors import ConfigError

if TYPE_CHECKING:
    from atelier.config.network_spec import NetworkSpec

# A file's tensor for one module, by suffix ("lora_down.weight"), or None.
TensorOf = Callable[[str], Any]


@dataclass(frozen=True)
class FileFamily:
    """One layout of a module's tensors in a kohya network file."""

    name: str
    # Tensor-name suffixes (after "<module>.") that identify the family.
    identifying: tuple[str, ...]
    # The per-module shape the file was trained with ({"dim": r} / {"full_matrix": True} / {}).
    shape_of: Callable[[TensorOf], dict[str, Any]]
    # Other suffixes only this family writes (Tucker / decomposed variants).
    also_writes: tuple[str, ...] = ()
    lycoris: bool = False


def _lora_shape(tensor: TensorOf) -> dict[str, Any]:
    return {"dim": tensor("lora_down.weight").shape[0]}


def _loha_shape(tensor: TensorOf) -> dict[str, Any]:
    return {"dim": tensor("hada_w1_b").shape[0]}


def _lokr_shape(tensor: TensorOf) -> dict[str, Any]:
    if tensor("lokr_t2") is not None:  # use_tucker: lokr_w2_a is [rank, out] around the [rank, rank, k, k] core
        return {"dim": tensor("lokr_t2").shape[0]}
    decomposed = tensor("lokr_w2_a") if tensor("lokr_w2_a") is not None else tensor("lokr_w1_a")
    if decomposed is None:
        return {"full_matrix": True}  # both Kronecker factors stored whole
    return {"dim": decomposed.shape[1]}


def _no_shape(tensor: TensorOf) -> dict[str, Any]:
    return {}  # (IA)^3: a scale vector, no rank


# In the order a file is recognised: the first family with an identifying tensor wins
# (a LoKr file may also hold plain lora_* modules, never the other way round).
FILE_FAMILIES: tuple[FileFamily, ...] = (
    FileFamily("loha", ("hada_w1_a",), _loha_shape, also_writes=("hada_t1",), lycoris=True),
    FileFamily("lokr", ("lokr_w1", "lokr_w1_a"), _lokr_shape, also_writes=("lokr_w2", "lokr_t2"), lycoris=True),
    FileFamily("ia3", ("on_input",), _no_shape, lycoris=True),
    FileFamily("lora", ("lora_down.weight",), _lora_shape),
)
# Tensors a module holds only when trained with a network.* variant key (LyCORIS' names, any
# family): a file holding them continues only with that key set (atelier.network.factory), and
# the LoRA tools (resize, merge) refuse them rather than drop them.
VARIANT_TENSORS: dict[str, tuple[str, ...]] = {
    "dora_wd": ("dora_scale",),  # DoRA: each output channel's magnitude
    "use_tucker": ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2"),  # the kxk convs' Tucker cores
}


@dataclass(frozen=True)
class Preset:
    """One of LyCORIS' presets (lycoris/config.py) as network.preset takes it."""

    conv: bool  # it trains the 3x3 convs (LyCORIS' enable_conv): network.conv_dim is needed, else refused
    blocks: bool  # its layers include ResnetBlock2D's (Down/Upsample2D's with conv)
    text_encoder: bool  # it adapts text-encoder layers (without: network.train_unet_only is needed)


# Which layers each one selects: atelier.network.targets.PRESET_SELECTIONS.
PRESETS: dict[str, Preset] = {
    "full": Preset(conv=True, blocks=True, text_encoder=True),
    "full-lin": Preset(conv=False, blocks=True, text_encoder=True),
    "attn-mlp": Preset(conv=False, blocks=False, text_encoder=True),
    "attn-only": Preset(conv=False, blocks=False, text_encoder=True),
    "unet-only": Preset(conv=True, blocks=True, text_encoder=False),
    "unet-transformer-only": Preset(conv=False, blocks=False, text_encoder=False),
    "unet-convblock-only": Preset(conv=True, blocks=True, text_encoder=False),
}

# Tensors of LyCORIS algorithms Atelier does not train (full/diff, OFT, norm): recognised
# so that a tool can say what a file is instead of "not a LoRA".
OTHER_LYCORIS_MARKERS = (".diff", "oft_", ".w_norm", "b_norm")


def family(name: str) -> FileFamily:
    return {f.name: f for f in FILE_FAMILIES}[name]


def lycoris_markers() -> tuple[str, ...]:
    """Substrings of tensor names that only LyCORIS files hold."""
    ours = (m for f in FILE_FAMILIES if f.lycoris for m in (*f.identifying, *f.also_writes))
    return (*ours, *OTHER_LYCORIS_MARKERS)


def _check_dylora(spec: NetworkSpec) -> None:
    if spec.unit <= 0 or spec.dim % spec.unit:
        raise ConfigError(f"network.dim={spec.dim} must be a multiple of network.unit={spec.unit} for DyLoRA")
    if spec.conv_dim and spec.conv_dim != spec.dim:
        # sd-scripts' networks.dylora asserts the same.
        raise ConfigError(f"DyLoRA needs network.conv_dim equal to network.dim ({spec.dim}), got {spec.conv_dim}")


def _no_check(spec: NetworkSpec) -> None:
    return None


@dataclass(frozen=True)
class NetworkKind:
    """What one `network.module` value means, end to end."""

    name: str  # the config value: network=<name> / network.module=<name>
    doc: str  # one line for `--help` and the README
    display: str  # how logs name it (sd-scripts prints "create LoRA for U-Net: ...")
    kohya_module: str  # ss_network_module / --network_module
    family: str  # the FileFamily its files use
    # "package.module:function": (spec, target, dim, alpha, per-module options from a file) -> the
    # nn.Module on `target` (atelier.network.factory imports and calls it).
    builder: str
    # The optional network.* keys it implements; any other one set is an error, not ignored.
    options: frozenset[str]
    # LyCORIS' algo= in network_args, None for sd-scripts' own modules.
    lycoris_algo: str | None = None
    # LyCORIS preset= when the kind has its own; otherwise the one closest to our targets
    # (attn-mlp is exact; `full` adds conv_in, conv_out and time_embedding to the conv blocks).
    lycoris_preset: str | None = None
    # Options written to network_args even at their defaults (sd-scripts keeps them all as strings).
    always_in_args: tuple[str, ...] = ()
    has_rank: bool = True  # network.dim is a rank (> 0)
    # network.dim / conv_dim no wider than each layer (LoKr: a dim past its factors means
    # full matrices; (IA)^3: no rank).
    rank_bounded_by_layer: bool = True
    # Which target layers get a module: "all", or "ia3" (keys, values, FFN output); the
    # selections are atelier.network.targets.LAYER_SELECTIONS.
    layers: str = "all"
    check: Callable[[NetworkSpec], None] = _no_check  # rules only this kind has
    # Can be a lane of a fused group (atelier.fused): its modules must fit BatchedLoRA.
    fusable: bool = False

    @property
    def args(self) -> frozenset[str]:
        """Every optional network.* key the kind reads (sd-scripts passes most of them in
        --network_args): its options, and conv_alpha with conv_dim."""
        return self.options | ({"conv_alpha"} if "conv_dim" in self.options else set())


_DROPOUTS = frozenset({"rank_dropout", "module_dropout"})
# LoRA+ (sd-scripts' networks.lora and networks.dylora): the up matrices' own learning rate.
_LORAPLUS = frozenset({"loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"})
# DoRA (LyCORIS' dora_wd): lora / locon (atelier.network.dora), loha / lokr (LyCORIS' own).
_DORA = frozenset({"dora_wd"})
# LyCORIS' use_tucker: the kxk convs as a Tucker core between 1x1 factors (locon, loha, lokr).
_TUCKER = frozenset({"use_tucker"})
# LyCORIS' layer presets (PRESETS); sd-scripts' own networks take no preset.
_PRESET = frozenset({"preset"})
# sd-scripts networks.lora's block-wise ranks and lr weights (atelier.config.block_weights).
_BLOCKS = frozenset(BLOCK_KEYS)
# LyCORIS' own module classes; the kind's lycoris_algo picks the algorithm.
_LYCORIS = "atelier.network.lycoris_modules:build_module"

KINDS: dict[str, NetworkKind] = {
    kind.name: kind
    for kind in (
        NetworkKind(
            "lora", "sd-scripts networks.lora; with conv_dim also the 3x3 convs (LoCon-style \"C3Lier\")",
            "LoRA", "networks.lora", "lora", "atelier.network.lora:build_module",
            frozenset({"conv_dim", "dropout", *_DROPOUTS, *_LORAPLUS, *_BLOCKS, *_DORA}), fusable=True,
        ),
        NetworkKind(
            "locon", "LyCORIS LoCon (lycoris.kohya algo=locon): LoRA on linear and conv layers",
            "LoCon", "lycoris.kohya", "lora", "atelier.network.lora:build_module",
            frozenset({"conv_dim", "dropout", *_DROPOUTS, *_DORA, *_TUCKER, *_PRESET}),
            lycoris_algo="locon", fusable=True,
        ),
        NetworkKind(
            "loha", "LyCORIS LoHa: a Hadamard product of two low-rank pairs (more expressive per rank)",
            "LoHa", "lycoris.kohya", "loha", _LYCORIS, frozenset({"conv_dim", *_DROPOUTS, *_DORA, *_TUCKER, *_PRESET}),
            lycoris_algo="loha",
        ),
        NetworkKind(
            "lokr", "LyCORIS LoKr: a Kronecker product (network.factor sets the split)",
            "LoKr", "lycoris.kohya", "lokr", _LYCORIS, frozenset({"conv_dim", "factor", *_DROPOUTS, *_DORA, *_TUCKER, *_PRESET}),
            lycoris_algo="lokr", always_in_args=("factor",), rank_bounded_by_layer=False,
        ),
        NetworkKind(
            "dylora", "sd-scripts networks.dylora: ranks learnt in blocks of network.unit, cut to any rank later",
            "DyLoRA", "networks.dylora", "lora", "atelier.network.dylora:build_module",
            frozenset({"conv_dim", "unit", *_LORAPLUS}),
            always_in_args=("unit",), check=_check_dylora,
        ),
        NetworkKind(
            "ia3", "LyCORIS (IA)^3: a learnt scale of keys, values and the FFN output (no rank)",
            "(IA)^3", "lycoris.kohya", "ia3", _LYCORIS, frozenset({"module_dropout"}),
            lycoris_algo="ia3", lycoris_preset="ia3", has_rank=False, rank_bounded_by_layer=False,
            layers="ia3",
        ),
    )
}  # fmt: skip


def kind_named(name: str) -> NetworkKind:
    """The kind `network.module=<name>` names; an error listing the kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"network.module={name} is not one of {', '.join(KINDS)}") from None


def kinds_of_family(name: str) -> list[str]:
    """The kinds whose files hold `name` tensors (a LoRA file continues as lora, locon or dylora)."""
    return [k.name for k in KINDS.values() if k.family == name]


def fusable_kinds() -> list[str]:
    return [k.name for k in KINDS.values() if k.fusable]
