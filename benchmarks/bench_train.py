"""Measure training speed of a config, or the overhead of a sweep, through train.py itself.

    python benchmarks/bench_train.py --label tiny-b2 -- training.train_batch_size=2
    python benchmarks/bench_train.py --label sd15-256 --steps 8 --warmup 2 -- \
        model=sd15 model.path=/models/sd15 dataset.resolution=256 training.train_batch_size=1
    python benchmarks/bench_train.py --sweep --label sweep8-debug -- \
        -m optimizer=adamw,prodigy network.dim=4,8 training.seed=1,2 debug=smoke
    python benchmarks/bench_train.py --label tiny-nhwc --compare training.channels_last=true -- \
        training.train_batch_size=2
    python benchmarks/bench_train.py --label sd15-256-nhwc --steps 4 --warmup 1 \
        --compare training.channels_last=true -- model=sd15_random dataset.resolution=256 \
        training.train_batch_size=1

Single runs report the median seconds per optimizer step after warm-up, images per
second, the time from process start to the end of the first step, and peak RAM/VRAM.
Sweeps report the total wall time and the share spent outside training steps, with the
seconds per phase summed over the jobs (summary.json's phase_seconds: model_load, latents,
lr_plot, epoch_outputs (samples, checkpoints), final_outputs, steps, ...) and
`process_start` (process start to the first job: imports, Hydra; `process_start.imports` is
the part spent importing the training stack), and (JSON only) each
job's own wall time, time in steps and time outside them. --compare runs the
config twice, without and with the given overrides, and reports both and the speed-up.
Every figure carries the load average (the machine may be shared).
Figures go to stdout, to benchmarks/results/<label>-<time>.json, and as a row of
BENCHMARKS.md with the machine, versions and exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from atelier.utils.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
# Only training steps are timed: no samples, checkpoints or state files in between.
QUIET = [
    "sampling.limit=0",
    "sampling.sample_every_n_epochs=null",
    "output.save_every_n_epochs=null",
    "output.save_state=false",
]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers"):
        info[package] = metadata.version(package)
    info["gpu"], info["gpu_driver"] = None, None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return info
    if gpu.returncode == 0 and gpu.stdout.strip():
        name, _, driver = gpu.stdout.strip().splitlines()[0].rpartition(",")
        info["gpu"], info["gpu_driver"] = (name.strip(), driver.strip()) if name else (driver.strip(), None)
    return info


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


class BenchmarkFailed(RuntimeError):
    """A measured command failed or ran past its time limit; the message holds its output's end."""


