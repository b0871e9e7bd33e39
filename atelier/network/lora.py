"""Kohya-style LoRA: low-rank updates patched into a frozen model's layers.

Each `LoRAModule` replaces the `forward` of one Linear or Conv2d layer with
    y = W x + up(down(x)) * (alpha / rank) * multiplier
(a kxk conv gets a kxk `down` and a 1x1 `up`, kohya's "C3Lier" / LoCon layout) and
is named as sd-scripts names it, so the saved file loads in A1111, ComfyUI and
diffusers. The base layers are never copied or modified.

`LoRANetwork` holds the modules of one model, of any kind that follows the
PatchedLayer protocol (apply_to / restore / multiplier / state_dict in kohya
tensor names): LoRA here, DyLoRA (atelier.network.dylora), LyCORIS' LoHa / LoKr /
(IA)^3 (atelier.network.lycoris_modules).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.network.patch import PatchedLayer
from atelier.network.targets import (  # noqa: F401  (re-exported: the trainer imports them from here)
    TEXT_ENCODER_PREFIX,
    TEXT_ENCODER_TARGETS,
    UNET_PREFIX,
    UNET_TARGETS,
    TargetLayer,
    belongs_to,
    find_targets,
    iter_targets,
    text_encoder_name_root,
)

if TYPE_CHECKING:
    from atelier.config.network_spec import NetworkSpec

log = logging.getLogger(__name__)

# A param group's modules: a kohya name prefix (a model's), or module names (a UNet block's).
ParamSelect = str | tuple[str, ...]
# The parameter names of a module's up (B) matrices: LoRAModule's and DyLoRAModule's blocks.
UP_WEIGHTS = ("lora_up", "up_blocks")


def max_norm_ratio(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """kohya's max-norm factor for an update of Frobenius norm `norm` (1 = untouched)."""
    norm = norm.clamp(min=max_norm / 2)
    return norm.clamp(max=max_norm) / norm


