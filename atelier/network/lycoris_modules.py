"""LoHa, LoKr and (IA)^3 modules from the lycoris-lora library, on our kohya targets.

We take LyCORIS' modules (their math, init and kohya tensor names hada_* / lokr_* /
weight + on_input) but not its network builder: `lycoris.kohya.create_network`
asserts on diffusers UNets with its default preset, names SD1 text-encoder layers
without `text_model` under transformers >= 5.6, and its (IA)^3 preset matches no
layer of a diffusers model. The targets and names come from atelier.network.targets.
Imported only when one of these kinds is built: lycoris imports peft and bitsandbytes
(~3 s on a small CPU), which LoRA / LoCon / DyLoRA runs never need.

Pitfall kept away: lycoris-lora 4.1.3's `merge_to()` applies alpha/dim twice for
LoHa and decomposed LoKr. Nothing here merges; the forward pass (used in training
and by A1111 / ComfyUI style loaders) scales once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lycoris.modules.ia3 import IA3Module
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from atelier.network.patch import GradGatedTraining
from atelier.network.targets import IA3_INPUT_LAYERS, TargetLayer

if TYPE_CHECKING:
    from atelier.config.network_spec import NetworkSpec


class LoHa(GradGatedTraining, LohaModule):
    """LyCORIS LoHa: delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / dim."""


class LoKr(GradGatedTraining, LokrModule):
    """LyCORIS LoKr: delta W = kron(w1, w2_a @ w2_b) * alpha / dim (full w2: scale 1)."""


class IA3(GradGatedTraining, IA3Module):
    """LyCORIS (IA)^3: W * (1 + weight) on the output (or input) channels."""

    def apply_max_norm(self, max_norm: float, device: Any = None) -> None:
        return None  # a scale vector, no low-rank update to bound


LYCORIS_CLASSES: dict[str, type[nn.Module]] = {"loha": LoHa, "lokr": LoKr, "ia3": IA3}


def make_lycoris_module(
    kind: str,
    target: TargetLayer,
    dim: int,
    alpha: float,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    **options: Any,
) -> nn.Module:
    """One LyCORIS module of `kind` on `target` (options: LoKr's factor, full_matrix)."""
    if kind == "ia3":
        return IA3(
            target.lora_name, target.module, 1.0, module_dropout=module_dropout,
            train_on_input=target.lora_name.endswith(IA3_INPUT_LAYERS),
        )  # fmt: skip
    # Neuron dropout is not implemented by LyCORIS' LoHa / LoKr (the spec refuses it).
    return LYCORIS_CLASSES[kind](
        target.lora_name, target.module, 1.0, dim, alpha, 0.0, rank_dropout, module_dropout, **options
    )


def build_module(spec: NetworkSpec, target: TargetLayer, dim: int, alpha: float, options: dict[str, Any]) -> nn.Module:
    """The LyCORIS kinds' builder (atelier.config.network_kinds): the kind's lycoris_algo."""
    algo = spec.entry.lycoris_algo
    if algo == "lokr":
        options = {"factor": spec.factor, **options}
    if spec.dora_wd:  # LyCORIS' own DoRA (dora_scale), as its create_network passes dora_wd
        options = {"weight_decompose": True, **options}
    if spec.use_tucker:  # LyCORIS decomposes only the kxk convs (hada_t1 / hada_t2, lokr_t2)
        options = {"use_tucker": True, **options}
    return make_lycoris_module(algo, target, dim, alpha, spec.rank_dropout, spec.module_dropout, **options)
