"""network: the adapter trained over the base model (its kind, size and dropouts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional

from atelier.config.block_weights import check_block_fields
from atelier.config.network_spec import LORAPLUS_KEYS, NetworkSpec
from atelier.config.schema.checks import at_least
from atelier.config.schema.enums import NetworkModule, TrainBlocks
from atelier.config.schema.fields import option
from atelier.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class NetworkConfig:
    module: NetworkModule = option(
        NetworkModule.lora, flag="network_module", ss=("ss_network_module", "ss_network_args"),
        doc="The network kind (atelier/config/network_kinds.py lists them).",
        kohya="lycoris.kohya kinds also get network_args algo=... preset=...",
    )
    dim: int = option(8, flag="network_dim", ss="ss_network_dim", doc="The rank of each module.")
    alpha: float = option(4.0, flag="network_alpha", ss="ss_network_alpha",
                          doc="Scales each module's update by alpha / dim.")
    train_unet_only: bool = option(False, flag="network_train_unet_only", ss="ss_text_encoder_lr",
                                   doc="Train only the UNet's modules (the text encoder stays as it is).")
    train_text_encoder_only: bool = option(False, flag="network_train_text_encoder_only", ss="ss_unet_lr",
                                           doc="Train only the text encoder's modules.")
    weights: Optional[str] = option(
        None, flag="network_weights", ss="ss_network_weights",
        doc="A kohya LoRA file to start from; its per-module rank and alpha replace `dim` and `alpha`. Its kind "
        "must match `module`.",
    )
    conv_dim: Optional[int] = option(
        None, flag="network_args conv_dim", ss="ss_network_args",
        doc="Rank of the 3x3 convs of ResnetBlock2D, Downsample2D, Upsample2D (null: those blocks are not trained).",
    )
    conv_alpha: Optional[float] = option(None, flag="network_args conv_alpha", ss="ss_network_args",
                                         doc="Alpha of those convs (null = 1.0, as in sd-scripts).")
    dropout: Optional[float] = option(None, flag="network_dropout", ss="ss_network_dropout",
                                      doc="Neuron dropout on the rank activations (lora/locon).",
                                      kohya="LyCORIS kinds: network_args dropout=...")
    rank_dropout: Optional[float] = option(None, flag="network_args rank_dropout", ss="ss_network_args",
                                           doc="Drop ranks at random in each training step.")
    module_dropout: Optional[float] = option(None, flag="network_args module_dropout", ss="ss_network_args",
                                             doc="Drop whole modules at random in each training step.")
    factor: int = option(-1, flag="network_args factor", ss="ss_network_args",
                         doc="LoKr: Kronecker factor of each layer's dimensions (-1: the most balanced split).")
    unit: Optional[int] = option(None, flag="network_args unit", ss="ss_network_args",
                                 doc="DyLoRA: ranks learnt together per step; dim must be a multiple (null = 1).")
    # LoRA+ (sd-scripts' network_args, networks.lora / networks.dylora): the up matrices learn at
    # the part's learning rate times the ratio (https://arxiv.org/abs/2402.12354 suggests 16).
    loraplus_lr_ratio: Optional[float] = option(
        None, flag="network_args loraplus_lr_ratio", ss="ss_network_args",
        doc="LoRA+: the up (B) matrices learn this many times faster than the down ones (null: off; 16 is usual).",
    )
    loraplus_unet_lr_ratio: Optional[float] = option(
        None, flag="network_args loraplus_unet_lr_ratio", ss="ss_network_args",
        doc="LoRA+ for the UNet's modules only (null: loraplus_lr_ratio).",
    )
    loraplus_text_encoder_lr_ratio: Optional[float] = option(
        None, flag="network_args loraplus_text_encoder_lr_ratio", ss="ss_network_args",
        doc="LoRA+ for the text encoders' modules only (null: loraplus_lr_ratio).",
    )
    # Block-wise UNet (sd-scripts' networks.lora; atelier/config/block_weights.py): one value per block,
    # 25 for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 for SDXL.
    block_dims: Optional[List[int]] = option(
        None, flag="network_args block_dims", ss="ss_network_args",
        doc="The rank of the UNet's modules per block (25 values for SD1/SD2, 23 for SDXL; 0: no modules in that "
        "block). Null: network.dim everywhere.",
        kohya="sd-scripts takes the block lists as strings: '2,2,4,...'",
    )
    block_alphas: Optional[List[float]] = option(
        None, flag="network_args block_alphas", ss="ss_network_args",
        doc="The alpha of the UNet's modules per block (with block_dims or a block lr weight; null: network.alpha).",
    )
    conv_block_dims: Optional[List[int]] = option(
        None, flag="network_args conv_block_dims", ss="ss_network_args",
        doc="The rank of the 3x3 convs per block, which it adds to the trained layers (with block_dims or a block lr "
        "weight; null: network.conv_dim everywhere).",
    )
    conv_block_alphas: Optional[List[float]] = option(
        None, flag="network_args conv_block_alphas", ss="ss_network_args",
        doc="The alpha of the 3x3 convs per block (with conv_block_dims; null: network.conv_alpha).",
    )
    down_lr_weight: Any = option(
        None, flag="network_args down_lr_weight", ss="ss_network_args",
        doc="The UNet's learning rate times this, per input block (12 values for SD1/SD2, 9 for SDXL; missing ones "
        "1.0), or a preset: sine, cosine, linear, reverse_linear, zeros, with an optional +number (sine+0.5). A "
        "block whose weight is 0 (or not above block_lr_zero_threshold) gets no modules, as in sd-scripts.",
    )
    mid_lr_weight: Any = option(
        None, flag="network_args mid_lr_weight", ss="ss_network_args",
        doc="The learning-rate weight of the middle block (SDXL: 3 values); 0 leaves it untrained.",
    )
    up_lr_weight: Any = option(
        None, flag="network_args up_lr_weight", ss="ss_network_args",
        doc="As down_lr_weight, for the output blocks (deepest first).",
    )
    block_lr_zero_threshold: Optional[float] = option(
        None, flag="network_args block_lr_zero_threshold", ss="ss_network_args",
        doc="Block lr weights not above this become 0 (their blocks get no modules). Null: 0.",
    )
    scale_weight_norms: Optional[float] = option(
        None, flag="scale_weight_norms", ss="ss_scale_weight_norms",
        doc="Cap the norm of every module's update after each optimizer step (1.0 is the usual value). Null: off.",
    )
    # LyCORIS' network_args (lycoris.kohya), on our own modules for lora / locon (atelier/network/dora.py).
    dora_wd: bool = option(
        False, flag="network_args dora_wd", ss="ss_network_args",
        doc="DoRA (weight-decomposed LoRA, LyCORIS' dora_wd): each layer's output-channel magnitudes are learnt "
        "apart from its direction (files hold <module>.dora_scale). lora, locon, loha, lokr; no network.dropout.",
        kohya="dora_wd: LyCORIS' only; network=lora with it is written as --network_module lycoris.kohya, algo=lora",
    )
    use_tucker: bool = option(
        False, flag="network_args use_tucker", ss="ss_network_args",
        doc="LyCORIS' Tucker decomposition of the 3x3 convs (locon: lora_mid.weight, loha: hada_t1/t2, lokr: "
        "lokr_t2): a rank x rank 3x3 core between 1x1 factors. Only with conv_dim (refused without: it would do "
        "nothing).",
        kohya="use_tucker: LyCORIS' only (without conv_dim LyCORIS would train the convs at network_dim)",
    )
    train_blocks: Optional[TrainBlocks] = option(
        None, flag="network_args train_blocks", ss="ss_network_args",
        doc="FLUX: the transformer blocks a LoRA trains: all, double (the double-stream ones) or single. Null: all.",
    )
    preset: Optional[str] = option(
        None, flag="network_args preset", ss="ss_network_args",
        doc="LyCORIS' layer preset (locon, loha, lokr): full, full-lin, attn-mlp, attn-only, unet-only, "
        "unet-transformer-only, unet-convblock-only. Those with 3x3 convs (full, unet-*only but the transformer "
        "one) need conv_dim, the others refuse it; the unet-* ones need train_unet_only. Null: attn-mlp, or full "
        "with conv_dim.",
        kohya="preset: LyCORIS' conv_in, conv_out and time_embedding layers (full, unet-only) are not trained here",
    )

    def loraplus_ratio(self, text_encoder: bool) -> float | None:
        """The LoRA+ ratio of the UNet's or the text encoders' up matrices (None: no LoRA+), as
        sd-scripts picks it: the part's own ratio, else loraplus_lr_ratio."""
        own = self.loraplus_text_encoder_lr_ratio if text_encoder else self.loraplus_unet_lr_ratio
        return own if own is not None else self.loraplus_lr_ratio

    def __post_init__(self) -> None:
        at_least("network.dim", self.dim, 1)
        for name in LORAPLUS_KEYS:
            ratio = getattr(self, name)
            if ratio is not None and not ratio > 0:
                raise ConfigError(f"network.{name}={ratio} must be above 0 (null: no LoRA+)")
        if self.train_unet_only and self.train_text_encoder_only:
            raise ConfigError("network.train_unet_only and network.train_text_encoder_only cannot both be true")
        if self.alpha is not None and not float(self.alpha) > 0:
            # A warning: alpha 0 or negative is legal in sd-scripts (0 means alpha = dim there).
            log.warning("network.alpha=%s: the LoRA's scale alpha/dim is %s; usual values are 1 to network.dim",
                        self.alpha, "0 (it learns nothing)" if float(self.alpha) == 0 else "negative")
        check_block_fields(self)
        # The options the kind takes and its own rules (dylora's unit, ...): the kinds registry's.
        NetworkSpec.from_config(self)
