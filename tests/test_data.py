"""The dataset layer: kohya-layout scanning, captions, image loading, step maths."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from atelier.data import (
    DatasetError,
    ImageItem,
    epoch_order,
    expand_repeats,
    load_image,
    parse_concept_folder_name,
    scan_dataset,
    steps_per_epoch,
    total_steps,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save_image(path: Path, size: tuple[int, int] = (16, 16), colour=RED, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def write_caption(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.write_text(text, encoding=encoding)


def load_script():
    """scripts/ is not a package: import the script from its path."""
    name = "make_demo_dataset"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "make_demo_dataset.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- the shipped demo dataset -------------------------------------------------------


def test_demo_dataset_counts_and_repeats(demo_dataset_dir: Path) -> None:
    index = scan_dataset(demo_dataset_dir)
    assert index.root == demo_dataset_dir.resolve()
    assert [f.name for f in index.folders] == ["4_atelier orb", "6_atelier cube"]
    assert [(f.repeats, f.class_tokens, f.num_images) for f in index.folders] == [
        (4, "atelier orb", 5),
        (6, "atelier cube", 6),
    ]
    assert index.num_images == 11
    assert index.num_train_samples == 4 * 5 + 6 * 6
    suffixes = {item.path.suffix for item in index.items}
    assert suffixes == {".png", ".jpg"}


def test_demo_dataset_captions_and_fallback(demo_dataset_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(demo_dataset_dir)
    captions = {item.path.name: item.caption for item in index.items}
    assert captions["cube_01.png"] == "atelier cube, red, blue background, centered"
    assert captions["orb_02.jpg"] == "atelier orb, blue, yellow background, left"
    # cube_06 ships without a caption: it falls back to the folder's class tokens.
    assert captions["cube_06.png"] == "atelier cube"
    fallback = [r.getMessage() for r in caplog.records if "cube_06.png" in r.getMessage()]
    assert len(fallback) == 1 and "class tokens 'atelier cube'" in fallback[0]
    assert all(r.name == "atelier.data" for r in caplog.records)
    assert index.warnings == [r.getMessage() for r in caplog.records]


def test_demo_dataset_order_is_deterministic(demo_dataset_dir: Path) -> None:
    first, second = scan_dataset(demo_dataset_dir), scan_dataset(str(demo_dataset_dir))
    assert first.items == second.items
    names = [item.path.name for item in first.items]
    assert names[:5] == ["orb_01.png", "orb_02.jpg", "orb_03.png", "orb_04.png", "orb_05.png"]
    assert names[5:] == sorted(names[5:])
    assert all(item.path.is_absolute() for item in first.items)


def test_demo_dataset_metadata(demo_dataset_dir: Path) -> None:
    index = scan_dataset(demo_dataset_dir)
    freq = index.tag_frequency()
    assert set(freq) == {"4_atelier orb", "6_atelier cube"}
    assert freq["6_atelier cube"]["atelier cube"] == 6
    assert freq["6_atelier cube"]["red"] == 1
    assert freq["6_atelier cube"]["centered"] == 1  # cube_06's fallback caption has no position
    assert freq["4_atelier orb"]["centered"] == 2
    assert freq["4_atelier orb"]["dark blue background"] == 1
    assert index.dataset_dirs() == {
        "4_atelier orb": {"n_repeats": 4, "img_count": 5},
        "6_atelier cube": {"n_repeats": 6, "img_count": 6},
    }


def test_demo_dataset_loads_and_stays_small(demo_dataset_dir: Path) -> None:
    index = scan_dataset(demo_dataset_dir)
    sizes = {Image.open(item.path).size for item in index.items}
    assert any(w != h for w, h in sizes), "the demo set needs a non-square image"
    for item in index.items:
        pixels = load_image(item.path, 48, 48)
        assert pixels.shape == (3, 48, 48) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    total = sum(path.stat().st_size for path in demo_dataset_dir.rglob("*") if path.is_file())
    assert total < 200 * 1024


def test_demo_script_matches_shipped_dataset(tmp_path: Path, demo_dataset_dir: Path) -> None:
    script = load_script()
    script.main(["--out", str(tmp_path / "a")])
    script.main(["--out", str(tmp_path / "b")])
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(demo_dataset_dir) for p in demo_dataset_dir.rglob("*") if p.is_file())
    assert files_a == shipped
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        if rel.suffix == ".txt":
            assert (tmp_path / "a" / rel).read_text() == (demo_dataset_dir / rel).read_text()


def test_demo_script_refuses_non_empty_dir_without_force(tmp_path: Path) -> None:
    script = load_script()
    keep = tmp_path / "notes.md"
    keep.write_text("mine")
    with pytest.raises(SystemExit, match="not empty; pass --force"):
        script.main(["--out", str(tmp_path)])
    assert not (tmp_path / "6_atelier cube").exists()
    stale = tmp_path / "6_atelier cube" / "cube_06.txt"
    save_image(tmp_path / "6_atelier cube" / "cube_06.png")
    write_caption(stale, "left over")
    script.main(["--out", str(tmp_path), "--force"])
    assert keep.read_text() == "mine"
    assert not stale.exists(), "--force must keep the deliberately uncaptioned image uncaptioned"


# --- steps and sample order -----------------------------------------------------------


def test_steps_per_epoch_is_ceil() -> None:
    assert steps_per_epoch(16, 3) == 6
    assert steps_per_epoch(15, 3) == 5
    assert steps_per_epoch(1, 8) == 1
    assert steps_per_epoch(0, 4) == 0
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(16, 0)


def test_total_steps_ceils_accumulation_per_epoch() -> None:
    assert total_steps(6, 10) == 60
    assert total_steps(6, 10, gradient_accumulation_steps=4) == 20  # ceil(6 / 4) = 2 per epoch
    assert total_steps(7, 3, 2) == 12
    assert total_steps(8, 3, 2) == 12
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        total_steps(6, 10, 0)


def test_expand_repeats() -> None:
    items = [ImageItem(Path("a.png"), "a", "2_a", 2), ImageItem(Path("b.png"), "b", "3_b", 3)]
    assert expand_repeats(items) == [0, 0, 1, 1, 1]
    assert expand_repeats([]) == []


def test_epoch_order_is_reproducible_and_depends_on_epoch() -> None:
    first = epoch_order(50, seed=42, epoch=3)
    torch.manual_seed(0)  # the global RNG must not matter
    torch.rand(10)
    assert epoch_order(50, seed=42, epoch=3) == first
    assert sorted(first) == list(range(50))
    assert epoch_order(50, seed=42, epoch=4) != first
    assert epoch_order(50, seed=7, epoch=3) != first
    assert epoch_order(0, seed=1, epoch=0) == []


# --- load_image ------------------------------------------------------------------------


def striped_image(path: Path, size: tuple[int, int]) -> Path:
    """Blue edges, white field, a red stripe a tenth of the width wide in the middle."""
    width, height = size
    img = Image.new("RGB", size, WHITE)
    img.paste(BLUE, (0, 0, width // 8, height))
    img.paste(BLUE, (width - width // 8, 0, width, height))
    img.paste(RED, (width // 2 - width // 20, 0, width // 2 + width // 20, height))
    img.save(path)
    return path


def test_load_image_crops_the_centre_of_a_wide_image(tmp_path: Path) -> None:
    path = striped_image(tmp_path / "wide.png", (192, 64))
    pixels = load_image(path, 32, 32)  # cover: 192x64 -> 96x32, then crop the middle 32
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    centre = pixels[:, 16, 16]
    assert centre[0] > 0.9 and centre[1] < -0.8 and centre[2] < -0.8  # the red stripe survived
    blue = (pixels[2] > 0.5) & (pixels[0] < -0.5)
    assert not blue.any(), "the blue edges should have been cropped away"


def test_load_image_tall_target_and_upscale(tmp_path: Path) -> None:
    path = striped_image(tmp_path / "wide.png", (48, 24))
    pixels = load_image(path, 24, 48)  # cover a tall target: upscale to 96x48, crop 24 wide
    assert pixels.shape == (3, 48, 24)
    assert pixels[0, 24, 12] > 0.9 and pixels[2, 24, 12] < -0.8
    assert not ((pixels[2] > 0.5) & (pixels[0] < -0.5)).any()


def test_load_image_converts_modes(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    rgba.save(tmp_path / "rgba.png")
    pixels = load_image(tmp_path / "rgba.png", 8, 8)
    assert torch.allclose(pixels[:, 4, 6], torch.ones(3))  # transparent -> white
    assert torch.allclose(pixels[:, 4, 1], torch.tensor([-1.0, -1.0, 1.0]))

    save_image(tmp_path / "grey.png", colour=128, mode="L")
    grey = load_image(tmp_path / "grey.png", 8, 8)
    assert grey.shape == (3, 8, 8) and torch.allclose(grey[0], grey[2])

    palette = Image.new("RGB", (8, 8), (0, 200, 0)).convert("P")
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png", 8, 8)[1, 0, 0] > 0.5

    Image.new("I;16", (8, 8), 30000).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png", 8, 8)
    assert -0.2 < deep[0, 0, 0] < 0.0  # 30000 / 65535 of full scale, not clipped to white


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends up on top
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = load_image(tmp_path / "rotated.jpg", 20, 40)
    assert pixels.shape == (3, 40, 20)
    assert pixels[0, 5, 10] > 0.8 and pixels[2, 5, 10] < -0.6
    assert pixels[2, 35, 10] > 0.8 and pixels[0, 35, 10] < -0.6


def test_load_image_corrupt_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(bad, 8, 8)
    truncated = tmp_path / "cut.jpg"
    save_image(tmp_path / "whole.jpg", size=(64, 64))
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    with pytest.raises(DatasetError, match="cut.jpg"):
        load_image(truncated, 8, 8)


# --- captions ---------------------------------------------------------------------------


def test_caption_file_is_stripped_and_first_line_wins(tmp_path: Path) -> None:
    save_image(tmp_path / "3_dog" / "a.png")
    write_caption(tmp_path / "3_dog" / "a.txt", "\ufeff  a dog, sitting  \n\nsecond line\n")
    save_image(tmp_path / "3_dog" / "b.png")
    write_caption(tmp_path / "3_dog" / "b.caption", "from the other extension")
    index = scan_dataset(tmp_path, caption_extension="txt")
    assert [item.caption for item in index.items] == ["a dog, sitting", "dog"]
    assert scan_dataset(tmp_path, caption_extension=".caption").items[1].caption == "from the other extension"


def test_folder_names_parse_like_kohya() -> None:
    assert parse_concept_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_concept_folder_name("2_a_b") == (2, "a_b")
    assert parse_concept_folder_name("5") == (5, "")
    assert parse_concept_folder_name("dog") is None
    assert parse_concept_folder_name("x_10_dog") is None


def test_no_caption_and_no_class_tokens_gives_empty_caption(tmp_path: Path, caplog) -> None:
    save_image(tmp_path / "5" / "lonely.png")
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(tmp_path)
    assert index.items[0].caption == ""
    assert "lonely.png" in caplog.text and "EMPTY caption" in caplog.text


def test_non_utf8_caption_is_an_error(tmp_path: Path) -> None:
    save_image(tmp_path / "1_cat" / "a.png")
    (tmp_path / "1_cat" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"a\.txt is not valid UTF-8"):
        scan_dataset(tmp_path)


# --- user errors ------------------------------------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as err:
        scan_dataset(missing)
    message = str(err.value)
    assert "dataset.train_data_dir" in message and str(missing.resolve()) in message
    assert "10_<concept>" in message


def test_relative_missing_dir_shows_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="working directory") as err:
        scan_dataset("data/train")
    assert str(tmp_path.resolve() / "data" / "train") in str(err.value)


def test_file_instead_of_dir(tmp_path: Path) -> None:
    file = save_image(tmp_path / "photo.png")
    with pytest.raises(DatasetError, match="must be a folder") as err:
        scan_dataset(file)
    assert str(file.resolve()) in str(err.value)


def test_image_folder_instead_of_parent(tmp_path: Path) -> None:
    save_image(tmp_path / "img1.png")
    save_image(tmp_path / "img2.jpg")
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path)
    message = str(err.value)
    assert "this looks like an image folder" in message
    assert "`10_<concept>`" in message and "pass its parent" in message
    assert "img1.png" in message


def test_loose_images_beside_concept_folders_are_ignored_with_warning(tmp_path: Path, caplog) -> None:
    save_image(tmp_path / "stray.png")
    save_image(tmp_path / "2_cat" / "a.png")
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(tmp_path)
    assert [item.path.name for item in index.items] == ["a.png"]
    assert "stray.png" in caplog.text


def test_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty dataset") as err:
        scan_dataset(tmp_path)
    assert str(tmp_path.resolve()) in str(err.value)
    (tmp_path / "10_dog").mkdir()
    (tmp_path / "10_dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="'10_dog' contains no"):
        scan_dataset(tmp_path)


def test_folder_without_prefix_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    save_image(tmp_path / "dog" / "a.png")
    save_image(tmp_path / "3_cat" / "b.png")
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(tmp_path)
    assert [f.name for f in index.folders] == ["3_cat"]
    assert "'dog'" in caplog.text and "`10_dog`" in caplog.text
    assert any("`10_dog`" in w for w in index.warnings)


def test_only_unprefixed_folders_is_an_empty_dataset_that_says_rename(tmp_path: Path) -> None:
    save_image(tmp_path / "dog" / "a.png")
    with pytest.raises(DatasetError, match="empty dataset") as err:
        scan_dataset(tmp_path)
    assert "rename it to e.g. `10_dog`" in str(err.value)


def test_zero_repeat_folder_is_skipped(tmp_path: Path, caplog) -> None:
    save_image(tmp_path / "0_dog" / "a.png")
    save_image(tmp_path / "1_cat" / "b.png")
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(tmp_path)
    assert [f.name for f in index.folders] == ["1_cat"]
    assert "0 repeats" in caplog.text


def test_unsupported_extensions_are_ignored(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "2_cat"
    save_image(folder / "a.PNG")
    save_image(folder / "b.gif")
    save_image(folder / "c.webp")
    (folder / "d.npz").write_bytes(b"latent cache")
    (folder / ".hidden.png").write_bytes(b"macOS resource fork")
    with caplog.at_level(logging.WARNING, logger="atelier.data"):
        index = scan_dataset(tmp_path)
    assert [item.path.name for item in index.items] == ["a.PNG", "c.webp"]
    assert "b.gif" in caplog.text and "unsupported format" in caplog.text
    assert "d.npz" not in caplog.text


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    save_image(tmp_path / "2_cat" / "good.png")
    (tmp_path / "2_cat" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path)
    message = str(err.value)
    assert "1 image(s) cannot be read" in message
    assert str(tmp_path.resolve() / "2_cat" / "bad.png") in message
    assert "good.png" not in message


def test_all_corrupt_images_are_named_in_one_error(tmp_path: Path) -> None:
    save_image(tmp_path / "2_cat" / "good.png", size=(32, 32))
    (tmp_path / "2_cat" / "garbage.jpg").write_bytes(b"\x00" * 64)
    whole = (tmp_path / "2_cat" / "good.png").read_bytes()
    (tmp_path / "3_dog").mkdir()
    (tmp_path / "3_dog" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path)
    message = str(err.value)
    assert "2 image(s) cannot be read" in message
    assert "garbage.jpg" in message and "truncated.png" in message
    assert "good.png" not in message
    assert "Re-export" in message


def test_truncated_jpeg_is_caught_at_scan_time(tmp_path: Path) -> None:
    # PIL's verify() accepts a truncated JPEG, the most common broken download.
    noisy = Image.effect_noise((128, 128), 64).convert("RGB")
    noisy.save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    save_image(tmp_path / "1_cat" / "ok.jpg")
    (tmp_path / "1_cat" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.jpg"):
        scan_dataset(tmp_path)
