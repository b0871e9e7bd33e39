"""K LoRA configs trained fused (atelier.fused, one UNet call per step) vs one after another.

    python benchmarks/bench_fused.py --label tiny-fused --ks 3 4 5 6 7 8 --steps 10 -- \
        training.train_batch_size=2

Both modes run in this process on the same configs (lane i: AdamW / Lion / AdamW with
other dims, learning rates and seeds, unet-only), with the in-process sweep's reuse of the
base model and latents on (atelier.runtime.reuse), so "sequential" is what a basic-launcher
sweep of the K configs costs today. Reported per K: wall seconds of all K runs, seconds in
training steps (sum over runs of summary.train_seconds; fused: the fused steps), and the
speed-ups. Extra overrides after `--` go to every config. Figures go to stdout and to
benchmarks/results/<label>-<time>.json, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from atelier.utils.atomic import write_text  # noqa: E402

LANE_VARIANTS = [
    ["optimizer=adamw", "network.dim=4", "network.alpha=2", "optimizer.learning_rate=1e-3"],
    ["optimizer=lion", "network.dim=8", "network.alpha=4", "optimizer.learning_rate=1e-4"],
    ["optimizer=adamw", "network.dim=2", "network.alpha=1", "optimizer.learning_rate=5e-4"],
]
COMMON = ["network.train_unet_only=true", "sampling.sample_every_n_epochs=null", "sampling.limit=1", "sampling.steps=2"]


def lane_overrides(i: int, steps: int, extra: list[str]) -> list[str]:
    return [*COMMON, f"training.max_train_steps={steps}", f"training.seed={100 + i}",
            *LANE_VARIANTS[i % len(LANE_VARIANTS)], *extra]  # fmt: skip


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import atelier.config

    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def sequential(k: int, steps: int, extra: list[str], root: Path) -> dict:
    from atelier.loop.run import run_training

    tic, in_steps = time.perf_counter(), 0.0
    for i in range(k):
        reset_accelerate()
        run_dir = root / f"seq{k}-{i}"
        run_dir.mkdir(parents=True)
        summary = run_training(compose(lane_overrides(i, steps, extra)), run_dir)
        in_steps += summary["seconds_per_step"] * summary["steps"]
    return {"wall_s": time.perf_counter() - tic, "steps_s": in_steps}


def fused(k: int, steps: int, extra: list[str], root: Path) -> dict:
    from atelier.fused.trainer import FusedTrainer

    reset_accelerate()
    cfgs = [compose(lane_overrides(i, steps, extra)) for i in range(k)]
    dirs = [root / f"fused{k}" / f"lane{i}" for i in range(k)]
    for d in dirs:
        d.mkdir(parents=True)
    tic = time.perf_counter()
    trainer = FusedTrainer(cfgs, dirs)
    summaries = trainer.train()
    wall = time.perf_counter() - tic
    assert all(s["status"] == "completed" for s in summaries), [s["reason"] for s in summaries]
    return {"wall_s": wall, "steps_s": sum(trainer.step_seconds), "fused_steps": trainer.fused_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="tiny-fused")
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per config")
    parser.add_argument("extra", nargs="*", help="overrides for every config (after --)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    import torch

    from atelier.runtime import reuse

    reuse._FORCE = True  # both modes: the in-process sweep's base-model and latent reuse
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Warm-up: imports, the tiny model on disk, the latent store.
        sequential(1, 1, args.extra, root / "warm")
        for k in args.ks:
            seq = sequential(k, args.steps, args.extra, root)
            fus = fused(k, args.steps, args.extra, root)
            row = {
                "k": k,
                "sequential_wall_s": round(seq["wall_s"], 3),
                "fused_wall_s": round(fus["wall_s"], 3),
                "wall_speedup": round(seq["wall_s"] / fus["wall_s"], 3),
                "sequential_steps_s": round(seq["steps_s"], 3),
                "fused_steps_s": round(fus["steps_s"], 3),
                "steps_speedup": round(seq["steps_s"] / fus["steps_s"], 3),
                "fused_s_per_step": round(fus["steps_s"] / fus["fused_steps"], 4),
                "loadavg": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"K={k}: wall {row['sequential_wall_s']:.2f} s sequential vs {row['fused_wall_s']:.2f} s fused "
                f"(x{row['wall_speedup']:.2f}); steps {row['sequential_steps_s']:.2f} s vs "
                f"{row['fused_steps_s']:.2f} s (x{row['steps_speedup']:.2f}); "
                f"{row['fused_s_per_step']:.3f} s per fused step; load {row['loadavg']:.2f}",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{args.label}-{stamp}.json"
    write_text(out, json.dumps({
        "label": args.label,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "steps_per_config": args.steps,
        "extra_overrides": args.extra,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
