"""sd-scripts' masked loss: training.masked_loss with dataset.alpha_mask (the images' alpha) or
dataset.conditioning_data_dir (a mask image per training image, its R channel)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.config.schema import LossType
from atelier.data.augment import load_training_mask, load_training_pixels
from atelier.data.dataset import ImageItem
from atelier.data.masks import find_mask_files, open_mask
from atelier.data.options import bucket_settings
from atelier.errors import ConfigError, DatasetError
from atelier.models.architectures import build_noise_scheduler
from atelier.network.lora_file import load_lora
from atelier.objective.losses import apply_masked_loss, diffusion_loss
from tests.test_dataset_pipeline import NO_SAMPLES, SMALL, data_for, make_images
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401


# ------------------------------------------------------------------------------ the loss
def test_apply_masked_loss_by_hand():
    loss = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    assert torch.equal(apply_masked_loss(loss, mask), torch.tensor([[[[1.0, 0.0], [1.5, 4.0]]]]))
    # A pixel-sized mask is area-averaged to the loss's size: each 2x2 block's mean.
    pixels = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    assert torch.equal(apply_masked_loss(loss, pixels), torch.tensor([[[[1.0, 0.5], [1.5, 4.0]]]]))
    with pytest.raises(ValueError, match="mask must be"):
        apply_masked_loss(loss, torch.ones(2, 2, 2))


@pytest.fixture(scope="module")
def scheduler():
    return build_noise_scheduler()


@pytest.mark.parametrize("loss_type", [LossType.l2, LossType.huber])
def test_an_all_ones_mask_is_the_unmasked_loss(scheduler, loss_type):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900])
    plain = diffusion_loss(pred, target, scheduler, t, 5.0, loss_type=loss_type)
    ones = diffusion_loss(pred, target, scheduler, t, 5.0, loss_type=loss_type, masks=torch.ones(3, 64, 64))
    assert torch.equal(plain, ones)


def test_a_masked_half_gives_no_gradient_and_the_mean_stays_over_all_pixels(scheduler):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.ones(2, 64, 64)
    mask[:, :, :32] = 0.0  # the left half of each image is ignored
    loss = diffusion_loss(pred, target, scheduler, torch.tensor([100, 700]), masks=mask)
    loss.backward()
    assert torch.all(pred.grad[..., :4] == 0) and torch.all(pred.grad[..., 4:] != 0)
    # sd-scripts' mean: the masked elements count as zeros (not a mean over the unmasked half).
    right = (pred.detach() - target)[..., 4:] ** 2
    assert loss.item() == pytest.approx(right.sum().item() / pred.numel(), rel=1e-6)


# ------------------------------------------------------------------------------ masks
def test_alpha_mask_reads_the_alpha_channel(tmp_path):
    rgba = np.zeros((16, 24, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :12, 3] = 255
    rgba[:, 12:, 3] = 51  # 0.2
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    mask = open_mask(tmp_path / "a.png", None)
    assert mask.mode == "L" and mask.size == (24, 16)
    assert np.array_equal(np.asarray(mask), rgba[..., 3])
    values = load_training_mask(mask, tmp_path / "a.png", (24, 16))
    assert values[:, :12].eq(1.0).all() and values[:, 12:].eq(0.2).all()
    Image.new("RGB", (24, 16), (10, 20, 30)).save(tmp_path / "b.png")
    assert np.asarray(open_mask(tmp_path / "b.png", None)).min() == 255  # no alpha: all trained


def test_a_mask_file_is_its_red_channel(tmp_path):
    Image.new("RGB", (8, 8), (128, 255, 0)).save(tmp_path / "m.png")
    assert np.asarray(open_mask(tmp_path / "img.png", tmp_path / "m.png")).max() == 128


def _items(root: Path, folder: str, count: int) -> list[ImageItem]:
    make_images(root, folder, [(64, 48)] * count)
    return [ImageItem(root / folder / f"img{i}.png", "", folder, 1) for i in range(count)]


def _masks(folder: Path, stems, size=(64, 48)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.new("RGB", size, (255, 255, 255)).save(folder / f"{stem}.png")


def test_masks_are_found_per_concept_folder_or_flat(tmp_path):
    items = _items(tmp_path / "data", "2_a", 2) + _items(tmp_path / "data", "3_b", 1)
    masks = tmp_path / "masks"
    _masks(masks / "2_a", ["img0", "img1"])  # mirrored layout for 2_a ...
    _masks(masks, ["img0"])  # ... and the flat folder for the rest
    found = find_mask_files(items, masks)
    assert found == {items[0].path: masks / "2_a" / "img0.png", items[1].path: masks / "2_a" / "img1.png",
                     items[2].path: masks / "img0.png"}  # fmt: skip


def test_a_missing_mask_or_folder_is_refused_naming_the_file(tmp_path):
    items = _items(tmp_path / "data", "2_a", 3)
    masks = tmp_path / "masks"
    _masks(masks, ["img0", "img2"])
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no mask file") as err:
        find_mask_files(items, masks)
    assert str(items[1].path) in str(err.value) and "img0.png" not in str(err.value)
    with pytest.raises(DatasetError, match="dataset.conditioning_data_dir=.*nowhere: no such folder"):
        find_mask_files(items, tmp_path / "nowhere")
    _masks(masks, ["img1"], size=(32, 32))
    with pytest.raises(DatasetError, match="have a mask of another size") as err:
        find_mask_files(items, masks)
    assert "64x48" in str(err.value) and "32x32" in str(err.value)


def test_missing_masks_fail_before_training(tmp_path):
    root = tmp_path / "data"
    make_images(root, "2_a", [(64, 64)] * 2)
    _masks(tmp_path / "masks", ["img0"], size=(64, 64))
    with pytest.raises(DatasetError, match=r"img1\.png: no mask"):
        data_for(f"dataset.train_data_dir={root}", f"dataset.conditioning_data_dir={tmp_path / 'masks'}",
                 "training.masked_loss=true")  # fmt: skip


def test_the_dataset_check_names_each_image_without_a_mask(tmp_path):
    from atelier.data.check import CheckOptions, check_dataset, render

    root = tmp_path / "data"
    make_images(root, "2_a", [(64, 64)] * 2)
    _masks(tmp_path / "masks", ["img1"], size=(64, 64))
    options = CheckOptions(bucket_settings(make_cfg().dataset), conditioning_data_dir=str(tmp_path / "masks"))
    report = check_dataset(root, ".txt", options)
    assert report.exit_code == 1
    assert [(p.where, p.severity) for p in report.inspection.problems if "mask" in p.message] == [
        ("2_a/img0.png", "error")]  # fmt: skip
    assert "no mask" in render(report)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["training.masked_loss=true"], ConfigError, "set dataset.alpha_mask=true"),
        (["dataset.conditioning_data_dir=/m"], ConfigError, "set training.masked_loss=true"),
        (["dataset.alpha_mask=true", "dataset.conditioning_data_dir=/m", "training.masked_loss=true"], DatasetError,
         "dataset.alpha_mask and dataset.conditioning_data_dir both"),
    ],
)
def test_options_that_cannot_work_are_named(overrides, error, message):
    with pytest.raises(error, match=message):
        make_cfg(*overrides)


def _grey_noise(path: Path, size) -> Image.Image:
    """A grey (R = G = B) noise image and the same values as a mode L mask."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(grey, "L").convert("RGB").save(path)
    return Image.fromarray(grey, "L")


