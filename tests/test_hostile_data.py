"""Datasets built to hurt ([14] point 5): images refused by their header before decoding,
16-bit scans converted without a float64 copy, absurd repeat counts counted not expanded,
symlinks out of the dataset folder refused, a LoRA rank wider than its layer named."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier.cli import main
from atelier.data.dataset import scan_dataset
from atelier.errors import DatasetError
from atelier.data.images import ImageLimits
from tests.helpers import REPO_ROOT, run_train
from tests.test_dataset_check import image


def check(capsys: pytest.CaptureFixture, root: Path) -> tuple[int, list[str]]:
    code = main(["dataset", "check", str(root)])
    out = capsys.readouterr().out
    return code, [line.strip() for line in out.splitlines() if line.strip().startswith("ERROR")]


def failure_reason(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["reason"]


@pytest.fixture
def sliver(tmp_path: Path) -> Path:
    """The issue's 1x200000 px PNG: under a kilobyte on disk, 52 G pixels once scaled to 512 wide."""
    root = tmp_path / "train"
    image(root / "1_x" / "ok.png")
    path = root / "1_x" / "sliver.png"
    Image.new("L", (1, 200_000)).save(path)
    assert path.stat().st_size < 1000
    return root


def test_a_sliver_image_is_refused_from_its_header_naming_file_and_key(sliver):
    started = time.perf_counter()
    with pytest.raises(DatasetError) as error:
        scan_dataset(sliver)
    assert time.perf_counter() - started < 5
    assert "sliver.png" in str(error.value) and "dataset.max_aspect_ratio" in str(error.value)
    # Raising the key lets it through (the user's call).
    scan_dataset(sliver, limits=ImageLimits(max_aspect_ratio=300_000))


def test_training_on_a_sliver_stops_before_the_model_with_little_memory(sliver, tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    proc = run_train("dataset=folder", f"dataset.train_data_dir={sliver}", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - started < 60
    output = proc.stdout + proc.stderr
    assert "sliver.png" in output and "dataset.max_aspect_ratio" in output, output[-2000:]


def test_too_many_pixels_is_refused_naming_the_key(tmp_path):
    root = tmp_path / "train"
    image(root / "1_x" / "big.png", size=(300, 300))
    with pytest.raises(DatasetError, match=r"big\.png.*dataset\.max_image_pixels"):
        scan_dataset(root, limits=ImageLimits(max_pixels=300 * 299))
    scan_dataset(root, limits=ImageLimits(max_pixels=300 * 300))


def test_a_12000px_16_bit_png_converts_in_integers(tmp_path):
    """Decoding a 12000x12000 16-bit grey PNG and making it RGB peaks well under what a
    float64 copy alone (1.15 GB) would take; the values are scaled, not clipped white."""
    path = tmp_path / "scan.png"
    ramp = (np.arange(12000, dtype=np.uint32) * 65535 // 11999).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (12000, 12000)).copy()).save(path, compress_level=1)
    code = f"""
import resource, numpy as np
from pathlib import Path
from atelier.data.images import open_rgb
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rgb = open_rgb(Path({str(path)!r}))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(*rgb.size, rgb.mode, rgb.getpixel((0, 0))[0], rgb.getpixel((11999, 0))[0], rgb.getpixel((6000, 0))[0], grown // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    w, h, mode, first, last, middle, grown_mb = proc.stdout.split()
    assert (int(w), int(h), mode) == (12000, 12000, "RGB")
    assert (int(first), int(last)) == (0, 255) and 120 <= int(middle) <= 135
    # The decoded I;16 image (288 MB), its uint32 copy (576 MB) and the RGB result (432 MB),
    # never all at once; the float64 conversion needed 1.15 GB on top of the decoded image.
    assert int(grown_mb) < 1100, f"peak grew by {grown_mb} MB"


@pytest.fixture
def huge_repeats(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    image(root / "1000000000_x" / "a.png")
    image(root / "1000000000_x" / "b.png")
    return root


def test_a_billion_repeats_is_refused_naming_folder_and_key(huge_repeats):
    started = time.perf_counter()
    with pytest.raises(DatasetError) as error:
        scan_dataset(huge_repeats, max_samples_per_epoch=10_000_000)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "1000000000_x" in message and "dataset.max_samples_per_epoch" in message
    assert "2,000,000,000 samples" in message


def test_dataset_check_reports_a_billion_repeats_as_an_error(huge_repeats, capsys):
    code, errors = check(capsys, huge_repeats)
    assert code == 1
    assert any("dataset.max_samples_per_epoch" in line and "1000000000_x" in line for line in errors), errors


def test_training_with_a_billion_repeats_stops_at_once(huge_repeats, tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    proc = run_train("dataset=folder", f"dataset.train_data_dir={huge_repeats}", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - started < 60
    assert "dataset.max_samples_per_epoch" in proc.stdout + proc.stderr


def test_dataset_check_reports_header_refusals(sliver, capsys):
    code, errors = check(capsys, sliver)
    assert code == 1
    assert any("sliver.png" in line and "dataset.max_aspect_ratio" in line for line in errors), errors


@pytest.fixture
def linked_out(tmp_path: Path) -> Path:
    """A shared dataset whose caption is a link to a file outside it (a secret, say)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the ssh key")
    root = tmp_path / "train"
    image(root / "1_x" / "a.png", caption=None)
    (root / "1_x" / "a.txt").symlink_to(secret)
    return root


def test_a_caption_linking_outside_the_dataset_is_refused_naming_the_link(linked_out):
    with pytest.raises(DatasetError) as error:
        scan_dataset(linked_out)
    message = str(error.value)
    assert str(linked_out / "1_x" / "a.txt") in message and "outside the dataset folder" in message
    assert "the ssh key" not in message


def test_an_image_linking_outside_the_dataset_is_refused_naming_the_link(tmp_path, capsys):
    elsewhere = image(tmp_path / "elsewhere" / "photo.png", caption=None)
    root = tmp_path / "train"
    image(root / "1_x" / "a.png")
    (root / "1_x" / "b.png").symlink_to(elsewhere)
    with pytest.raises(DatasetError, match=r"b\.png is a symbolic link .*outside the dataset folder"):
        scan_dataset(root)
    code, errors = check(capsys, root)
    assert code == 1 and any("b.png" in line and "outside the dataset folder" in line for line in errors), errors


def test_links_inside_the_dataset_are_fine(tmp_path, capsys):
    root = tmp_path / "train"
    image(root / "1_x" / "a.png")
    (root / "1_x" / "b.png").symlink_to(root / "1_x" / "a.png")
    (root / "1_x" / "b.txt").symlink_to(root / "1_x" / "a.txt")
    index = scan_dataset(root)
    assert [item.caption for item in index.items] == ["a tag, b tag"] * 2
    assert check(capsys, root)[0] == 0


def test_dataset_check_reports_a_linked_caption(linked_out, capsys):
    code, errors = check(capsys, linked_out)
    assert code == 1 and any("a.txt" in line and "outside the dataset folder" in line for line in errors), errors


def test_a_rank_wider_than_a_layer_names_the_layer_before_allocating(tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    proc = run_train("network.dim=100000", "training.max_train_steps=1", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - started < 60
    reason = failure_reason(run_dir)
    assert "network.dim=100000 is more than the width of layer lora_" in reason, reason
    assert "Set network.dim to 32 or less" in reason or "or less" in reason
