"""benchmarks/bench_train.py, run for real on the tiny model: what it measures and writes.

Figures are checked for consistency with each other and with the runs' own files, never
against a time: timings belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_train.py"

# A table as an older version of the script wrote it: fewer columns than today's.
OLD_TABLE = """# Benchmarks

## Feature on/off (benchmarks/bench_train.py --compare)

| date | label | machine | feature | speedup | command |
| --- | --- | --- | --- | --- | --- |
| 2026-01-01 | old | cpu | x=1 | 1.0 | `train.py x=1` |
"""


def bench(tmp_path: Path, label: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--label", label, "--results", str(tmp_path / "results"),
         "--markdown", str(tmp_path / "BENCHMARKS.md"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "results").glob(f"{label}-*.json")
    return json.loads(result.read_text())


def table_rows(markdown: str, title: str) -> list[list[str]]:
    section = markdown[markdown.index(title):].split("\n\n")[1]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()]


def test_sweep_reports_wall_steps_and_each_jobs_time_outside_steps(tmp_path):
    record = bench(tmp_path, "sweep2", "--sweep", "--", "-m", "network.dim=4,8", "debug=smoke")
    result = record["result"]
    assert record["kind"] == "sweep" and result["jobs"] == 2
    jobs = {job["job"]: job for job in result["per_job"]}
    assert set(jobs) == {"network.dim=4", "network.dim=8"}
    steps = sum(job["step_seconds"] for job in jobs.values())
    assert result["training_step_seconds"] == pytest.approx(steps, abs=0.02)
    assert 0 < steps < result["wall_seconds"]
    assert result["outside_steps_fraction"] == pytest.approx(1 - steps / result["wall_seconds"], abs=0.01)
    for job in jobs.values():
        assert job["outside_steps_seconds"] == pytest.approx(job["wall_seconds"] - job["step_seconds"], abs=0.02)
    phases = result["phase_seconds"]
    assert {"process_start", "process_start.imports", "model_load", "steps", "between_jobs"} <= set(phases)
    assert 0 < phases["process_start.imports"] < phases["process_start"]
    assert phases["steps"] == pytest.approx(steps, abs=0.05)
    assert result["peak_ram_mb"] > 0
    # The row names the machine and the exact command, so the figure can be reproduced.
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    header, _, row = table_rows(markdown, "## Sweep overhead")
    assert row[header.index("label")] == "sweep2"
    assert row[header.index("jobs")] == "2"
    assert "train.py -m network.dim=4,8 debug=smoke" in row[-1]
    versions = record["machine"]
    assert all(f"{name} {versions[name]}" in row[2] for name in ("torch", "diffusers", "transformers", "python"))


def test_run_reports_median_step_images_per_second_and_first_step(tmp_path):
    record = bench(tmp_path, "run", "--steps", "4", "--warmup", "1", "--", "training.train_batch_size=2")
    result = record["result"]
    assert result["steps_timed"] == 3  # 4 steps, the first one a warm-up
    assert result["images_per_second"] == pytest.approx(2 / result["seconds_per_step"], rel=0.01)
    assert 0 < result["first_step_seconds"] < result["wall_seconds"]
    assert result["peak_ram_mb"] > 0 and result["peak_vram_mb"] is None  # no GPU here


def test_compare_runs_off_then_on_and_widens_an_older_table(tmp_path):
    (tmp_path / "BENCHMARKS.md").write_text(OLD_TABLE)
    record = bench(tmp_path, "cmp", "--steps", "3", "--warmup", "1",
                   "--compare", "training.gradient_checkpointing=true", "--", "training.train_batch_size=2")  # fmt: skip
    result = record["result"]
    assert result["speedup"] == pytest.approx(result["seconds_per_step_off"] / result["seconds_per_step_on"], abs=0.01)
    assert result["feature"] == "training.gradient_checkpointing=true"
    assert "training.gradient_checkpointing=true" in record["command"]  # the row's command is the "on" run's
    assert result["runs_each"] == 1 and result["off"]["steps_timed"] == result["on"]["steps_timed"] == 2
    header, _, old, new = table_rows((tmp_path / "BENCHMARKS.md").read_text(), "## Feature on/off")
    assert header[:5] == ["date", "label", "machine", "feature", "speedup"] and header[-1] == "command"
    assert {"seconds_per_step_off", "mean_seconds_per_step_on", "wall_seconds_on"} <= set(header)
    assert len(old) == len(new) == len(header)  # the old row got empty cells for the new columns
    assert old[1] == "old" and old[header.index("wall_seconds_on")] == "" and old[-1] == "`train.py x=1`"
    assert new[1] == "cmp" and float(new[header.index("speedup")]) == result["speedup"]


def test_profile_launches_counts_the_ops_each_lora_and_each_fused_lane_adds(tmp_path):
    """benchmarks/profile_launches.py on the tiny UNet: counts, not times. A LoRA adds ops to
    the base step, batch size does not change the count, and 3 fused lanes of one rank
    dispatch fewer ops than 3 LoRAs' worth (their updates are batched, atelier/fused/slots.py)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_launches.py"), "--arch", "tiny-sd15", "--lanes", "3",
         "--repeats", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("launches-tiny-sd15-cpu-*.json")
    record = json.loads(path.read_text())
    base, solo, solo_batch, fused = (row["aten_ops_per_step"] for row in record["rows"])
    assert record["patched_layers"] > 0
    assert solo > base
    assert solo_batch == solo
    per_lora = solo - base
    assert solo < fused < base + 3 * per_lora
