"""GPU proof in one call: measure what the project claims, on whatever GPU this machine has.

    python benchmarks/gpu/check.py --out DIR            # the real check (a CUDA GPU), ~8 min
    python benchmarks/gpu/check.py --dry --out DIR      # the same rows on tiny models, CPU, 2 steps

Normally started by `bash benchmarks/gpu/check.sh` (which installs the wheels first, see
benchmarks/gpu/README.md). Each row is a real `train.py` run (or `-m` sweep) measured by
benchmarks/bench_train.py; rows run in order of importance, each with its own time limit,
inside one overall budget (--budget), and a row that fails or is skipped says why while the
others go on. After every row DIR/gpu-check.json is rewritten, so a check cut short still
leaves what it measured. At the end DIR/gpu-check.md holds ready-to-paste BENCHMARKS.md
rows: the claims table (one line per claim, with its target) and bench_train's raw rows.

--dry makes no timing claim: it runs every row on the tiny models for 2 steps on the CPU, so
that tests/test_gpu_check.py proves every row still runs (configs, launchers, the harness).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE.parent), str(REPO)]  # bench_train beside this folder; the project's own tree

import bench_train  # noqa: E402

from atelier.utils.atomic import write_text  # noqa: E402

# The seed guides' VRAM target for SD1.5 LoRA training (gradient checkpointing, 8-bit AdamW).
VRAM_TARGET_MB = 8192
# Issue [8]'s targets for hydra/launcher=fused against the sequential sweep.
FUSED_WALL_TARGET = 0.35
FUSED_PEAK_TARGET = 1.5
# Only steps are timed in sweeps too: no samples, checkpoints or state files in between.
SWEEP_QUIET = [*bench_train.QUIET, "output.save_state=false"]


@dataclass(frozen=True)
class Row:
    """One measurement: a train.py run (kind "run") or a `-m` sweep (kind "sweep")."""

    name: str
    kind: str
    overrides: tuple[str, ...]
    what: str  # one line for the summary: what the figure is
    steps: int = 20
    warmup: int = 5
    timeout: float = 150.0  # seconds; the row is stopped past it
    needs: tuple[str, ...] = ()  # importable packages; without them the row is skipped, saying so


@dataclass
class Outcome:
    row: Row
    status: str = "pending"  # ok | failed | skipped
    reason: str | None = None
    result: dict | None = None
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0


def plan(dry: bool) -> list[Row]:
    """The rows, most important first (a check cut short by its budget loses the last ones).

    Full: the real SD1.5 and SDXL architectures with random weights (model=sd15_random /
    sdxl_random, built on the machine, nothing downloaded) at their native resolutions.
    Dry: the same rows on the tiny models at 64 px, 2 steps, eager torch.compile (a CPU has
    no time for inductor), so that only the wiring is proved.
    """
    sd15 = ("model=tiny",) if dry else ("model=sd15_random", "dataset.resolution=512")
    sdxl = ("model=tiny_sdxl",) if dry else ("model=sdxl_random", "dataset.resolution=1024")
    steps, warmup = (2, 0) if dry else (20, 5)
    sweep_steps = 2 if dry else 30
    bf16 = ("training.mixed_precision=bf16", "training.attention=sdpa")
    compile_backend = ("training.dynamo_backend=eager",) if dry else ()
    # Compiling takes the first steps: more of them, and more left out of the timing.
    compile_steps, compile_warmup = (steps, warmup) if dry else (steps + 10, warmup + 5)
    # The 8-config sweep of BENCHMARKS.md (issue [8]), at 512 px and 30 steps on a GPU.
    sweep8 = (
        *sd15, "training.train_batch_size=1", "training.gradient_checkpointing=true", "network.train_unet_only=true",
        *bf16, *SWEEP_QUIET, f"training.max_train_steps={sweep_steps}",
        "network.dim=4,8", "optimizer.learning_rate=1e-4,5e-4", "training.seed=1,2",
    )  # fmt: skip
    scale = 1 if not dry else 0.5  # time limits: a tiny model's process is mostly start-up
    return [
        Row("sd15-512-b1-bf16", "run", (*sd15, "training.train_batch_size=1", *bf16),
            "SD1.5 512 px, batch 1, bf16 autocast + SDPA: s/step", steps, warmup, 150 * scale),
        Row("sd15-512-b4-bf16", "run", (*sd15, "training.train_batch_size=4", *bf16),
            "SD1.5 512 px, batch 4, bf16 autocast + SDPA: s/step", steps, warmup, 150 * scale),
        Row("sd15-512-b1-gc-adamw8bit", "run",
            (*sd15, "training.train_batch_size=1", *bf16, "training.gradient_checkpointing=true", "optimizer=adamw8bit"),
            f"SD1.5 512 px, batch 1, gradient checkpointing + AdamW8bit: peak VRAM (target {VRAM_TARGET_MB} MB)",
            max(steps // 2, 2), min(warmup, 2), 150 * scale, needs=("bitsandbytes",)),
        Row("sweep8-512-sequential", "sweep", ("-m", *sweep8),
            "8-config sweep, 512 px, 30 steps each, default (in-process) launcher: wall time", timeout=240 * scale),
        Row("sweep8-512-fused", "sweep", ("-m", "hydra/launcher=fused", *sweep8),
            f"the same 8 configs with hydra/launcher=fused: wall <= {FUSED_WALL_TARGET}x, peak <= {FUSED_PEAK_TARGET}x",
            timeout=240 * scale),
        Row("sdxl-1024-b1-bf16", "run", (*sdxl, "training.train_batch_size=1", "network.train_unet_only=true", *bf16),
            "SDXL 1024 px, batch 1, bf16 autocast + SDPA: s/step and peak VRAM",
            max(steps // 2, 2), min(warmup, 3), 200 * scale),
        Row("sd15-512-b1-compile", "run", (*sd15, "training.train_batch_size=1", *bf16, "training.torch_compile=true",
                                           *compile_backend),
            "torch.compile (inductor) on SD1.5 512 px batch 1: s/step against sd15-512-b1-bf16",
            compile_steps, compile_warmup, 200 * scale),
        Row("sd15-512-b1-cudagraphs", "run", (*sd15, "training.train_batch_size=1", *bf16, "training.torch_compile=true",
                                              "training.torch_compile_mode=reduce-overhead", *compile_backend),
            "torch.compile mode=reduce-overhead (CUDA graphs) on SD1.5 512 px batch 1: s/step",
            compile_steps, compile_warmup, 200 * scale),
    ]  # fmt: skip


def environment() -> dict:
    """The machine, GPU, driver and library versions every figure is read against."""
    import torch

    info = bench_train.machine()
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = info.get("gpu") or props.name
        info["gpu_memory_mb"] = round(props.total_memory / 2**20)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    for package in ("bitsandbytes", "hydra-core", "lycoris-lora", "kohya-atelier"):
        try:
            info[package] = bench_train.metadata.version(package)
        except bench_train.metadata.PackageNotFoundError:
            info[package] = None
    return info


def measure(row: Row, timeout: float) -> tuple[dict, list[str]]:
    if row.kind == "sweep":
        return bench_train.measure_sweep(list(row.overrides), timeout=timeout)
    return bench_train.measure_run(list(row.overrides), row.steps, row.warmup, timeout=timeout)


def run_plan(rows: list[Row], budget: float, save) -> list[Outcome]:
    """Each row in turn, within its own limit and what is left of `budget`; `save` after each."""
    outcomes = [Outcome(row) for row in rows]
    start = time.monotonic()
    for outcome in outcomes:
        row = outcome.row
        left = budget - (time.monotonic() - start)
        missing = [name for name in row.needs if importlib.util.find_spec(name) is None]
        if missing:
            outcome.status, outcome.reason = "skipped", f"{', '.join(missing)} is not installed (see fetch_wheels.sh)"
        elif left < min(30.0, row.timeout):
            outcome.status, outcome.reason = "skipped", f"time budget: {left:.0f} s of --budget {budget:.0f} s left"
        else:
            print(f"[gpu-check] {row.name}: {row.what} (limit {min(row.timeout, left):.0f} s)", flush=True)
            began = time.monotonic()
            try:
                outcome.result, outcome.command = measure(row, min(row.timeout, left))
                outcome.status = "ok"
            except bench_train.BenchmarkFailed as err:
                outcome.status, outcome.reason = "failed", str(err)
            outcome.seconds = round(time.monotonic() - began, 1)
            print(f"[gpu-check] {row.name}: {outcome.status} in {outcome.seconds} s", flush=True)
        save(outcomes)
    return outcomes


# ------------------------------------------------------------------ claims
def claims(outcomes: list[Outcome], dry: bool = False) -> list[dict]:
    """One line per claim: the figure, its target where the project states one, and whether it
    is met (never judged in a dry run: tiny models on a CPU prove nothing about a GPU)."""
    by = {o.row.name: o for o in outcomes}

    def figure(name: str, key: str):
        o = by.get(name)
        return o.result.get(key) if o and o.status == "ok" and o.result else None

    def line(claim: str, value, unit: str, target: str | None = None, met: bool | None = None, rows=()) -> dict:
        reasons = [f"{r}: not run (--only)" if r not in by else f"{r}: {by[r].status} ({_first_line(by[r].reason)})"
                   for r in rows if r not in by or by[r].status != "ok"]
        if value is None and not reasons:  # every row ran: the figure itself is not there
            reasons = ["no CUDA device: peak VRAM is read from torch.cuda" if "VRAM" in claim else "no figure in the rows' results"]
        return {"claim": claim, "figure": None if value is None else f"{value} {unit}".strip(), "target": target,
                "met": met if value is not None and not dry else None, "rows": list(rows), "why_missing": "; ".join(reasons) or None}

    b1, b4 = figure("sd15-512-b1-bf16", "seconds_per_step"), figure("sd15-512-b4-bf16", "seconds_per_step")
    vram = figure("sd15-512-b1-gc-adamw8bit", "peak_vram_mb")
    seq = by.get("sweep8-512-sequential")
    seq_wall, fused_wall = figure("sweep8-512-sequential", "wall_seconds"), figure("sweep8-512-fused", "wall_seconds")
    ratio = round(fused_wall / seq_wall, 3) if seq_wall and fused_wall else None
    one_job = _one_job_peak(seq.result) if seq and seq.status == "ok" else None
    fused_peak = figure("sweep8-512-fused", "peak_vram_mb")
    peak_ratio = round(fused_peak / one_job, 2) if fused_peak and one_job else None
    compiled = figure("sd15-512-b1-compile", "seconds_per_step")
    graphs = figure("sd15-512-b1-cudagraphs", "seconds_per_step")
    sdxl, sdxl_vram = figure("sdxl-1024-b1-bf16", "seconds_per_step"), figure("sdxl-1024-b1-bf16", "peak_vram_mb")
    return [
        line("SD1.5 512 px batch 1, bf16 + SDPA", b1, "s/step", rows=["sd15-512-b1-bf16"]),
        line("SD1.5 512 px batch 4, bf16 + SDPA", b4, "s/step", rows=["sd15-512-b4-bf16"]),
        line("SD1.5 512 px batch 1, gradient checkpointing + AdamW8bit: peak VRAM", vram, "MB",
             f"<= {VRAM_TARGET_MB} MB", vram is not None and vram <= VRAM_TARGET_MB, ["sd15-512-b1-gc-adamw8bit"]),
        line("8-config sweep 512 px x 30 steps: fused / sequential wall time", ratio, "x",
             f"<= {FUSED_WALL_TARGET}x", ratio is not None and ratio <= FUSED_WALL_TARGET,
             ["sweep8-512-sequential", "sweep8-512-fused"]),
        line("8-config sweep: fused peak VRAM / one sequential job's", peak_ratio, "x",
             f"<= {FUSED_PEAK_TARGET}x", peak_ratio is not None and peak_ratio <= FUSED_PEAK_TARGET,
             ["sweep8-512-sequential", "sweep8-512-fused"]),
        line("SDXL 1024 px batch 1, bf16 + SDPA", sdxl, "s/step", rows=["sdxl-1024-b1-bf16"]),
        line("SDXL 1024 px batch 1: peak VRAM", sdxl_vram, "MB", rows=["sdxl-1024-b1-bf16"]),
        line("torch.compile speed-up on SD1.5 512 px batch 1", _speedup(b1, compiled), "x", "> 1x",
             _speedup(b1, compiled) is not None and _speedup(b1, compiled) > 1, ["sd15-512-b1-bf16", "sd15-512-b1-compile"]),
        line("CUDA graphs (reduce-overhead) speed-up on SD1.5 512 px batch 1", _speedup(b1, graphs), "x", "> 1x",
             _speedup(b1, graphs) is not None and _speedup(b1, graphs) > 1, ["sd15-512-b1-bf16", "sd15-512-b1-cudagraphs"]),
    ]  # fmt: skip


def _speedup(off: float | None, on: float | None) -> float | None:
    return round(off / on, 3) if off and on else None


def _one_job_peak(result: dict) -> float | None:
    """One job's peak VRAM in the in-process sweep: the smallest of the jobs' peaks, i.e. the
    first job's (each later job's summary carries the process's peak so far)."""
    peaks = [job["peak_vram_mb"] for job in result.get("per_job", []) if job.get("peak_vram_mb")]
    return min(peaks) if peaks else None


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:200] if text else ""