@pytest.mark.parametrize(
    "flip, random_crop, face",
    [(False, False, None), (True, False, None), (False, True, None), (True, True, None), (True, True, (2.0, 4.0))],
)
def test_the_mask_follows_the_image_through_crop_and_flip(tmp_path, flip, random_crop, face):
    # A grey image whose mask holds its own values: any crop, scale or flip the mask misses shows.
    path = tmp_path / "img_70_40_30_30.png"  # a face at (70, 40), for face_crop_aug_range
    mask = _grey_noise(path, (150, 110))
    for seed in (0, 1, 2):
        kwargs = dict(flip=flip, random_crop=random_crop, seed=seed, face_crop_aug_range=face)
        pixels = load_training_pixels(path, (64, 64), **kwargs)
        cut = load_training_mask(mask, path, (64, 64), **kwargs)
        assert torch.equal(torch.round((pixels[0] + 1) * 127.5), torch.round(cut * 255))


# ------------------------------------------------------------------------------ training
def _first_loss(run_dir: Path) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/step" in record:
            return record["loss/step"]
    raise AssertionError("no step logged")


def _masked_dataset(tmp_path: Path, colour: tuple[int, int, int]) -> tuple[Path, Path]:
    root, masks = tmp_path / "data", tmp_path / f"masks-{colour[0]}"
    make_images(root, "2_thing", [(64, 64), (80, 64)])
    for i, size in enumerate([(64, 64), (80, 64)]):
        (masks / "2_thing").mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", size, colour)
        img.paste((0, 0, 0), (0, 0, size[0] // 2, size[1]))  # the left half: ignored
        img.save(masks / "2_thing" / f"img{i}.png")
    return root, masks


def test_cache_on_and_off_give_the_same_masked_loss(tmp_path):
    root, masks = _masked_dataset(tmp_path, (255, 255, 255))
    common = [f"dataset.train_data_dir={root}", f"dataset.conditioning_data_dir={masks}", "training.masked_loss=true",
              "training.max_train_steps=1", "dataset.flip_aug=true", SMALL, NO_SAMPLES]  # fmt: skip
    cached, _ = train(tmp_path, *common, "dataset.cache_latents=true", name="cached")
    per_step, _ = train(tmp_path, *common, "dataset.cache_latents=false", name="per_step")
    assert _first_loss(cached) == pytest.approx(_first_loss(per_step), rel=1e-5)
    unmasked, _ = train(tmp_path, *common[:1], *common[3:], name="unmasked")
    assert _first_loss(unmasked) > 1.5 * _first_loss(cached)  # about half the pixels count


def test_masked_loss_trains_and_writes_what_sd_scripts_writes(tmp_path):
    root = tmp_path / "data"
    make_images(root, "2_thing", [(64, 64), (64, 64)])
    for path in (root / "2_thing").glob("*.png"):  # alpha 0 everywhere: nothing to learn
        rgba = np.asarray(Image.open(path).convert("RGBA")).copy()
        rgba[..., 3] = 0
        Image.fromarray(rgba, "RGBA").save(path)
    run_dir, summary = train(tmp_path, f"dataset.train_data_dir={root}", "dataset.alpha_mask=true",
                             "training.masked_loss=true", "training.max_train_steps=2", SMALL, NO_SAMPLES)  # fmt: skip
    assert summary["status"] == "completed"
    assert _first_loss(run_dir) == 0.0
    weights, meta = load_lora(run_dir / "demo.safetensors")
    assert all(weights[k].abs().sum() == 0 for k in weights if k.endswith("lora_up.weight"))  # no gradient
    # sd-scripts writes no ss_* key for masked_loss or alpha_mask.
    assert not [key for key in meta if "mask" in key]
    assert meta["ss_cache_latents"] == "True"


def test_random_seeds_do_not_change_a_fixed_mask(tmp_path):
    path = tmp_path / "img.png"
    mask = _grey_noise(path, (96, 64))
    first = load_training_mask(mask, path, (64, 64), seed=random.Random(3).getrandbits(63))
    assert torch.equal(first, load_training_mask(mask, path, (64, 64), seed=5))


# ------------------------------------------------------------------------------ export / import
def test_export_kohya_and_import_kohya_keep_the_masks(tmp_path):
    from tests.test_tools_import import assert_round_trip, export_run, import_to

    data, masks = tmp_path / "data", (tmp_path / "masks").resolve()
    for folder in ("10_a", "3_b"):
        (data / folder).mkdir(parents=True)
    (masks / "10_a").mkdir(parents=True)  # 10_a's masks in their own folder, 3_b's in masks/ itself
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={data}", f"dataset.conditioning_data_dir={masks}",
                                   "training.masked_loss=true")  # fmt: skip
    subsets = (run_dir / "kohya_dataset.toml").read_text().split("[[datasets.subsets]]")[1:]
    assert [line.strip() for s in subsets for line in s.splitlines() if "conditioning_data_dir" in line] == [
        f'conditioning_data_dir = "{masks / "10_a"}"', f'conditioning_data_dir = "{masks}"']  # fmt: skip
    config = run_dir / "kohya_config.toml"
    assert "masked_loss = true" in config.read_text()
    # Read back from the subsets alone (sd-scripts' key), without the flag in the config TOML.
    lines = config.read_text().splitlines(True)
    config.write_text("".join(line for line in lines if "conditioning_data_dir" not in line))
    imported = import_to(tmp_path, config)
    assert_round_trip(original, imported, skip=("model.path", "training.cpu", "training.num_processes"))
    assert imported["dataset"]["conditioning_data_dir"] == str(masks) and imported["training"]["masked_loss"]


def test_export_kohya_and_import_kohya_keep_alpha_mask(tmp_path):
    from tests.test_tools_import import export_run, import_to

    (tmp_path / "data" / "2_a").mkdir(parents=True)
    original, run_dir = export_run(tmp_path, f"dataset.train_data_dir={tmp_path / 'data'}", "dataset.alpha_mask=true",
                                   "training.masked_loss=true")  # fmt: skip
    general = (run_dir / "kohya_dataset.toml").read_text().split("[[datasets]]")[0]
    assert "alpha_mask = true" in general
    imported = import_to(tmp_path, run_dir / "kohya_config.toml")
    assert imported["dataset"]["alpha_mask"] is True and imported["training"]["masked_loss"] is True