def run(command: list[str], timeout: float | None = None) -> float:
    """Run train.py; returns the process start time. Raises BenchmarkFailed with its output.

    The command runs in its own process group, so a time-out also ends the processes it
    started (a launcher's workers), not only train.py.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise BenchmarkFailed(f"benchmark command ran past {timeout:.0f} s:\n{shlex.join(command)}\n{stderr[-4000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the command left running
    if proc.returncode != 0:
        raise BenchmarkFailed(f"benchmark command failed ({proc.returncode}):\n{shlex.join(command)}\n{stderr[-4000:]}")
    return started


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "time/step_seconds" in r]


def measure_run(overrides: list[str], steps: int, warmup: int, timeout: float | None = None) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "train.py", *overrides, *QUIET, f"training.max_train_steps={steps}",
                   f"hydra.run.dir={run_dir}"]
        started = run(command, timeout)
        records = step_records(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    timed = [r["time/step_seconds"] for r in records[warmup:]] or [r["time/step_seconds"] for r in records]
    per_step = statistics.median(timed)
    images = cfg["training"]["train_batch_size"] * cfg["training"]["gradient_accumulation_steps"]
    result = {
        "load_average": load_average(),
        "seconds_per_step": round(per_step, 4),
        # The mean keeps what the median drops: stalls at epoch starts (data workers
        # starting again), cache misses, periodic saves.
        "mean_seconds_per_step": round(statistics.fmean(timed), 4),
        "images_per_second": round(images / per_step, 3),
        "first_step_seconds": round(records[0]["time"] - started, 2),
        "wall_seconds": round(time.time() - started, 2),
        "peak_ram_mb": round(summary["peak_memory_mb"]["ram_mb"]),
        "peak_vram_mb": round(summary["peak_memory_mb"].get("vram_mb", 0)) or None,
        "steps_timed": len(timed),
        "phase_seconds": summary.get("phase_seconds"),
    }
    return result, command


def measure_compare(
    overrides: list[str], compare: list[str], steps: int, warmup: int, repeat: int = 1
) -> tuple[dict, list[str]]:
    """The same run without and with `compare` (e.g. training.channels_last=true).

    With repeat > 1 the runs alternate off, on, off, on, ... and the medians are reported:
    on a shared machine the load changes between runs, and alternating spreads it evenly.
    """
    offs, ons = [], []
    for _ in range(repeat):
        offs.append(measure_run(overrides, steps, warmup)[0])
        on, command = measure_run([*overrides, *compare], steps, warmup)
        ons.append(on)
    off = min(offs, key=lambda r: abs(r["seconds_per_step"] - statistics.median(x["seconds_per_step"] for x in offs)))
    on = min(ons, key=lambda r: abs(r["seconds_per_step"] - statistics.median(x["seconds_per_step"] for x in ons)))
    result = {
        "feature": " ".join(compare),
        "runs_each": repeat,
        "seconds_per_step_off": round(statistics.median(r["seconds_per_step"] for r in offs), 4),
        "seconds_per_step_on": round(statistics.median(r["seconds_per_step"] for r in ons), 4),
        "speedup": None,  # off / on, set below
        "all_seconds_per_step_off": [r["seconds_per_step"] for r in offs],
        "all_seconds_per_step_on": [r["seconds_per_step"] for r in ons],
        "mean_seconds_per_step_off": round(statistics.median(r["mean_seconds_per_step"] for r in offs), 4),
        "mean_seconds_per_step_on": round(statistics.median(r["mean_seconds_per_step"] for r in ons), 4),
        "first_step_seconds_off": off["first_step_seconds"],
        "first_step_seconds_on": on["first_step_seconds"],
        "wall_seconds_off": off["wall_seconds"],
        "wall_seconds_on": on["wall_seconds"],
        "peak_ram_mb_off": off["peak_ram_mb"],
        "peak_ram_mb_on": on["peak_ram_mb"],
        "load_average_off": off["load_average"],
        "load_average_on": on["load_average"],
        "off": off,
        "on": on,
    }
    result["speedup"] = round(result["seconds_per_step_off"] / result["seconds_per_step_on"], 3)
    return result, command


def _phase_totals(jobs: list[Path]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        if summary.get("process_start_seconds") is not None:
            totals["process_start"] = totals.get("process_start", 0.0) + summary["process_start_seconds"]
        if summary.get("import_seconds") is not None:  # a part of process_start, not added to it
            totals["process_start.imports"] = totals.get("process_start.imports", 0.0) + summary["import_seconds"]
        for name, seconds in (summary.get("phase_seconds") or {}).items():
            totals[name] = totals.get(name, 0.0) + seconds
    return {name: round(seconds, 2) for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}


def measure_sweep(overrides: list[str], timeout: float | None = None) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        sweep_dir = Path(tmp) / "sweep"
        command = [sys.executable, "train.py", *overrides, f"hydra.sweep.dir={sweep_dir}"]
        started = run(command, timeout)
        wall = time.time() - started
        all_jobs = [p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").is_file()]
        summaries = {job: json.loads((job / "summary.json").read_text()) for job in all_jobs}
        step_seconds = {job: sum(r["time/step_seconds"] for r in step_records(job)) for job in all_jobs}
        jobs = _one_per_process_run(summaries)
        train = sum(step_seconds[job] for job in jobs)
        phases = _phase_totals(jobs)
        in_jobs = sum(summaries[job]["wall_seconds"] for job in jobs)
    per_job = [_job_times(job.name, summaries[job], step_seconds[job]) for job in sorted(all_jobs)]
    phases["between_jobs"] = round(max(0.0, wall - in_jobs - phases.get("process_start", 0.0)), 2)
    memory = [s.get("peak_memory_mb") or {} for s in summaries.values()]
    result = {
        "load_average": load_average(),
        "jobs": len(all_jobs),
        "fused_groups": len({tuple(s["fused"]["runs"]) for s in summaries.values() if s.get("fused")}),
        "wall_seconds": round(wall, 2),
        "training_step_seconds": round(train, 2),
        "outside_steps_fraction": round(1 - train / wall, 3),
        "seconds_outside_steps_per_job": round((wall - train) / max(len(all_jobs), 1), 2),
        "peak_ram_mb": _rounded(max((m.get("ram_mb", 0) for m in memory), default=None)),
        "peak_vram_mb": _rounded(max((m["vram_mb"] for m in memory if m.get("vram_mb")), default=None)),
        "phase_seconds": phases,
        # JSON only (too wide for the table); a fused lane's own wall time includes the
        # steps it shared with its group.
        "per_job": per_job,
    }
    return result, command


def _rounded(mb: float | None) -> int | None:
    return None if mb is None else round(mb)


def _job_times(name: str, summary: dict, steps: float) -> dict:
    wall = summary["wall_seconds"]
    times = {
        "job": name,
        "wall_seconds": round(wall, 2),
        "step_seconds": round(steps, 2),
        "outside_steps_seconds": round(wall - steps, 2),
    }
    vram = (summary.get("peak_memory_mb") or {}).get("vram_mb")
    if vram:  # the process's peak at the job's end (in-process sweeps: earlier jobs' too)
        times["peak_vram_mb"] = round(vram)
    return times


def _one_per_process_run(summaries: dict[Path, dict]) -> list[Path]:
    """The jobs, a fused group (hydra/launcher=fused) counted once: by its lane that finished
    last, which took part in every fused step and whose phases are the group's."""
    jobs, groups = [], {}
    for job, summary in summaries.items():
        if not summary.get("fused"):
            jobs.append(job)
            continue
        key = tuple(summary["fused"]["runs"])
        if key not in groups or summary["wall_seconds"] > summaries[groups[key]]["wall_seconds"]:
            groups[key] = job
    return jobs + list(groups.values())