# ------------------------------------------------------------------ output
def write_outputs(out: Path, info: dict, outcomes: list[Outcome], dry: bool, started: str) -> dict:
    record = {
        "date": started,
        "dry": dry,
        "machine": info,
        "claims": claims(outcomes, dry),
        "rows": [
            {"name": o.row.name, "what": o.row.what, "status": o.status, "reason": o.reason, "seconds": o.seconds,
             "command": shlex.join(o.command[1:]) if o.command else None, "result": o.result, "row": asdict(o.row)}
            for o in outcomes
        ],
    }  # fmt: skip
    write_text(out / "gpu-check.json", json.dumps(record, indent=2) + "\n")
    return record


def write_markdown(out: Path, record: dict, outcomes: list[Outcome]) -> Path:
    """The claims table, then bench_train's raw rows (its own tables and columns)."""
    info = record["machine"]
    where = (f"{info.get('gpu') or 'no GPU'} (driver {info.get('gpu_driver')}), {info['cores']}x {info['cpu']}, "
             f"torch {info['torch']} (CUDA {info.get('torch_cuda')}), diffusers {info['diffusers']}, "
             f"transformers {info['transformers']}, python {info['python']}")  # fmt: skip
    day = record["date"][:10]
    lines = [
        f"## GPU check ({record['date']}{', DRY RUN: tiny models on the CPU, no timing claim' if record['dry'] else ''})",
        "",
        f"Machine: {where}. Command: `bash benchmarks/gpu/check.sh`.",
        "",
        "| claim | figure | target | met | machine | date | rows |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    gpu = info.get("gpu") or "CPU"
    for c in record["claims"]:
        met = {True: "yes", False: "NO", None: "-"}[c["met"]]
        figure = c["figure"] or f"not measured: {c['why_missing']}"
        lines.append(f"| {c['claim']} | {figure} | {c['target'] or '-'} | {met} | {gpu} | {day} | {', '.join(c['rows'])} |")
    path = out / "gpu-check.md"
    write_text(path, "\n".join(lines) + "\n\n")
    for o in outcomes:
        if o.status == "ok":
            kind = "sweep" if o.row.kind == "sweep" else "run"
            bench_train.append_markdown(o.row.name, kind, o.result, info, o.command, path)
    return path


def print_summary(record: dict) -> None:
    info = record["machine"]
    print(f"\n== GPU check {'(dry run) ' if record['dry'] else ''}on {info.get('gpu') or 'CPU'}, "
          f"driver {info.get('gpu_driver')}, torch {info['torch']} CUDA {info.get('torch_cuda')}")  # fmt: skip
    for row in record["rows"]:
        result = row["result"] or {}
        figures = ", ".join(f"{k}={result[k]}" for k in ("seconds_per_step", "wall_seconds", "peak_vram_mb")
                            if result.get(k) is not None)  # fmt: skip
        print(f"  {row['status']:7} {row['name']:26} {figures or _first_line(row['reason'])}")
    print("  claims:")
    for c in record["claims"]:
        met = {True: "met", False: "MISSED", None: ""}[c["met"]]
        print(f"    {c['claim']}: {c['figure'] or 'not measured'} {('(target ' + c['target'] + ') ' + met) if c['target'] else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "results"),
                        help="folder for gpu-check.json and gpu-check.md (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dry", action="store_true", help="tiny models, 2 steps, CPU: proves every row runs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all rows (default %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run these rows only")
    args = parser.parse_args()

    rows = plan(args.dry)
    if args.only:
        unknown = sorted(set(args.only) - {r.name for r in rows})
        if unknown:
            parser.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = environment()
    if not args.dry and not info["cuda_available"]:
        print("[gpu-check] no CUDA GPU is visible to torch: run with --dry for the CPU check", file=sys.stderr)
        return 2
    outcomes = run_plan(rows, args.budget, lambda done: write_outputs(args.out, info, done, args.dry, started))
    record = write_outputs(args.out, info, outcomes, args.dry, started)
    markdown = write_markdown(args.out, record, outcomes)
    print_summary(record)
    print(f"\n[gpu-check] wrote {args.out / 'gpu-check.json'} and {markdown}")
    return 0 if all(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
