"""A grid trained to the end vs the same grid with early stopping (hydra.sweeper.prune=true).

    python benchmarks/bench_pruning.py                   # 9 configs, tiny model, 2 rounds
    python benchmarks/bench_pruning.py --rounds 1 --epochs 2 --label quick

Both sweeps run through train.py as a user runs them (the basic launcher: one job after
another in one process, as on one GPU), with the same seeds. Per sweep: wall time, optimizer
steps trained (summed over the jobs), jobs pruned, and the best objective (the lowest
best_validation_loss among completed jobs) with the config that reached it. Rounds alternate
the order (grid, pruned, pruned, grid, ...) so a slow drift of the machine does not favour
one side. Figures go to stdout, to benchmarks/results/<label>-<time>.json, and to a section
of BENCHMARKS.md with the machine and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier.utils.atomic import write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
# 3 x 3 configs, in the order a user would write them; the demo dataset holds out 1 in 4
# images for the validation loss the pruner compares.
GRID = ["network.dim=4,8,16", "optimizer.learning_rate=1e-4,1e-3,5e-3"]
COMMON = ["dataset.validation_split=0.25", "training.train_batch_size=4", "sampling.limit=0",
          "sampling.sample_every_n_epochs=null", "output.save_every_n_epochs=null"]  # fmt: skip
PRUNE = ["hydra.sweeper.prune=true", "hydra.sweeper.pruner.type=median", "hydra.sweeper.pruner.n_startup_trials=2"]


def run_sweep(sweep_dir: Path, epochs: int, prune: bool) -> dict:
    command = [sys.executable, str(REPO / "train.py"), "-m", *GRID, *COMMON, f"training.max_train_epochs={epochs}",
               *(PRUNE if prune else []), f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    load = os.getloadavg()[0]
    tic = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    jobs = {}
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        jobs[summary_path.parent.name] = {k: summary.get(k) for k in ("status", "steps", "best_validation_loss")}
    completed = {name: j for name, j in jobs.items() if j["status"] == "completed"}
    best = min(completed, key=lambda name: completed[name]["best_validation_loss"])
    return {
        "prune": prune,
        "wall_seconds": round(wall, 2),
        "steps": sum(j["steps"] or 0 for j in jobs.values()),
        "pruned": sum(j["status"] == "pruned" for j in jobs.values()),
        "best_job": best,
        "best_objective": completed[best]["best_validation_loss"],
        "load_before": round(load, 2),
        "jobs": jobs,
        "command": shlex.join(command[1:]).replace(str(sweep_dir), "<tmp>"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--label", default="prune-grid9-tiny")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for prune in ((False, True) if r % 2 == 0 else (True, False)):
                result = run_sweep(Path(tmp) / f"r{r}-{'prune' if prune else 'grid'}", args.epochs, prune)
                runs.append(result)
                print(f"round {r + 1} {'pruned' if prune else 'grid  '}: {result['wall_seconds']:7.1f} s, "
                      f"{result['steps']} steps, {result['pruned']} pruned, best {result['best_objective']:.5f} "
                      f"({result['best_job']})", flush=True)  # fmt: skip
    grid = [r for r in runs if not r["prune"]]
    pruned = [r for r in runs if r["prune"]]
    figures = {
        "grid_wall_median": statistics.median(r["wall_seconds"] for r in grid),
        "pruned_wall_median": statistics.median(r["wall_seconds"] for r in pruned),
        "grid_steps": grid[0]["steps"],
        "pruned_steps": pruned[0]["steps"],
        "pruned_jobs": pruned[0]["pruned"],
        "grid_best": [grid[0]["best_job"], grid[0]["best_objective"]],
        "pruned_best": [pruned[0]["best_job"], pruned[0]["best_objective"]],
    }
    saving = 1 - figures["pruned_wall_median"] / figures["grid_wall_median"]
    print(f"wall (median): grid {figures['grid_wall_median']:.1f} s, pruned {figures['pruned_wall_median']:.1f} s "
          f"({saving:.0%} less); steps {figures['grid_steps']} -> {figures['pruned_steps']}; best objective "
          f"{figures['grid_best'][1]:.5f} ({figures['grid_best'][0]}) vs {figures['pruned_best'][1]:.5f} "
          f"({figures['pruned_best'][0]})")  # fmt: skip
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    record = {"label": args.label, "time_utc": stamp, "machine": machine, "epochs": args.epochs, "figures": figures,
              "runs": runs}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.label}-{stamp}.json"
    write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
