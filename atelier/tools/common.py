"""Shared by the tools: errors, output-file checks, kohya LoRA factors and their math."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from atelier.config.schema import SavePrecision
from atelier.errors import UserError
from atelier.config.network_kinds import VARIANT_TENSORS, lycoris_markers

if TYPE_CHECKING:
    from atelier.families import ModelFamily


class ToolError(UserError, Exception):
    """A tool cannot do what was asked; the message says why and what to do (exit 2)."""


def fail_cleanly(name: str, func: Callable[[], int]) -> int:
    """Run a tool; a ToolError (or a model / file error) becomes one line on stderr and exit 2."""
    from atelier.models.load_errors import ModelLoadError

    try:
        return func()
    except (ToolError, ModelLoadError, FileNotFoundError) as error:
        print(f"atelier {name}: error: {error}", file=sys.stderr)
        return 2


def check_output(path: str | os.PathLike, force: bool, inputs: list[Path] | tuple[Path, ...] = ()) -> Path:
    """The output path, unless it exists (without --force) or is one of the inputs."""
    path = Path(path)
    resolved = path.expanduser().resolve()
    if any(resolved == Path(i).expanduser().resolve() for i in inputs):
        raise ToolError(f"the output '{path}' is also an input; write to another file")
    if path.exists() and not force:
        raise ToolError(f"'{path}' exists; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise ToolError(f"'{path}' is a folder; give a file name")
    return path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{what} '{path}' does not exist" if not path.exists() else f"{what} '{path}' is not a file")
    return path


# --- kohya LoRA factors ------------------------------------------------------------

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class LoRAFactors:
    """One module of a kohya LoRA: delta W = up @ down * alpha / rank (conv: reshaped)."""

    name: str
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim < 2 or self.up.ndim < 2 or self.up.shape[1] != self.down.shape[0]:
            raise ToolError(
                f"{self.name} has lora_down {tuple(self.down.shape)} and lora_up {tuple(self.up.shape)}: their ranks "
                "disagree, so the file is damaged or not a kohya LoRA"
            )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def down2d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.down.reshape(self.rank, -1).to(dtype)

    def up2d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.up.reshape(self.up.shape[0], self.rank).to(dtype)

    def delta2d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in * kh * kw]: the update of the base weight, flattened."""
        return self.up2d(dtype) @ self.down2d(dtype) * self.scale

    def weight_shape(self) -> tuple[int, ...]:
        """The base layer's weight shape ([out, in] or [out, in, kh, kw])."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta2d(dtype).reshape(self.weight_shape())

    def delta_norm(self) -> float:
        """||up @ down * scale||_F from two r x r Gram matrices (no out x in product)."""
        up, down = self.up2d(torch.float64), self.down2d(torch.float64)
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp_min(0)
        return float(squared.sqrt()) * abs(self.scale)

    def to_state(self) -> dict[str, torch.Tensor]:
        return {
            self.name + DOWN: self.down.contiguous(),
            self.name + UP: self.up.contiguous(),
            self.name + ALPHA: torch.tensor(float(self.alpha)),
        }


def module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names (the part before the first '.') in file order."""
    return list(dict.fromkeys(key.split(".", 1)[0] for key in state))


def split_lora(state: dict[str, torch.Tensor], source: str) -> dict[str, LoRAFactors]:
    """The kohya LoRA modules of a state dict; anything else (LyCORIS, ...) is an error."""
    modules: dict[str, LoRAFactors] = {}
    for name in module_names(state):
        down, up = state.get(name + DOWN), state.get(name + UP)
        if down is None or up is None:
            keys = sorted(k for k in state if k.split(".", 1)[0] == name)
            markers = lycoris_markers()
            lycoris = any(marker in key for key in keys for marker in markers)
            kind = "a LyCORIS (LoHa/LoKr/...) module" if lycoris else "not a LoRA module"
            raise ToolError(
                f"{source}: {name} is {kind} ({', '.join(keys[:4])}); this tool handles kohya LoRA "
                "files (lora_down / lora_up / alpha) only"
            )
        variant = variant_tensor(state, name)
        if variant:  # DoRA's magnitudes / a Tucker core: up @ down alone is not the module's update
            raise ToolError(
                f"{source}: {name} holds {variant} (a LyCORIS LoRA trained with network.{variant_key(variant)}); "
                "this tool handles plain kohya LoRA files (lora_down / lora_up / alpha) only"
            )
        alpha = state.get(name + ALPHA)
        modules[name] = LoRAFactors(name, down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    if not modules:
        raise ToolError(f"{source}: no LoRA modules in the file")
    return modules


def variant_tensor(state: dict[str, torch.Tensor], name: str) -> str | None:
    """The first tensor of module `name` that a variant key (DoRA, ...) adds to plain LoRA, or None."""
    return next((t for tensors in VARIANT_TENSORS.values() for t in tensors if f"{name}.{t}" in state), None)


def variant_key(tensor: str) -> str:
    return next(key for key, tensors in VARIANT_TENSORS.items() if tensor in tensors)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors file's tensors and metadata, its damage said in one ToolError."""
    from safetensors import SafetensorError

    from atelier.network.lora_file import LoRAIntegrityError, load_lora

    try:
        return load_lora(path)
    except SafetensorError as error:
        raise ToolError(f"'{path}' is not a readable .safetensors file ({error})") from error
    except LoRAIntegrityError as error:
        raise ToolError(str(error)) from None


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, LoRAFactors], dict[str, str], torch.dtype]:
    """Modules, metadata and storage dtype of a kohya LoRA file."""
    path = existing_file(path, "LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"'{path}' is not a .safetensors file")
    state, metadata = read_lora(path)
    modules = split_lora(state, str(path))
    return modules, metadata, storage_dtype(m.down.dtype for m in modules.values())


def require_finite(modules: dict[str, LoRAFactors], source: str | os.PathLike) -> None:
    """A LoRA with NaN or Inf weights would spread them into whatever it is merged with."""
    for module in modules.values():
        if not (torch.isfinite(module.up).all() and torch.isfinite(module.down).all()):
            raise ToolError(f"{source}: {module.name} holds NaN or Inf weights; see `atelier check {source}`")


def storage_dtype(dtypes: Iterator[torch.dtype] | list[torch.dtype]) -> torch.dtype:
    dtypes = list(dtypes)
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


PRECISION_OF_DTYPE = {
    torch.float32: SavePrecision.float,
    torch.float16: SavePrecision.fp16,
    torch.bfloat16: SavePrecision.bf16,
}


def precision_for(dtype: torch.dtype, requested: str | None) -> SavePrecision:
    """--save-precision when given, else the precision the input was stored in."""
    if requested:
        return SavePrecision(requested)
    return PRECISION_OF_DTYPE.get(dtype, SavePrecision.float)


def format_number(value: float) -> str:
    """A metadata string for a number: '16' for 16.0, else repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def lora_family(metadata: dict[str, str]) -> ModelFamily | None:
    """The model family a LoRA file was trained on, from its ss_base_model_version (train_util's
    names: sd_v1, sd_v2_v, sdxl_base_v1-0, flux1; "<version>_v" for a v-prediction variant sd-scripts
    has no name for), or None when the file does not say or names no family Atelier knows."""
    from atelier.families import FAMILIES

    name = metadata.get("ss_base_model_version")
    for family in FAMILIES.values():
        if name in {family.base_model_version(False), family.base_model_version(True)}:
            return family
    return None
