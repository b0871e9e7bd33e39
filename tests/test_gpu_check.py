"""benchmarks/gpu/check.sh, run for real in its dry mode (tiny models, 2 steps, CPU): every
row of the GPU check still runs, and its JSON, claims and BENCHMARKS.md rows are written.

No figure is checked against a time: the dry mode makes no timing claim (its claims are
never judged), it only proves the check will not rot before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "benchmarks" / "gpu" / "check.sh"
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
sys.path.insert(0, str(REPO / "benchmarks"))

import check as gpu_check  # noqa: E402


def run_check(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CHECK), "--out", str(tmp_path / "out"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_dry_run_produces_every_row_claim_and_markdown(tmp_path):
    proc = run_check(tmp_path, "--dry")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    planned = [row.name for row in gpu_check.plan(dry=True)]
    assert [row["name"] for row in record["rows"]] == planned
    for row in record["rows"]:
        assert row["status"] == "ok", (row["name"], row["reason"])
        result = row["result"]
        assert result["wall_seconds"] > 0
        if row["row"]["kind"] == "sweep":
            assert result["jobs"] == 8
            assert (result["fused_groups"] == 1) == ("hydra/launcher=fused" in row["command"])
        else:
            assert result["steps_timed"] >= 1 and result["seconds_per_step"] > 0
            assert "training.max_train_steps=2" in row["command"]
    # What the rows ran is what they say: tiny models, the 8-bit optimizer, compile modes.
    commands = {row["name"]: row["command"] for row in record["rows"]}
    assert "model=tiny_sdxl" in commands["sdxl-1024-b1-bf16"]
    assert "optimizer=adamw8bit" in commands["sd15-512-b1-gc-adamw8bit"]
    assert "training.torch_compile_mode=reduce-overhead" in commands["sd15-512-b1-cudagraphs"]
    # Every claim has a figure (VRAM ones need CUDA and say so), and none is judged in a dry run.
    assert len(record["claims"]) == 9
    for claim in record["claims"]:
        if "VRAM" in claim["claim"] and not record["machine"].get("cuda_available"):
            assert claim["figure"] is None and "no CUDA device" in claim["why_missing"], claim
        else:
            assert claim["figure"] is not None, claim
        assert claim["met"] is None, claim
    assert record["dry"] is True and record["machine"]["torch"]
    markdown = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "DRY RUN" in markdown
    for claim in record["claims"]:
        assert f"| {claim['claim']} | {claim['figure'] or 'not measured: ' + claim['why_missing']} |" in markdown
    for name in planned:
        assert f"| {name} |" in markdown
    assert "== GPU check (dry run)" in proc.stdout


def test_rows_past_the_budget_are_skipped_saying_why(tmp_path):
    proc = run_check(tmp_path, "--dry", "--budget", "1", "--only", "sd15-512-b1-bf16", "sweep8-512-fused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [(r["name"], r["status"]) for r in record["rows"]] == [
        ("sd15-512-b1-bf16", "skipped"), ("sweep8-512-fused", "skipped")]
    assert all("time budget" in r["reason"] for r in record["rows"])
    claim = next(c for c in record["claims"] if c["claim"].startswith("8-config sweep 512 px"))
    assert claim["figure"] is None and "sweep8-512-sequential: not run" in claim["why_missing"]


def test_a_failing_row_is_recorded_and_the_others_go_on(tmp_path):
    rows = [
        gpu_check.Row("broken", "run", ("model=no_such_model",), "a row that cannot compose", 2, 0, 120),
        gpu_check.Row("fine", "run", ("debug=smoke",), "a row that runs", 2, 0, 120),
    ]
    saved = []
    outcomes = gpu_check.run_plan(rows, budget=600, save=lambda done: saved.append([o.status for o in done]))
    assert [o.status for o in outcomes] == ["failed", "ok"]
    assert "no_such_model" in outcomes[0].reason
    assert saved[-1] == ["failed", "ok"] and len(saved) == 2  # written after every row


def test_unknown_row_and_missing_dependencies_are_refused(tmp_path):
    proc = run_check(tmp_path, "--dry", "--only", "nope")
    assert proc.returncode == 2 and "unknown row(s) nope" in proc.stderr
    # A Python without the project's dependencies and no wheels: says what to run first.
    bare = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], timeout=120)
    assert bare.returncode == 0
    proc = run_check(tmp_path, env={"PYTHON": str(tmp_path / "bare" / "bin" / "python"),
                                    "ATELIER_WHEELS": str(tmp_path / "no-wheels")})
    assert proc.returncode == 2
    assert "no wheels in" in proc.stderr and "fetch_wheels.sh" in proc.stderr and "diffusers" in proc.stderr
