"""`atelier dataset check`: the report and exit code on good and broken datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from atelier.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "atelier.cli", "dataset", "check", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The same command in-process: much faster than a subprocess per case."""
    code = main(["dataset", "check", *map(str, args)])
    return code, capsys.readouterr().out


def image(path: Path, size: tuple[int, int] = (64, 64), caption: str | None = "a tag, b tag") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def problem_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(("ERROR", "WARNING"))]


@pytest.fixture
def broken_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    image(root / "3_good" / "ok.png")
    (root / "3_good" / "corrupt.png").write_bytes(b"this is not a png")
    image(root / "3_good" / "nocap.png", caption=None)
    image(root / "3_good" / "dup.png")
    image(root / "3_good" / "dup.jpg", caption=None)  # dup.png's caption is read for it too
    image(root / "3_good" / "small.png", size=(32, 32))
    image(root / "3_good" / "anim.gif")
    image(root / "no_prefix" / "x.png")
    (root / "2_empty").mkdir()
    (root / "2_empty" / "notes.txt").write_text("no images here")
    return root


# --- subprocess: what a user runs --------------------------------------------------------


def test_demo_dataset_report(demo_dataset_dir: Path) -> None:
    result = run_cli(str(demo_dataset_dir), "--resolution", "64", "--batch-size", "2", "--epochs", "3",
                     "--seconds-per-step", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = [line.split() for line in out.splitlines()]
    assert ["4_atelier", "orb", "4", "5", "5", "20"] in lines
    assert ["6_atelier", "cube", "6", "6", "5", "36"] in lines
    assert ["total", "11", "10", "56"] in lines
    assert "steps per epoch: 28" in out  # ceil(56 / 2), one bucket
    assert "total steps: 84  (3 epochs)" in out
    assert "estimated training time: 2m 48s" in out  # 84 x 2 s
    assert ["0", "64x64", "11", "56"] in lines
    assert ["atelier", "cube", "6"] in lines and ["atelier", "orb", "5"] in lines
    assert problem_lines(out) == [
        "WARNING  6_atelier cube/cube_06.png: missing caption cube_06.txt; "
        "trained with the folder's class tokens 'atelier cube'"
    ]
    assert out.rstrip().endswith("Result: OK, see the warnings above.")


def test_broken_dataset_lists_every_problem_and_fails(broken_dataset: Path) -> None:
    result = run_cli(str(broken_dataset), "--resolution", "64")
    assert result.returncode == 1
    problems = problem_lines(result.stdout)
    expected = [
        ("ERROR", "3_good/corrupt.png: corrupt image"),
        ("WARNING", "2_empty: no png/jpg/jpeg/webp/bmp images"),
        ("WARNING", "3_good/anim.gif: unsupported format .gif"),
        ("WARNING", "3_good/corrupt.png: missing caption corrupt.txt"),
        ("WARNING", "3_good/dup: dup.jpg, dup.png share one caption file (dup.txt)"),
        ("WARNING", "3_good/nocap.png: missing caption nocap.txt; trained with the folder's class tokens 'good'"),
        ("WARNING", "3_good/small.png: 32x32 is smaller than its 64x64 bucket and is upscaled x2.00"),
        ("WARNING", "no_prefix: no repeat-count prefix"),
    ]
    for severity, text in expected:
        assert any(line.startswith(severity) and text in line for line in problems), (text, problems)
    assert len(problems) == len(expected)
    assert "Problems: 1 error(s), 7 warning(s)" in result.stdout
    assert "Result: training would stop" in result.stdout
    # 6 images, 4 with a caption file (dup.jpg reads dup.txt); the 5 readable ones x 3 repeats.
    assert ["3_good", "3", "6", "4", "15"] in [line.split() for line in result.stdout.splitlines()]


def test_image_folder_instead_of_parent_fails(tmp_path: Path) -> None:
    folder = tmp_path / "10_dog"
    image(folder / "a.png")
    result = run_cli(str(folder))
    assert result.returncode == 1
    assert "this is an image folder" in result.stdout
    assert "Concept folders" not in result.stdout


def test_help_has_an_example() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "example:" in result.stdout and "atelier dataset check data/train" in result.stdout
    assert "--seconds-per-step" in result.stdout and "--from-run" in result.stdout


# --- in-process: the remaining cases ---------------------------------------------------------


def test_missing_folder_and_empty_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = check(capsys, tmp_path / "nope")
    assert code == 1 and "the dataset folder does not exist" in out
    (tmp_path / "empty").mkdir()
    code, out = check(capsys, tmp_path / "empty")
    assert code == 1 and "no training images" in out


def test_warnings_only_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image(tmp_path / "1_x" / "a.png", caption="")
    image(tmp_path / "loose.png")
    (tmp_path / "1_x" / "nested").mkdir()
    code, out = check(capsys, tmp_path, "--resolution", "64")
    assert code == 0
    problems = problem_lines(out)
    assert any("1_x/a.png: empty caption file; trained with the folder's class tokens 'x'" in p for p in problems)
    assert any("loose.png: image directly in the dataset folder is ignored" in p for p in problems)
    assert any("1_x/nested: nested folder" in p for p in problems)


def test_buckets_and_time_from_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "train"
    for i in range(3):
        image(root / "2_x" / f"square{i}.png", (512, 512))
    image(root / "2_x" / "wide.png", (1000, 500))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "seconds_per_step": 1.5}))
    code, out = check(capsys, root, "--enable-bucket", "--batch-size", "4", "--epochs", "2", "--from-run", run_dir,
                      "--resolution", "512", "--min-bucket-reso", "256", "--max-bucket-reso", "1024",
                      "--bucket-reso-steps", "64")  # fmt: skip
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert ["8", "512x512", "3", "6"] in lines  # sd-scripts' bucket numbers, counts with repeats
    assert ["11", "704x320", "1", "2"] in lines
    assert "steps per epoch: 3  (batch size 4; sum over 2 bucket(s)" in out  # ceil(6/4) + ceil(2/4)
    assert "total steps: 6" in out
    assert "estimated training time: 0m 09s" in out
    assert "Problems: none" in out


def test_no_upscale_and_rectangular_resolution(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image(tmp_path / "1_x" / "small.png", (300, 200))
    code, out = check(capsys, tmp_path, "--resolution", "512,512", "--enable-bucket", "--bucket-no-upscale",
                      "--bucket-reso-steps", "64")  # the default config is the tiny model's 16 px steps
    assert code == 0
    assert "256x192" in out and "upscaled" not in out


def test_bad_arguments_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image(tmp_path / "1_x" / "a.png")
    assert main(["dataset", "check", str(tmp_path), "--from-run", str(tmp_path / "no-run")]) == 2
    assert "summary.json does not exist" in capsys.readouterr().err
    assert main(["dataset", "check", str(tmp_path), "--resolution", "abc"]) == 2
    assert "resolution must be like 512" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["dataset", "check", str(tmp_path), "--batch-size", "0"])
    assert exit_info.value.code == 2
