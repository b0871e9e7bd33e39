"""`atelier resize`: lower the rank of a kohya LoRA by SVD, per module.

For each module the update it applies, W = up @ down * alpha / rank, is factored
exactly as W = U S Vh (through QR of the two factors, so only a rank x rank SVD
is computed), and the top k singular values are kept:

    new up   = U_k * sqrt(S_k)          (conv: [out, k, 1, 1])
    new down = sqrt(S_k) * Vh_k         (conv: [k, in, kh, kw])
    new alpha = k * old_alpha / old_rank

so up @ down * alpha / k = U_k S_k Vh_k * old_alpha / old_rank: the truncated
update exactly, with the file's alpha / rank ratio (what training with the
resized file would use) unchanged. sqrt(S) goes to both sides (sd-scripts puts S
into up): loaders only use the product, and balanced factors keep the same
range in fp16 and train like the originals.

k is --rank, or chosen per module (--dynamic, capped by --rank if given):
  sv_ratio X       keep singular values s > s_max / X
  sv_cumulative X  smallest k with sum(S_k) / sum(S) >= X
  sv_fro X         smallest k with sqrt(sum(S_k^2) / sum(S^2)) >= X   (retained Frobenius norm)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from atelier.tools.common import LoRAFactors, ToolError, check_output, load_lora_file, precision_for

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


@dataclass
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    retained: float  # Frobenius norm fraction kept, sqrt(sum S_k^2 / sum S^2)
    kept_sq: float  # sum S_k^2 (for the overall fraction)
    total_sq: float  # sum S^2


def choose_rank(singular: torch.Tensor, rank: int | None, method: str | None, param: float | None) -> int:
    """How many singular values to keep (at least 1, at most len(singular))."""
    s = singular.to(torch.float64)
    n = len(s)
    if method is None:
        k = n if rank is None else rank
    elif float(s.sum()) <= 0:
        k = 1
    elif method == "sv_ratio":
        k = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        k = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor([param], dtype=torch.float64))) + 1
    elif method == "sv_fro":
        fraction = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
        k = int(torch.searchsorted(fraction, torch.tensor([param], dtype=torch.float64))) + 1
    else:
        raise ToolError(f"unknown --dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    if method is not None and rank is not None:
        k = min(k, rank)
    return max(1, min(k, n))


def factor_svd(module: LoRAFactors, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, r'], S [r'], Vh [r', in*kh*kw] of up @ down (without the alpha scale), r' <= rank."""
    up = module.up2d(torch.float64).to(device)
    down = module.down2d(torch.float64).to(device)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ToolError(f"{module.name} holds NaN or Inf weights; see `atelier check`")
    q_up, r_up = torch.linalg.qr(up)  # up = Qu Ru
    q_down, r_down = torch.linalg.qr(down.T)  # down^T = Qd Rd
    u_small, s, vh_small = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u_small, s, (q_down @ vh_small.T).T


def resize_module(
    module: LoRAFactors, rank: int | None, method: str | None, param: float | None, device: str = "cpu"
) -> tuple[LoRAFactors, ModuleResize]:
    u, s, vh = factor_svd(module, device)
    k = choose_rank(s, rank, method, param)
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(module.up.shape[0], k, *module.up.shape[2:])
    down = (root[:, None] * vh[:k]).reshape(k, *module.down.shape[1:])
    total_sq, kept_sq = float((s * s).sum()), float((s[:k] * s[:k]).sum())
    retained = math.sqrt(kept_sq / total_sq) if total_sq > 0 else 1.0
    resized = LoRAFactors(module.name, down.float().cpu(), up.float().cpu(), module.scale * k)
    return resized, ModuleResize(module.name, module.rank, k, retained, kept_sq, total_sq)


def resize_lora(
    modules: dict[str, LoRAFactors],
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    device: str = "cpu",
) -> tuple[dict[str, LoRAFactors], list[ModuleResize]]:
    if method is None and rank is None:
        raise ToolError("give --rank N, or --dynamic METHOD --param X")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank must be >= 1, got {rank}")
    if method is not None:
        if param is None:
            raise ToolError(f"--dynamic {method} needs --param X")
        if method == "sv_ratio" and not param >= 1:
            raise ToolError(f"--param for sv_ratio is a ratio s_max / s_min >= 1, got {param}")
        if method in ("sv_cumulative", "sv_fro") and not 0 < param <= 1:
            raise ToolError(f"--param for {method} is a fraction in (0, 1], got {param}")
    resized, report = {}, []
    for name, module in modules.items():
        resized[name], info = resize_module(module, rank, method, param, device)
        report.append(info)
    return resized, report


def resized_metadata(
    metadata: dict[str, str],
    modules: dict[str, LoRAFactors],
    report: list[ModuleResize],
    source: Path,
    rank: int | None,
    method: str | None,
    param: float | None,
) -> dict[str, str]:
    """The input's metadata with dim / alpha updated and the resize noted (sshs_* redone by save_lora)."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    ranks = {info.new_rank for info in report}
    alphas = {round(m.alpha, 6) for m in modules.values()}
    old_dim = metadata.get("ss_network_dim", str(max(info.old_rank for info in report)))
    dynamic = method is not None
    meta["ss_network_dim"] = "Dynamic" if dynamic or len(ranks) > 1 else str(ranks.pop())
    meta["ss_network_alpha"] = "Dynamic" if dynamic or len(alphas) > 1 else str(float(alphas.pop()))
    if dynamic:
        how = f"a rank per module by {method} {param}" + (f" (at most {rank})" if rank else "")
    else:
        how = f"rank {rank}"
    retained = overall_retained(report)
    note = f"resized by atelier from {source.name} (dim {old_dim}) to {how}; retained Frobenius norm {retained:.4f}"
    previous = metadata.get("ss_training_comment")
    meta["ss_training_comment"] = f"{note}; {previous}" if previous and previous != "None" else note
    return meta


def overall_retained(report: list[ModuleResize]) -> float:
    total = sum(info.total_sq for info in report)
    return math.sqrt(sum(info.kept_sq for info in report) / total) if total > 0 else 1.0


def format_report(report: list[ModuleResize]) -> str:
    width = max([len("module"), *(len(info.name) for info in report)])
    lines = [f"{'module':<{width}}  rank  ->  new  retained"]
    for info in report:
        lines.append(f"{info.name:<{width}}  {info.old_rank:>4}  ->  {info.new_rank:>3}  {info.retained:8.4f}")
    old = sum(info.old_rank for info in report)
    new = sum(info.new_rank for info in report)
    lines.append(
        f"{len(report)} modules, total rank {old} -> {new}; retained Frobenius norm overall "
        f"{overall_retained(report):.4f}, lowest {min(info.retained for info in report):.4f}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from atelier.network.lora_file import save_lora

    source = Path(args.input)
    out = check_output(args.output, args.force, [source])
    modules, metadata, dtype = load_lora_file(source)
    if args.device != "cpu" and not torch.cuda.is_available() and args.device.startswith("cuda"):
        raise ToolError(f"--device {args.device}: no CUDA device is available")
    resized, report = resize_lora(modules, args.rank, args.dynamic, args.param, args.device)
    state = {key: value for module in resized.values() for key, value in module.to_state().items()}
    meta = resized_metadata(metadata, resized, report, source, args.rank, args.dynamic, args.param)
    save_lora(out, state, meta, precision_for(dtype, args.save_precision))
    print(format_report(report))
    print(f"wrote {out}")
    return 0
