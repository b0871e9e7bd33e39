"""A kohya FLUX.1 LoRA (sd-scripts' networks/lora_flux.py) on diffusers' FluxTransformer2DModel.

sd-scripts trains BFL's model, where one Linear computes a double block's q, k and v and one a
single block's q, k, v and MLP input (linear1). In diffusers' layout those are several Linear
modules reading the same input (atelier.network.flux_names), so a kohya module there is a
`FusedLoRAModule`: one lora_down, and a lora_up whose rows are split over the diffusers modules in
order. Every other module is a plain `LoRAModule`, and CLIP-L gets sd-scripts' text-encoder LoRA
named lora_te1_... (T5-XXL's lora_te3_... is not built). The network is an ordinary `LoRANetwork`:
its kohya_state_dict is the file sd-scripts writes (without split_qkv), which ComfyUI, Forge and
diffusers' kohya FLUX reader load, and `flux_network_from_state` reads such a file back.

Public API: build_flux_network, flux_network_from_state, FusedLoRAModule, CLIP_PREFIX.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.network.flux_names import PREFIX, flux_targets_of
from atelier.network.lora import LoRAModule, LoRANetwork
from atelier.network.targets import TEXT_ENCODER_TARGETS, find_targets, text_encoder_name_root

log = logging.getLogger(__name__)

# sd-scripts' lora_flux prefixes: CLIP-L is text encoder 1, T5-XXL text encoder 3 ("ComfyUI compatible").
CLIP_PREFIX = "lora_te1"
T5_PREFIX = "lora_te3"


class FusedLoRAModule(LoRAModule):
    """One kohya module on a fused BFL Linear, patched into the diffusers Linears ("parts") that
    make it up: part i (rows r_i of the fused layer) computes

        y_i = W_i x + b_i + up[r_i] @ down @ x * alpha / rank * multiplier,

    so concatenating the parts' outputs gives BFL's fused layer with this LoRA (`forward`). The
    state dict is the kohya module's: one lora_down [rank, in], the fused lora_up [sum of the
    parts' rows, rank], alpha.

    The parts of one forward share down(x) and this step's dropout, rank-dropout and module-dropout
    draws, as BFL's single Linear makes one draw for all its rows: diffusers calls the parts one
    after another on the very same input tensor, so the first call computes the dropped rank
    activations and the others reuse them; once every part has read them they are let go.
    """

    def __init__(
        self,
        lora_name: str,
        parts: Sequence[nn.Linear],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        if len({part.in_features for part in parts}) != 1:
            raise ValueError(f"{lora_name}: the fused parts read inputs of different sizes")
        # LoRAModule builds down (kaiming-uniform) from the first part; up is the fused one, zero.
        super().__init__(lora_name, parts[0], rank, alpha, dropout, rank_dropout, module_dropout)
        sizes = [part.out_features for part in parts]
        self.lora_up = nn.Linear(rank, sum(sizes), bias=False)
        nn.init.zeros_(self.lora_up.weight)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.rows = [(start, start + size) for start, size in zip(starts, sizes)]
        self._parts = list(parts)  # outside the module tree, as PatchedLayer keeps its base
        self._part_forwards: list[Any] | None = None
        self._shared: list[Any] | None = None  # [input, dropped low rank or None, parts served]

    @property
    def parts(self) -> list[nn.Linear]:
        return self._parts

    def apply_to(self) -> None:
        self._part_forwards = [part.forward for part in self._parts]
        for i, part in enumerate(self._parts):
            part.forward = partial(self.part_forward, i)

    def restore(self) -> None:
        if self._part_forwards is not None:
            for part, forward in zip(self._parts, self._part_forwards):
                part.forward = forward
            self._part_forwards = None
        self._shared = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BFL's fused layer with this LoRA: the parts' outputs side by side, in order."""
        return torch.cat([self.part_forward(i, x) for i in range(len(self._parts))], dim=-1)

    def part_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Part i's output: its base layer's, plus rows r_i of the fused update."""
        forwards = self._part_forwards or [part.forward for part in self._parts]
        out = forwards[i](x)
        dropped = self._shared_low_rank(x)
        if dropped is None:
            return out
        h, scale = dropped
        start, end = self.rows[i]
        return out + (F.linear(h, self.lora_up.weight[start:end]) * (self.multiplier * scale)).to(out.dtype)

    def _shared_low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        shared = self._shared
        if shared is None or shared[0] is not x:  # a new input: this forward's first part
            shared = self._shared = [x, self.dropped_low_rank(x), 0]
        shared[2] += 1
        if shared[2] == len(self._parts):
            # Every part has its rows: holding the input and activations past the forward would
            # keep one activation per fused module alive until the next step.
            self._shared = None
        return shared[1]


def clip_targets(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(kohya name, Linear) of CLIP-L's attention and MLP layers, as sd-scripts' lora_flux names them:
    lora_te1_text_model_encoder_layers_N_..., the same names SD's lora_te_ / SDXL's lora_te1_ get."""
    root = text_encoder_name_root(text_encoder)
    return [(t.lora_name, t.module) for t in find_targets(text_encoder, CLIP_PREFIX, TEXT_ENCODER_TARGETS, root)]


