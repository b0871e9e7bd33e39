"""`atelier report` on real sweeps made by train.py, checked as files and in a headless browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from PIL import Image

from atelier.cli import main as atelier_main
from atelier.report.collect import collect_sweep
from atelier.report.grids import grid_title
from atelier.report.write import write_report
from atelier.sampling.grid import default_cell_size, grid_layout
from tests.helpers import REPO_ROOT, TRAIN

pytestmark = pytest.mark.slow

# adamw/prodigy x dim 0/4: the two dim=0 jobs are rejected at start, the others train.
SWEEP_OVERRIDES = ["optimizer=adamw,prodigy", "network.dim=0,4", "debug=smoke", "sampling.limit=2"]
N_JOBS, N_COMPLETED, N_PROMPTS = 4, 2, 2


def run_sweep(sweep_dir: Path) -> subprocess.CompletedProcess:
    # One OpenMP thread: on a small shared machine more threads spin and run the tiny model slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TRAIN), "-m", *SWEEP_OVERRIDES, f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sweep, report not yet written (copied by the fixtures that write one)."""
    path = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = run_sweep(path)
    # The sweeper runs every job, prints the failures, then exits 1.
    assert proc.returncode == 1
    assert "network.dim' must be at least 1" in proc.stdout, proc.stderr[-3000:]
    statuses = [json.loads(p.read_text())["status"] for p in path.glob("*/summary.json")]
    assert statuses.count("completed") == N_COMPLETED, proc.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def report(sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep = shutil.copytree(sweep_dir, tmp_path_factory.mktemp("finished") / "sweep")
    assert atelier_main(["report", str(sweep)]) == 0
    return sweep / "report.html"


@pytest.fixture(scope="module")
def partial_sweep(sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep as it looked while its last job was training."""
    sweep = shutil.copytree(sweep_dir, tmp_path_factory.mktemp("partial") / "sweep")
    finished = [p.parent for p in sweep.glob("*/summary.json") if json.loads(p.read_text())["status"] == "completed"]
    last = max(finished, key=_job_num)
    (last / "summary.json").unlink()
    return sweep


def _job_num(job_dir: Path) -> int:
    return int(re.search(r"\n    num: (\d+)", (job_dir / ".hydra" / "hydra.yaml").read_text()).group(1))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- files


def test_runs_table_has_one_row_per_job_with_swept_columns(report: Path) -> None:
    rows = _read_csv(report.parent / "runs.csv")
    assert len(rows) == N_JOBS
    header = list(rows[0])
    assert header[:3] == ["job", "optimizer", "network.dim"]
    assert "debug" not in header  # the same in every job: not swept
    for column in ("status", "steps", "final_loss", "best_loss", "wall_seconds", "seconds_per_step",
                   "peak_ram_mb", "peak_vram_mb", "output_file", "reason"):
        assert column in header
    assert {(r["optimizer"], r["network.dim"]) for r in rows} == {
        ("adamw", "0"), ("adamw", "4"), ("prodigy", "0"), ("prodigy", "4")}
    json_rows = json.loads((report.parent / "runs.json").read_text())
    assert [list(row) for row in json_rows] == [header] * N_JOBS


def test_completed_and_failed_rows(report: Path) -> None:
    rows = json.loads((report.parent / "runs.json").read_text())
    csv_rows = _read_csv(report.parent / "runs.csv")
    assert [r["job"] for r in rows] == [r["job"] for r in csv_rows]
    for row in rows:
        if row["network.dim"] == "0":
            assert row["status"] == "failed"
            assert "ConfigError: 'network.dim' must be at least 1" in row["reason"]
            assert row["output_file"] is None
        else:
            assert row["status"] == "completed" and row["reason"] is None
            assert row["steps"] == 2
            assert row["final_loss"] > 0 and row["best_loss"] <= row["final_loss"]
            assert row["wall_seconds"] > 0 and row["seconds_per_step"] > 0 and row["peak_ram_mb"] > 0
            assert (report.parent / row["output_file"]).is_file()
    assert not any(r["best"] for r in rows)  # a 2-step smoke sweep compares nothing


def test_loss_plot_is_an_image(report: Path) -> None:
    with Image.open(report.parent / "loss_curves.png") as image:
        image.verify()
    with Image.open(report.parent / "loss_curves.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300


def test_one_grid_per_prompt_with_a_row_per_run_with_samples(report: Path) -> None:
    sweep = collect_sweep(report.parent)
    runs = [run for run in sweep.runs if run.samples]
    assert len(runs) == N_COMPLETED
    prompts = sorted({(int(r["index"]), r["prompt"]) for run in runs for r in run.samples})
    assert len(prompts) == N_PROMPTS
    cell = default_cell_size([(r["width"], r["height"]) for run in runs for r in run.samples])
    for number, (index, prompt) in enumerate(prompts):
        # smoke runs sample once, at the end of epoch 1: one column
        expected = grid_layout(len(runs), 1, cell, title=grid_title(index, prompt)).size
        with Image.open(report.parent / f"samples_prompt{number:02d}.png") as image:
            assert image.size == expected
    assert not (report.parent / f"samples_prompt{N_PROMPTS:02d}.png").exists()


def test_grid_has_a_column_per_saved_epoch(report: Path, tmp_path: Path) -> None:
    sweep = shutil.copytree(report.parent, tmp_path / "sweep")
    job = next(p.parent for p in sweep.glob("*/summary.json"))
    # The same samples once more as if taken at the end of epoch 2.
    manifest = job / "samples" / "samples.json"
    records = json.loads(manifest.read_text())
    for record in list(records):
        later = {**record, "epoch": 2, "step": record["step"] * 2, "file": "e2_" + record["file"]}
        shutil.copy(job / "samples" / record["file"], job / "samples" / later["file"])
        records.append(later)
    manifest.write_text(json.dumps(records))
    write_report(sweep)
    runs = [run for run in collect_sweep(sweep).runs if run.samples]
    cell = default_cell_size([(r["width"], r["height"]) for r in records])
    index, prompt = records[0]["index"], records[0]["prompt"]
    with Image.open(sweep / "samples_prompt00.png") as image:
        assert image.size == grid_layout(len(runs), 2, cell, title=grid_title(index, prompt)).size


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        for name in ("src", "href"):
            if values.get(name):
                self.links.append(values[name] or "")


def test_html_links_only_relative_existing_files(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # works offline: no CDN
    assert "<script" not in text
    parser = _Links()
    parser.feed(text)
    per_run = {f"{quote(run.name)}/report_loss.png" for run in collect_sweep(report.parent).runs if run.loss_curve}
    assert len(per_run) == N_COMPLETED
    assert set(parser.images) == {"loss_curves.png", *per_run, *(f"samples_prompt{i:02d}.png" for i in range(N_PROMPTS))}
    for link in parser.links:
        assert not link.startswith(("/", "file:", "//")) and ":" not in link.split("/")[0], link
        assert (report.parent / unquote(link)).is_file(), link
    assert "must be at least 1, got 0" in text  # failed rows show why
    for prompt in {r["prompt"] for run in collect_sweep(report.parent).runs for r in run.samples}:
        assert prompt in text


def test_partial_sweep_reports_running_job(partial_sweep: Path) -> None:
    report = write_report(partial_sweep)
    rows = json.loads((partial_sweep / "runs.json").read_text())
    statuses = sorted(row["status"] for row in rows)
    assert statuses == ["completed", "failed", "failed", "running"]
    running = next(row for row in rows if row["status"] == "running")
    assert running["steps"] == 2 and running["final_loss"] is None and running["output_file"] is None
    assert 'data-status="running"' in report.read_text(encoding="utf-8")


def test_job_that_just_started_is_pending(partial_sweep: Path, tmp_path: Path) -> None:
    sweep = shutil.copytree(partial_sweep, tmp_path / "sweep")
    # A job Hydra has just started: only .hydra/ exists yet.
    newest = max((p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")), key=_job_num)
    (sweep / "next" / ".hydra").mkdir(parents=True)
    shutil.copy(newest / ".hydra" / "overrides.yaml", sweep / "next" / ".hydra" / "overrides.yaml")
    num = _job_num(newest)
    hydra_yaml = (newest / ".hydra" / "hydra.yaml").read_text()
    hydra_yaml = hydra_yaml.replace(f"\n    num: {num}\n", f"\n    num: {num + 1}\n")
    (sweep / "next" / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
    statuses = {run.name: run.status for run in collect_sweep(sweep).runs}
    assert statuses["next"] == "pending"


# ---------------------------------------------------------------- command line


def test_cli_help_has_an_example() -> None:
    proc = subprocess.run([sys.executable, "-m", "atelier.cli", "report", "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "atelier report multirun/" in proc.stdout and "--open-browser" in proc.stdout


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_cli_rejects_what_is_not_a_sweep(make: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "nothing"
    if make == "empty":
        (path / "some_folder").mkdir(parents=True)
    assert atelier_main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    if make == "empty":
        assert "is this a sweep dir?" in err and ".hydra/overrides.yaml" in err
    assert not (path / "report.html").exists()


def test_cli_prints_where_the_report_is(partial_sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert atelier_main(["report", str(partial_sweep), "--open-browser", "no"]) == 0
    assert str(partial_sweep / "report.html") in capsys.readouterr().out


# ---------------------------------------------------------------- headless browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

# Injected into a copy of the report (the report itself has no scripts): once the page has
# loaded, record how many images the browser actually decoded.
IMAGE_PROBE = """<script>
addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0);
  document.body.dataset.imagesLoaded = loaded.length + "/" + images.length;
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _browse(chromium: str, page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_browser_renders_table_and_images(chromium: str, report: Path, tmp_path: Path) -> None:
    dom = _browse(chromium, report, tmp_path, "--dump-dom").stdout
    assert len(re.findall(r"<tr [^>]*data-job=", dom)) == N_JOBS
    assert len(re.findall(r'<tr [^>]*data-status="failed"', dom)) == N_JOBS - N_COMPLETED
    assert len(re.findall(r"<img ", dom)) == 1 + N_COMPLETED + N_PROMPTS


def test_browser_loads_every_image(chromium: str, report: Path, tmp_path: Path) -> None:
    probe = report.with_name("report_probe.html")
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _browse(chromium, probe, tmp_path, "--virtual-time-budget=5000", "--dump-dom").stdout
    finally:
        probe.unlink()
    images = 1 + N_COMPLETED + N_PROMPTS  # all runs, one chart per run, one grid per prompt
    assert f'data-images-loaded="{images}/{images}"' in dom


def test_browser_screenshot_is_not_blank(chromium: str, report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    _browse(chromium, report, tmp_path, f"--screenshot={shot}", "--window-size=1400,2000")
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1400, 2000)
        colours = pixels.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, badges, plot lines, sample images
    background = max(colours)[0] / (1400 * 2000)
    assert background < 0.9
