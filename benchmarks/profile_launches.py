"""How many operations one LoRA training step launches: the base UNet, a LoRA on it, and K
LoRA lanes fused on one base (hydra/launcher=fused), counted with torch.profiler.

    python benchmarks/profile_launches.py --arch sd15 --lanes 8
    python benchmarks/profile_launches.py --arch tiny-sd15 --device cuda --out /tmp/prof

Why: on an H200 an SD1.5 512 px LoRA step at batch 4 took less time than at batch 1
(BENCHMARKS.md, "GPU check"): the GPU waits for the host to issue kernels, so the figure
that matters is the number of launches per step, which this script counts. On a CPU it
counts aten operators (each is one or more kernel launches on a GPU); with --device cuda
it also counts CUDA kernels and reports host and device time per step.

The latent is small (--latent 8: 64 px) because the counts do not depend on the image size;
the times printed on a CPU are not GPU figures. The result goes to a JSON file (--out) and
is printed as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier.config.schema import NetworkConfig  # noqa: E402
from atelier.fused.slots import LaneRouter, install_slots  # noqa: E402
from atelier.models.architectures import build_unet, unet_config  # noqa: E402
from atelier.network.factory import build_network  # noqa: E402
from atelier.utils.atomic import write_text  # noqa: E402


def _inputs(arch: str, batch: int, latent: int, device: torch.device) -> dict:
    cfg = unet_config(arch)
    tokens = 77
    kwargs = {
        "sample": torch.randn(batch, cfg["in_channels"], latent, latent, device=device),
        "timestep": torch.randint(0, 1000, (batch,), device=device),
        "encoder_hidden_states": torch.randn(batch, tokens, cfg["cross_attention_dim"], device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeddings + size ids
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                       "time_ids": torch.randn(batch, 6, device=device)}
    return kwargs


def _networks(unet: torch.nn.Module, count: int, dim: int, device: torch.device) -> list:
    nets = []
    for _ in range(count):
        net = build_network(OmegaConf.structured(NetworkConfig(dim=dim, alpha=dim / 2, train_unet_only=True)),
                            unet, None)
        nets.append(net.to(device))
    return nets


def measure(step, device: torch.device, repeats: int) -> dict:
    """Operators (and CUDA kernels) per step, and time per step, over `repeats` steps."""
    step()  # warm-up: lazy inits, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    events = prof.events()
    # Outermost aten ops only: an op called by another (aten::linear -> aten::addmm) is one
    # dispatch, so counting nested ones would double-count. Backward ops sit under autograd
    # engine events, not under an aten op, so they count.
    top = [e for e in events if e.name.startswith("aten::") and not _inside_aten_op(e)]
    result = {"aten_ops_per_step": round(len(top) / repeats), "seconds_per_step": round(seconds, 4)}
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        result["cuda_kernels_per_step"] = round(len(kernels) / repeats)
        result["cuda_busy_fraction"] = round(sum(e.device_time for e in kernels) / 1e6 / (seconds * repeats), 3)
    return result


def _inside_aten_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profile_cases(arch: str, lanes: int, dim: int, latent: int, device: torch.device,
                  repeats: int) -> tuple[list[dict], int]:
    """The four cases' rows, and how many layers a LoRA patches."""
    torch.manual_seed(0)
    unet = build_unet(arch).to(device).requires_grad_(False)
    rows = []

    def run(label: str, batch: int, forward, params) -> None:
        inputs = _inputs(arch, batch, latent, device)

        def step() -> None:
            out = forward(inputs)
            out.float().pow(2).mean().backward()
            for p in params:
                p.grad = None

        rows.append({"case": label, "batch": batch, **measure(step, device, repeats)})
        print(f"  {label:<34} {rows[-1]}", flush=True)

    # The base alone: only a leaf input needs a gradient, so the backward runs through the UNet.
    def base_forward(inputs: dict) -> torch.Tensor:
        sample = inputs["sample"].requires_grad_(True)
        return unet(**{**inputs, "sample": sample}).sample

    run("base UNet (no adapter), batch 1", 1, base_forward, [])
    (solo,) = _networks(unet, 1, dim, device)
    solo.apply_to()
    run(f"LoRA dim {dim}, batch 1", 1, lambda inputs: unet(**inputs).sample, list(solo.parameters()))
    run(f"LoRA dim {dim}, batch {lanes}", lanes, lambda inputs: unet(**inputs).sample, list(solo.parameters()))
    solo.restore()

    networks = _networks(unet, lanes, dim, device)
    router = LaneRouter()
    slots = install_slots(networks, router)

    def fused_forward(inputs: dict) -> torch.Tensor:
        with router.fused([(lane, 1) for lane in range(lanes)]):
            return unet(**inputs).sample

    params = [p for net in networks for p in net.parameters()]
    run(f"fused: {lanes} LoRA lanes x batch 1", lanes, fused_forward, params)
    for slot in slots:
        slot.restore()
    return rows, len(solo.loras)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", help="a built-in architecture: tiny-sd15, tiny-sdxl, sd15, sdxl (default %(default)s)")
    parser.add_argument("--lanes", type=int, default=8, help="fused lanes (default %(default)s)")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--latent", type=int, default=8, help="latent side (8 = 64 px)")
    parser.add_argument("--repeats", type=int, default=2, help="profiled steps per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"profile_launches: {args.arch}, {args.lanes} lanes, dim {args.dim}, latent {args.latent}, {device}")
    rows, patched = profile_cases(args.arch, args.lanes, args.dim, args.latent, device, args.repeats)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **vars(args),
              "out": str(args.out), "patched_layers": patched, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"launches-{args.arch}-{device.type}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