class LoRAModule(PatchedLayer):
    def __init__(
        self,
        lora_name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        tucker: bool = False,
    ):
        super().__init__(lora_name, base)
        self.rank = rank
        self.lora_mid: nn.Conv2d | None = None
        if isinstance(base, nn.Conv2d) and tucker and base.kernel_size != (1, 1):
            # LyCORIS' use_tucker: 1x1 down, a rank x rank kxk core with the base's stride and padding, 1x1 up.
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_mid = nn.Conv2d(rank, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Conv2d):
            # A kxk base gets a kxk down with its stride and padding, so up(down(x)) has its shape.
            self.lora_down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        # A zero `up` makes the untrained network an exact no-op.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))  # after up, as LyCORIS draws it
        self.register_alpha(alpha, rank)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """The rank activations (through the Tucker core when there is one)."""
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        return h if self.lora_mid is None else self.lora_mid(h)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.low_rank(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        dropped = self.dropped_low_rank(x)
        if dropped is None:
            return out
        h, scale = dropped
        return out + (self.lora_up(h) * (self.multiplier * scale)).to(out.dtype)

    def dropped_low_rank(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """The rank activations after this step's dropouts, and the scale they take (None: module
        dropout leaves the whole update out). Drawn after the base forward, in kohya's order."""
        if self.skip_module(self.module_dropout):
            return None
        h = self.low_rank(x)
        scale = self.scale
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            h = h * self._rank_mask(h)
            scale = scale / (1.0 - self.rank_dropout)  # keeps the expected update
        return h, scale

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        """One keep/drop draw per sample and rank; broadcast over tokens / pixels."""
        keep = (torch.rand(h.shape[0], self.rank, device=h.device) > self.rank_dropout).to(h.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            return keep[:, :, None, None]
        return keep.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank)

    def weight_delta(self, scaled: bool = True) -> torch.Tensor:
        """The update as a [out, in*k*k] matrix (without the multiplier; scaled=False: nor alpha / rank)."""
        up = self.lora_up.weight.flatten(1)
        down = self.lora_down.weight.flatten(1)
        if self.lora_mid is None:
            product = up @ down
        else:  # delta[o, i, h, w] = sum_ab up[o, a] mid[a, b, h, w] down[b, i], LyCORIS' rebuild_tucker
            product = torch.einsum("oa,abhw,bi->oihw", up, self.lora_mid.weight, down).flatten(1)
        return product * self.scale if scaled else product

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[bool, float]:
        """Scale up and down by sqrt(ratio) so ||delta W|| <= max_norm; returns (scaled, new norm)."""
        norm = self.weight_delta().norm()
        ratio = max_norm_ratio(norm, max_norm)
        scaled = bool(ratio < 1)
        if scaled:
            self.lora_down.weight.mul_(ratio.sqrt())
            self.lora_up.weight.mul_(ratio.sqrt())
        return scaled, float(norm * ratio)


class LoRANetwork(nn.Module):
    """All network modules of one model, keyed by their kohya names."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.loras = nn.ModuleDict(modules)

    @classmethod
    def create(
        cls,
        unet: nn.Module | None,
        text_encoder: nn.Module | None,
        rank: int,
        alpha: float,
        ranks: dict[str, int] | None = None,
        alphas: dict[str, float] | None = None,
    ) -> "LoRANetwork":
        """Plain kohya LoRA for `unet` and/or `text_encoder` (None = not trained).

        `ranks` / `alphas` override the rank and alpha per module name (used when
        starting from an existing file). Other kinds: atelier.network.factory.
        """
        ranks, alphas = ranks or {}, alphas or {}
        modules: dict[str, nn.Module] = {}
        for target in iter_targets(unet, text_encoder):
            r = ranks.get(target.lora_name, rank)
            a = alphas.get(target.lora_name, alpha)
            modules[target.lora_name] = LoRAModule(target.lora_name, target.module, r, a)
        network = cls(modules)
        network.log_counts("LoRA", unet is not None, text_encoder is not None)
        return network

    def log_counts(self, kind: str, unet: bool, text_encoder: bool) -> None:
        # The same lines as sd-scripts, which users grep for.
        if text_encoder:
            log.info("create %s for Text Encoder: %d modules.", kind, self.count(TEXT_ENCODER_PREFIX))
        if unet:
            log.info("create %s for U-Net: %d modules.", kind, self.count(UNET_PREFIX))

    def count(self, prefix: str) -> int:
        return sum(1 for name in self.loras if belongs_to(name, prefix))

    def apply_to(self) -> None:
        for module in self.loras.values():
            module.apply_to()

    def restore(self) -> None:
        for module in self.loras.values():
            module.restore()

    def parameters_of(self, prefix: ParamSelect, up: bool | None = None) -> list[nn.Parameter]:
        """The parameters of the modules under `prefix` (or named in it: a UNet block's); up=True: only
        their up (B) matrices, up=False: all but those (LoRA+ gives the up matrices a learning rate of their own)."""
        chosen = (lambda name: belongs_to(name, prefix)) if isinstance(prefix, str) else set(prefix).__contains__
        return [p for name, m in self.loras.items() if chosen(name)
                for key, p in m.named_parameters() if up is None or key.startswith(UP_WEIGHTS) == up]  # fmt: skip

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as the kohya file stores them (LoRA: lora_down/lora_up weights and alpha)."""
        return {
            f"{name}.{key}": value.detach()
            for name, module in self.loras.items()
            for key, value in module.state_dict().items()
        }

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy weights from a kohya file; the module set and shapes must match exactly."""
        expected = set(self.kohya_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"network.weights={source} does not fit this model: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
                f"(e.g. {unexpected[:3]}). Was it trained on another base model, with another "
                "network.module, or with train_unet_only / train_text_encoder_only set differently?"
            )
        for name, module in self.loras.items():
            own = {key[len(name) + 1 :]: value for key, value in state.items() if key.split(".", 1)[0] == name}
            try:
                with torch.no_grad():
                    module.load_state_dict(own, strict=True)
            except RuntimeError as error:
                raise ValueError(
                    f"network.weights={source}: module {name} has other shapes than this network builds "
                    f"({str(error).splitlines()[-1].strip()}). For LoKr, set network.factor to the "
                    "file's factor."
                ) from error

    def apply_max_norm(self, max_norm: float) -> dict[str, float]:
        """kohya's scale_weight_norms on every module; the numbers sd-scripts logs."""
        scaled, norms = 0, []
        for module in self.loras.values():
            result = module.apply_max_norm(max_norm)
            if result is None or result[1] is None:  # (IA)^3 has no update norm to bound
                continue
            scaled += int(bool(result[0]))
            norms.append(float(result[1]))
        if not norms:
            return {"max_norm/keys_scaled": 0.0}
        return {
            "max_norm/keys_scaled": float(scaled),
            "max_norm/average_key_norm": sum(norms) / len(norms),
            "max_norm/max_key_norm": max(norms),
        }


def build_module(spec: NetworkSpec, target: TargetLayer, dim: int, alpha: float, options: dict[str, Any]) -> LoRAModule:
    """The `lora` and `locon` kinds' builder (atelier.config.network_kinds); DoRA with network.dora_wd."""
    if spec.dora_wd:
        from atelier.network.dora import DoRAModule  # it subclasses LoRAModule: imported when used

        return DoRAModule(target.lora_name, target.module, dim, alpha, spec.rank_dropout, spec.module_dropout,
                          tucker=spec.use_tucker)  # fmt: skip
    return LoRAModule(target.lora_name, target.module, dim, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout,
                      tucker=spec.use_tucker)  # fmt: skip