def _cell(value) -> str:
    if isinstance(value, dict):  # phase seconds: the largest first
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def append_markdown(label: str, kind: str, result: dict, info: dict, command: list[str],
                    markdown: Path = BENCHMARKS_MD) -> None:
    header = "# Benchmarks\n\nRows appended by `benchmarks/*.py`; each names its machine and exact command.\n"
    text = markdown.read_text() if markdown.exists() else header
    title = {
        "run": "## Training speed (benchmarks/bench_train.py)",
        "sweep": "## Sweep overhead (benchmarks/bench_train.py --sweep)",
        "compare": "## Feature on/off (benchmarks/bench_train.py --compare)",
    }[kind]
    columns = [c for c in result if c not in ("off", "on", "phase_seconds", "per_job")]
    if kind == "sweep":
        columns.append("phase_seconds")
    if title not in text:
        text += f"\n{title}\n\n| date | label | machine | " + " | ".join(columns) + " | command |\n"
        text += "|" + " --- |" * (len(columns) + 4) + "\n"
    start = text.index(title)
    end = text.find("\n\n", text.index("|", start))
    end = len(text) if end == -1 else end + 1
    table, columns = _with_columns(text[start:end], columns)
    versions = ", ".join(f"{name} {info[name]}" for name in ("torch", "diffusers", "transformers", "python"))
    where = f"{info['cores']}x {info['cpu']}" + (f", {info['gpu']}" if info.get("gpu") else "") + f", {versions}"
    row = (f"| {datetime.now(timezone.utc):%Y-%m-%d} | {label} | {where} | "
           + " | ".join(_cell(result.get(c)) for c in columns) + f" | `{shlex.join(command[1:])}` |\n")
    # The row goes at the end of its table (the table ends at the next blank line).
    write_text(markdown, text[:start] + table + row + text[end:])


def _with_columns(table: str, columns: list[str]) -> tuple[str, list[str]]:
    """The table with a column added for each of `columns` it lacks (earlier rows get an empty
    cell), and its figure columns in order: between machine and command."""
    lines = table.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("| date |"))
    have = [c.strip() for c in lines[at].strip().strip("|").split("|")][3:-1]
    extra = [c for c in columns if c not in have]
    if not extra:
        return table, have
    def widen(line: str, cells: list[str]) -> str:
        head, _, command = line.rstrip("\n").rpartition(" | ")
        return f"{head} | " + " | ".join(cells) + f" | {command}\n"
    lines[at] = widen(lines[at], extra)
    lines[at + 1] = "|" + " --- |" * (len(have) + len(extra) + 4) + "\n"
    for i in range(at + 2, len(lines)):
        if lines[i].startswith("|"):
            lines[i] = widen(lines[i], [""] * len(extra))
    return "".join(lines), have + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="overrides describe a -m sweep")
    parser.add_argument("--compare", nargs="+", metavar="OVERRIDE",
                        help="measure the run without, then with these overrides (e.g. training.channels_last=true)")
    parser.add_argument("--repeat", type=int, default=1, help="--compare: alternate off/on runs this many times")
    parser.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON (default %(default)s)")
    parser.add_argument("--markdown", type=Path, default=BENCHMARKS_MD, help="file the row goes to (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()

    info = machine()
    kind = "sweep" if args.sweep else "compare" if args.compare else "run"
    try:
        if args.sweep:
            result, command = measure_sweep(args.overrides)
        elif args.compare:
            result, command = measure_compare(args.overrides, args.compare, args.steps, args.warmup, args.repeat)
        else:
            result, command = measure_run(args.overrides, args.steps, args.warmup)
    except BenchmarkFailed as err:
        sys.exit(str(err))
    record = {"label": args.label, "kind": kind, "result": result, "machine": info,
              "command": shlex.join(command[1:]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    write_text(out, json.dumps(record, indent=2) + "\n")
    if not args.no_markdown:
        append_markdown(args.label, record["kind"], result, info, command, args.markdown)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
