"""`atelier check`: per-module health of a LoRA file (zero, NaN / Inf modules).

For each module: the shapes of its tensors, rank, alpha, the norm of the update
it applies ||up @ down * alpha / rank||_F (computed from rank x rank Gram
matrices, never the full product), mean |w| of down and up. Flags:
  ZERO     the update is exactly zero (e.g. up never trained, a dead module)
  NaN/Inf  a tensor holds NaN or Inf: the file breaks every image it touches
Modules of other kinds (LyCORIS LoHa / LoKr, DoRA ...) are checked for NaN / Inf only.
Exit status 1 when any module has NaN / Inf, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from atelier.tools.common import (
    ALPHA, DOWN, UP, LoRAFactors, ToolError, existing_file, module_names, read_lora, variant_tensor,
)  # fmt: skip


@dataclass
class ModuleCheck:
    name: str
    kind: str  # "lora" or "other"
    shapes: dict[str, list[int]]
    rank: int | None
    alpha: float | None
    norm: float | None
    mean_abs_down: float | None
    mean_abs_up: float | None
    mean_abs: float  # over all the module's tensors
    flags: list[str]


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.float()).all())


def check_modules(state: dict[str, torch.Tensor]) -> list[ModuleCheck]:
    checks = []
    for name in module_names(state):
        tensors = {key[len(name) + 1 :]: value for key, value in state.items() if key.split(".", 1)[0] == name}
        shapes = {suffix: list(t.shape) for suffix, t in tensors.items()}
        flags = [] if all(_finite(t) for t in tensors.values()) else ["NaN/Inf"]
        values = [t.float().abs().flatten() for t in tensors.values() if t.numel() and t.ndim > 0]
        mean_abs = float(torch.cat(values).mean()) if values else 0.0
        down, up = state.get(name + DOWN), state.get(name + UP)
        # DoRA / Tucker modules: up @ down is not their update (checked for NaN / Inf only).
        if down is None or up is None or variant_tensor(state, name):
            checks.append(ModuleCheck(name, "other", shapes, None, None, None, None, None, mean_abs, flags))
            continue
        alpha_tensor = state.get(name + ALPHA)
        alpha = float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0])
        module = LoRAFactors(name, down, up, alpha)
        norm = module.delta_norm() if not flags else None
        if not flags and norm == 0:
            flags.append("ZERO")
        checks.append(
            ModuleCheck(
                name, "lora", shapes, module.rank, alpha, norm,
                float(down.float().abs().mean()), float(up.float().abs().mean()), mean_abs, flags,
            )  # fmt: skip
        )
    return checks


def _shape(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _num(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None else format(value, spec)


def format_table(checks: list[ModuleCheck], flagged_only: bool = False) -> str:
    rows = [
        (
            c.name,
            _shape(c.shapes.get("lora_down.weight")),
            _shape(c.shapes.get("lora_up.weight")),
            "-" if c.rank is None else str(c.rank),
            _num(c.alpha, "g"),
            _num(c.norm),
            _num(c.mean_abs_down),
            _num(c.mean_abs_up),
            " ".join(c.flags) or ("(not LoRA: " + ", ".join(sorted(c.shapes)) + ")" if c.kind == "other" else ""),
        )
        for c in checks
        if c.flags or not flagged_only
    ]
    header = ("module", "down", "up", "rank", "alpha", "norm", "mean|down|", "mean|up|", "flags")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def summary(checks: list[ModuleCheck]) -> str:
    nan = sum("NaN/Inf" in c.flags for c in checks)
    zero = sum("ZERO" in c.flags for c in checks)
    other = sum(c.kind == "other" for c in checks)
    ranks = sorted({c.rank for c in checks if c.rank is not None})
    parts = [f"{len(checks)} modules", f"rank {'/'.join(map(str, ranks)) or '-'}", f"{zero} ZERO", f"{nan} NaN/Inf"]
    if other:
        parts.append(f"{other} not LoRA (NaN/Inf checked only)")
    verdict = "FAIL: NaN/Inf weights" if nan else ("ok (zero modules apply no change)" if zero else "ok")
    return ", ".join(parts) + f": {verdict}"


def _jsonable(value):
    """NaN / Inf as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def run(args: argparse.Namespace) -> int:
    path = existing_file(Path(args.lora), "LoRA file")
    state, _ = read_lora(path)
    if not state:
        raise ToolError(f"'{path}' holds no tensors")
    checks = check_modules(state)
    if args.json:
        modules = [{k: _jsonable(v) for k, v in asdict(c).items()} for c in checks]
        print(json.dumps({"file": str(path), "modules": modules}, indent=1))
    else:
        print(format_table(checks, args.flagged_only))
        print(summary(checks))
    return 1 if any("NaN/Inf" in c.flags for c in checks) else 0
