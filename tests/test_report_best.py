"""The report picks the run and the epoch: a real sweep with validation and saved epochs.

Also: LoRA files named by swept values, sweep.json (pending / not started jobs), bookkeeping
keys that are never axes, `atelier report --live`, and a 16-run page at 1280 px in Chromium.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from atelier.report.collect import collect_sweep
from atelier.report.grids import BEST_FRAME, write_prompt_grids
from atelier.report.ranking import rank
from atelier.report.write import write_report
from atelier.sampling.grid import default_cell_size, grid_layout
from atelier.outputs.sweep_plan import PlannedJob, SweepPlan, mark_plan, read_plan, write_plan
from tests.helpers import REPO_ROOT, final_lora, run_train
from tests.test_report import _browse, chromium  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

# 24 steps of 2 images: 2 epochs (23 batches, then 1), each saved, sampled and validated.
SWEEP = ["network.dim=2,4", "training.max_train_steps=24", "dataset.validation_split=0.2",
         "output.save_every_n_epochs=1", "sampling.sample_every_n_epochs=1", "sampling.limit=1", "sampling.steps=2"]
JOBS = ["network.dim=2", "network.dim=4"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("best") / "sweep"
    proc = run_train("-m", *SWEEP, f"hydra.sweep.dir={path}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return path


def _copy(sweep_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(sweep_dir, tmp_path / "sweep")


def _metrics(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def _val_by_epoch(job_dir: Path) -> dict[int, float]:
    return {row["epoch"]: row["loss/validation"] for row in _metrics(job_dir) if "loss/validation" in row}


def _details(html: str, job: str) -> str:
    match = re.search(rf'<details class="epochs" data-job="{re.escape(job)}".*?</details>', html, re.S)
    assert match, job
    return match.group(0)


# ---------------------------------------------------------------- names and plan


def test_each_job_names_its_lora_file_by_the_swept_values(sweep_dir: Path) -> None:
    for job, dim in zip(JOBS, (2, 4)):
        assert final_lora(sweep_dir / job).name == f"demo_dim-{dim}.safetensors"
        assert (sweep_dir / job / f"demo_dim-{dim}-000001.safetensors").is_file()  # epoch 1's checkpoint
    with open(sweep_dir / "runs.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["job"]: r["lora_name"] for r in rows} == {"network.dim=2": "demo_dim-2.safetensors",
                                                         "network.dim=4": "demo_dim-4.safetensors"}
    html = (sweep_dir / "report.html").read_text(encoding="utf-8")
    assert 'title="demo_dim-2.safetensors"' in html and 'title="demo_dim-4.safetensors"' in html


def test_sweep_json_lists_every_job_without_bookkeeping(sweep_dir: Path) -> None:
    plan = read_plan(sweep_dir)
    assert plan is not None and plan.state == "finished"
    assert [job.name for job in plan.jobs] == JOBS and plan.swept_keys == ["network.dim"]
    for job in plan.jobs:
        assert not any(o.startswith(("hydra", "resume")) for o in job.overrides), job.overrides
        assert job.output_name == "${project}_" + job.name.replace("network.dim=", "dim-")


# ---------------------------------------------------------------- best run, best epoch


def test_best_run_has_the_lowest_validation_loss(sweep_dir: Path) -> None:
    last_val = {job: _val_by_epoch(sweep_dir / job)[2] for job in JOBS}
    rows = json.loads((sweep_dir / "runs.json").read_text())
    assert [r["job"] for r in rows if r["best"]] == [min(last_val, key=last_val.get)]
    html = (sweep_dir / "report.html").read_text(encoding="utf-8")
    assert "Best run by validation loss" in html and "Ranked by validation loss" in html


def test_epochs_table_stars_the_best_epoch_and_links_each_checkpoint(sweep_dir: Path) -> None:
    html = (sweep_dir / "report.html").read_text(encoding="utf-8")
    for job, dim in zip(JOBS, (2, 4)):
        block = _details(html, job)
        links = re.findall(r'href="([^"]+)"', block)
        assert [Path(unquote(link)).name for link in links] == [f"demo_dim-{dim}-000001.safetensors",
                                                                 f"demo_dim-{dim}.safetensors"]
        for link in links:
            assert not link.startswith(("/", "file:")) and (sweep_dir / unquote(link)).is_file(), link
        val = _val_by_epoch(sweep_dir / job)
        best = min(val, key=val.get)
        starred = re.findall(r'<tr class="best-epoch"><td class="num"><span class="star">&#9733;</span> (\d+)<', block)
        assert starred == [str(best)]
        assert f"best: epoch {best}, by validation loss" in block
        row = next(r for r in json.loads((sweep_dir / "runs.json").read_text()) if r["job"] == job)
        assert row["best_epoch"] == best
        expected = f"demo_dim-{dim}-{best:06d}.safetensors" if best == 1 else f"demo_dim-{dim}.safetensors"
        assert row["best_epoch_file"] == f"{job}/{expected}"


def test_sample_grids_frame_the_best_epoch(sweep_dir: Path, tmp_path: Path) -> None:
    sweep = collect_sweep(_copy(sweep_dir, tmp_path))
    (grid,) = write_prompt_grids(sweep.runs, sweep.path)
    runs = [run for run in sweep.runs if run.samples]
    assert grid.columns == ["epoch 1", "epoch 2"]
    assert grid.best_cells == [(row, run.best_epoch.epoch - 1) for row, run in enumerate(runs)]
    assert all("(best: epoch" in label for label in grid.runs)
    cell = default_cell_size([(r["width"], r["height"]) for run in runs for r in run.samples])
    layout = grid_layout(len(runs), 2, cell, title=f"prompt 0: {runs[0].samples[0]['prompt']}")
    with Image.open(grid.path) as image:
        image = image.convert("RGB")
        for row in range(len(runs)):
            for col in range(2):
                x0, y0, _, _ = layout.cell_box(row, col)
                framed = image.getpixel((x0 - 1, y0 - 1)) == BEST_FRAME
                assert framed == ((row, col) in grid.best_cells), (row, col)


def test_training_loss_ranking_says_when_the_gap_is_noise(sweep_dir: Path, tmp_path: Path) -> None:
    sweep_path = _copy(sweep_dir, tmp_path)
    for job in JOBS:  # as if validation were off (the default)
        rows = [row for row in _metrics(sweep_path / job) if "loss/validation" not in row]
        (sweep_path / job / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ranking = rank(collect_sweep(sweep_path))
    # Two tiny runs of the same seed differ by far less than their step-to-step swings.
    assert ranking.metric == "recent_loss" and ranking.within_noise, ranking.note
    html = write_report(sweep_path).read_text(encoding="utf-8")
    assert "Best run by training loss (mean of the last 50 steps)" in html and "below the noise" in html
    assert "set dataset.validation_split" in html and "&plusmn;" in html

    # A run clearly lower than that noise is named without the caveat.
    rows = _metrics(sweep_path / JOBS[1])
    for row in rows:
        if "loss/step" in row:
            row["loss/step"] -= 0.5
    (sweep_path / JOBS[1] / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ranking = rank(collect_sweep(sweep_path))
    assert ranking.best.name == JOBS[1] and not ranking.within_noise


# ---------------------------------------------------------------- all jobs, no bookkeeping axes


@pytest.mark.parametrize("state, status", [("running", "pending"), ("interrupted", "not started")])
def test_planned_jobs_without_a_folder_are_listed(sweep_dir: Path, tmp_path: Path, state: str, status: str) -> None:
    sweep_path = _copy(sweep_dir, tmp_path)
    shutil.rmtree(sweep_path / JOBS[1])
    mark_plan(sweep_path, state)
    html = write_report(sweep_path).read_text(encoding="utf-8")
    assert {run.name: run.status for run in collect_sweep(sweep_path).runs} == {JOBS[0]: "completed", JOBS[1]: status}
    assert f"2 jobs: 1 completed, 1 {status}" in html
    assert f'data-job="{JOBS[1]}" data-status="{status}"' in html


def test_resume_is_never_a_swept_axis(sweep_dir: Path, tmp_path: Path) -> None:
    sweep_path = _copy(sweep_dir, tmp_path)
    final_lora(sweep_path / JOBS[1]).unlink()  # as if killed before its end: resume runs it again
    proc = run_train("-m", *SWEEP, f"hydra.sweep.dir={sweep_path}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume=true" in (sweep_path / JOBS[1] / ".hydra" / "overrides.yaml").read_text().lower()
    assert "resume=true" not in (sweep_path / JOBS[0] / ".hydra" / "overrides.yaml").read_text().lower()
    with open(sweep_path / "runs.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["job", "network.dim", "status"]
    html = (sweep_path / "report.html").read_text(encoding="utf-8")
    assert "<code>resume</code>" not in html and ">resume<" not in html

    # A sweep without sweep.json (made before plans): axes come from the job folders, still without bookkeeping.
    (sweep_path / "sweep.json").unlink()
    for job in JOBS:
        overrides = sweep_path / job / ".hydra" / "overrides.yaml"
        overrides.write_text("".join(line + "\n" for line in overrides.read_text().splitlines()
                                     if "output.output_name" not in line) + "- hydra.job.chdir=false\n")
    assert collect_sweep(sweep_path).swept_keys == ["network.dim"]


# ---------------------------------------------------------------- live


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_live_report_follows_a_sweep_until_it_is_over(sweep_dir: Path, tmp_path: Path) -> None:
    sweep_path = _copy(sweep_dir, tmp_path)
    mark_plan(sweep_path, "running")
    summary = sweep_path / JOBS[1] / "summary.json"
    held = summary.read_text()
    summary.unlink()  # the second job is training
    (sweep_path / "report.html").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "atelier.cli", "report", "--live", "--interval", "0.5",
                             str(sweep_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = sweep_path / "report.html"
    try:
        _wait_for(report.is_file)
        html = report.read_text(encoding="utf-8")
        assert '<meta http-equiv="refresh" content="1">' in html and 'data-status="running"' in html
        first = report.stat().st_mtime_ns
        _wait_for(lambda: report.stat().st_mtime_ns != first)  # rewritten while the sweep runs
        summary.write_text(held)  # the job ends, then the sweeper
        mark_plan(sweep_path, "finished")
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, out
    assert "sweep over: final report" in out
    html = report.read_text(encoding="utf-8")
    assert "http-equiv" not in html and 'data-status="running"' not in html and "2 jobs: 2 completed" in html


# ---------------------------------------------------------------- 16 runs at 1280 px

# Once loaded: the page's width, the runs table's right edge, and each small chart's width.
LAYOUT_PROBE = """<script>
addEventListener("load", () => {
  const d = document.body.dataset, table = document.getElementById("runs");
  const charts = [...document.querySelectorAll(".multiples figure")];
  d.pageWidth = document.documentElement.scrollWidth;
  d.tableRight = Math.ceil(table.getBoundingClientRect().right);
  d.charts = charts.length;
  d.chartMin = Math.floor(Math.min(...charts.map((f) => f.getBoundingClientRect().width)));
  d.chartsLoaded = charts.filter((f) => f.querySelector("img").naturalWidth > 0).length;
});
</script>"""
LONG_REASON = "ValueError: " + "/very/long/path/without/spaces/" * 12 + " could not be read"


def _sixteen_run_sweep(sweep_dir: Path, root: Path) -> Path:
    """16 planned jobs over 3 long axes: 12 with the folder of a real job, 4 pending, one failed."""
    axes = {"optimizer": ["adamw", "prodigy"], "network.dim": ["4", "32"],
            "optimizer.learning_rate": ["0.0001", "0.00005", "0.001", "0.0002"]}
    combos = list(itertools.product(*axes.values()))
    sweep = root / "sweep16"
    sweep.mkdir()
    jobs = []
    for i, values in enumerate(combos):
        overrides = [f"{key}={value}" for key, value in zip(axes, values)]
        name = ",".join(overrides)
        jobs.append(PlannedJob(name, [*overrides, "debug=smoke"], f"demo_{i}"))
        if i < 12:
            job = shutil.copytree(sweep_dir / JOBS[0], sweep / name)
            (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
            lora = final_lora(job)
            long_name = f"my_character_lora_v2_{name.replace('=', '-').replace(',', '_')}.safetensors"
            lora.rename(job / long_name)
            summary = json.loads((job / "summary.json").read_text())
            summary["output_file"] = long_name
            if i == 5:
                summary.update(status="failed", reason=LONG_REASON, output_file=None)
            (job / "summary.json").write_text(json.dumps(summary))
    write_plan(sweep, SweepPlan(jobs, list(axes), {"debug": "smoke"}, "running"))
    return sweep


def test_sixteen_runs_fit_a_1280_px_window(chromium: str, sweep_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    sweep = _sixteen_run_sweep(sweep_dir, tmp_path)
    report = write_report(sweep)
    html = report.read_text(encoding="utf-8")
    assert len(re.findall(r"<tr [^>]*data-job=", html)) == 16
    assert html.count('data-status="pending"') == 4 and LONG_REASON.split(" could")[0][:40] in html
    probe = report.with_name("report_probe.html")
    probe.write_text(html.replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    dom = _browse(chromium, probe, tmp_path, "--window-size=1280,4000", "--virtual-time-budget=5000",
                  "--dump-dom").stdout
    values = {key: int(value) for key, value in re.findall(r'data-([a-z-]+)="(\d+)"', dom.split("<body", 1)[1][:400])}
    assert values["page-width"] <= 1280 and values["table-right"] <= 1280, values
    assert values["charts"] == 12 and values["charts-loaded"] == 12, values
    assert values["chart-min"] >= 250, values  # four charts a row, each readable
    shot = tmp_path / "report16.png"
    _browse(chromium, report, tmp_path, f"--screenshot={shot}", "--window-size=1280,3000")
    with Image.open(shot) as image:
        assert image.size == (1280, 3000)