def build_flux_network(
    transformer: nn.Module,
    dim: int,
    alpha: float,
    train_blocks: str = "all",
    dropout: float | None = None,
    rank_dropout: float | None = None,
    module_dropout: float | None = None,
    text_encoder: nn.Module | None = None,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    names: set[str] | None = None,
) -> LoRANetwork:
    """sd-scripts' default FLUX LoRA on `transformer` (train_blocks: all, double or single), and on
    `text_encoder` (CLIP-L) when given; the modules are not applied yet (network.apply_to()).

    Modules in sd-scripts' order (CLIP-L first), named and shaped as its file: a fused BFL layer is
    one FusedLoRAModule over its diffusers Linears. Initialised as sd-scripts: kaiming-uniform down,
    zero up, so the fresh network changes no output. `ranks` / `alphas` override dim / alpha per
    module, `names` keeps only those modules (flux_network_from_state uses both).
    """
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        # fuse_qkv_projections() computes q, k, v with a to_qkv Linear the modules here never see.
        raise ValueError("the transformer has fused q/k/v projections; call unfuse_qkv_projections() first")
    ranks, alphas = ranks or {}, alphas or {}
    options = {"dropout": dropout or 0.0, "rank_dropout": rank_dropout or 0.0, "module_dropout": module_dropout or 0.0}
    wanted = names.__contains__ if names is not None else (lambda name: True)
    layers = dict(transformer.named_modules())
    modules: dict[str, nn.Module] = {}
    te = clip_targets(text_encoder) if text_encoder is not None else []
    for name, layer in te:
        if wanted(name):
            modules[name] = LoRAModule(name, layer, ranks.get(name, dim), alphas.get(name, alpha), **options)
    for target in flux_targets_of(transformer, train_blocks):
        if not wanted(target.name):
            continue
        parts = [layers[path] for path in target.modules]
        rank, scale_alpha = ranks.get(target.name, dim), alphas.get(target.name, alpha)
        if target.fused:
            modules[target.name] = FusedLoRAModule(target.name, parts, rank, scale_alpha, **options)
        else:
            modules[target.name] = LoRAModule(target.name, parts[0], rank, scale_alpha, **options)
    network = LoRANetwork(modules)
    # The lines sd-scripts' lora_flux logs.
    if text_encoder is not None:
        log.info("create LoRA for Text Encoder 1: %d modules.", network.count(CLIP_PREFIX))
    log.info("create LoRA for FLUX %s blocks: %d modules.", train_blocks, network.count(PREFIX))
    return network


def flux_network_from_state(
    transformer: nn.Module,
    state: dict[str, torch.Tensor],
    text_encoder: nn.Module | None = None,
    source: str = "the LoRA file",
    **options: float | None,
) -> LoRANetwork:
    """The network a kohya FLUX LoRA file describes (its modules, each module's rank and alpha),
    holding its weights: `build_flux_network` then `load_kohya_state_dict`, so a saved network
    round-trips exactly. `options`: dropout, rank_dropout, module_dropout to go on training with.

    A file with modules this transformer does not have (another block count, sd-scripts' in_dims
    layers) or with CLIP-L modules but no `text_encoder` is refused (ValueError naming them).
    """
    names = {key.split(".", 1)[0] for key in state}
    if any(name.startswith(f"{T5_PREFIX}_") for name in names):
        raise ValueError(f"{source} holds a T5-XXL LoRA ({T5_PREFIX}_...), which is not supported")
    if text_encoder is None and any(name.startswith(f"{CLIP_PREFIX}_") for name in names):
        raise ValueError(f"{source} holds CLIP-L modules ({CLIP_PREFIX}_...); pass the text encoder to load them")
    ranks, alphas = {}, {}
    for name in names:
        down = state.get(f"{name}.lora_down.weight")
        if down is None:
            raise ValueError(f"{source}: module {name} has no lora_down.weight (not a kohya LoRA?)")
        ranks[name] = down.shape[0]
        # sd-scripts and diffusers alike read a missing alpha as the rank (scale 1).
        alphas[name] = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(ranks[name])
    network = build_flux_network(transformer, 1, 1.0, "all", text_encoder=text_encoder, ranks=ranks, alphas=alphas,
                                 names=names, **options)  # fmt: skip
    missing_alpha = {f"{name}.alpha": torch.tensor(alphas[name]) for name in names if f"{name}.alpha" not in state}
    network.load_kohya_state_dict({**state, **missing_alpha}, source)
    return network


__all__ = ["CLIP_PREFIX", "FusedLoRAModule", "build_flux_network", "clip_targets", "flux_network_from_state"]
