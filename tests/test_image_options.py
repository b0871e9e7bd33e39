"""sd-scripts' image options: face_crop_aug_range (crops around the face a file name gives)
and resize_interpolation (the filter that scales images, honoured by the latent cache)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from atelier.data.augment import load_training_pixels
from atelier.data.buckets import resize_and_crop_to_bucket
from atelier.data.face_crop import Face, face_crop, face_in_name, face_scale
from atelier.data.images import open_rgb, resize_to_cover, to_tensor
from atelier.data.latent_cache import LatentCache, can_cache_latents, latent_key
from atelier.errors import DatasetError
from atelier.network.lora_file import load_lora
from tests.test_dataset_pipeline import NO_SAMPLES, data_for, vae  # noqa: F401
from tests.test_trainer import fresh_accelerate_state, train  # noqa: F401

FACE = (255, 0, 0)


def face_image(folder: Path, name: str, size=(256, 256), face=(200, 60, 40)) -> Path:
    """A grey image with a red square `face` = (cx, cy, side) at the place its name gives."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (128, 128, 128))
    cx, cy, side = face
    img.paste(FACE, (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2))
    path = folder / f"{name}_{cx}_{cy}_{side}_{side}.png"
    img.save(path)
    return path


def test_the_face_comes_from_the_file_name():
    assert face_in_name(Path("a/photo_10_20_30_40.png")) == Face(10, 20, 30, 40)
    for name in ("photo.png", "my_cool_photo_of_dog.png", "x_0_20_30_40.png", "x_5_5_0_0.png"):
        assert face_in_name(Path(name)) is None, name


def test_the_face_is_scaled_into_the_range():
    # 400 px image, 64 px crop, a 100 px face, range [2, 4]: the face becomes 64/4..64/2 px.
    scales = {face_scale((400, 400), (64, 64), 100, (2.0, 4.0), random.Random(seed)) for seed in range(50)}
    assert min(scales) >= 0.16 and max(scales) <= 0.32 and len(scales) == 50
    # Never enlarged past its size, never below the scale that covers the crop.
    assert face_scale((400, 400), (64, 64), 10, (2.0, 4.0), random.Random(0)) == 1.0
    assert face_scale((100, 100), (64, 64), 90, (2.0, 4.0), random.Random(0)) == 0.64


def test_the_crop_is_centred_on_the_face(tmp_path):
    path = face_image(tmp_path, "img")
    # Range [2, 2]: scale 64 / (40 * 2) = 0.8, no jitter; the 32 px face sits in the middle.
    crop = face_crop(open_rgb(path), (64, 64), face_in_name(path), (2.0, 2.0), False, random.Random(0))
    assert crop.size == (64, 64)
    assert crop.getpixel((32, 32)) == FACE and crop.getpixel((2, 2)) != FACE
    pixels = load_training_pixels(path, (64, 64), seed=0, face_crop_aug_range=(2.0, 2.0))
    assert torch.equal(pixels, to_tensor(crop))
    # random_crop moves the window around the face, from the sample's seed.
    moved = {load_training_pixels(path, (64, 64), random_crop=True, seed=s, face_crop_aug_range=(2.0, 2.0)).sum().item()
             for s in range(6)}  # fmt: skip
    assert len(moved) > 1


def test_images_without_a_face_in_their_name_are_cropped_as_usual(tmp_path):
    Image.new("RGB", (96, 64), (10, 200, 30)).save(tmp_path / "plain.png")
    path = tmp_path / "plain.png"
    with_option = load_training_pixels(path, (64, 64), face_crop_aug_range=(2.0, 4.0))
    assert torch.equal(with_option, load_training_pixels(path, (64, 64)))


def test_resize_interpolation_picks_the_filter_and_the_default_is_unchanged():
    img = Image.linear_gradient("L").convert("RGB").resize((97, 61))
    default = resize_to_cover(img, 64, 64)
    assert default.size == (102, 64)
    assert default.tobytes() == img.resize((102, 64), Image.Resampling.LANCZOS).tobytes()
    nearest = img.resize((102, 64), Image.Resampling.NEAREST)
    assert resize_to_cover(img, 64, 64, "nearest").tobytes() == nearest.tobytes()
    crop, _ = resize_and_crop_to_bucket(img, (64, 64), interpolation="area")
    assert crop.size == (64, 64) and crop.tobytes() != resize_and_crop_to_bucket(img, (64, 64))[0].tobytes()


def test_the_latent_cache_keys_and_encodes_with_the_filter(tmp_path, vae):  # noqa: F811
    from atelier.data.latents import PixelJob, StepEncoder

    key = dict(image_sha256="ab", bucket=(64, 64), flipped=False, vae_id="v", sample_posterior=True)
    assert latent_key(**key) == latent_key(**key, interpolation=None)  # old caches stay valid
    assert latent_key(**key, interpolation="bicubic") != latent_key(**key)
    Image.linear_gradient("L").convert("RGB").resize((96, 80)).save(tmp_path / "img.png")
    item = SimpleNamespace(path=tmp_path / "img.png")
    cache = LatentCache(vae, None, False, interpolation="nearest")
    cache.build([item], [(64, 64)], progress=False)
    # Encoded every step with the same filter: the same latent (and posterior noise) as the cache.
    encoder = StepEncoder(vae, [item.path], torch.device("cpu"), random_crop=False, color_aug=False,
                          interpolation="nearest")  # fmt: skip
    per_step = next(encoder.encode([PixelJob((item.path,), ((64, 64),), (False,), (0,))], [[0]]))
    assert torch.equal(per_step[0], cache.get(0))
    plain = LatentCache(vae, None, False)
    plain.build([item], [(64, 64)], progress=False)
    assert not torch.equal(plain.get(0), cache.get(0))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.face_crop_aug_range=[4.0,2.0]"], "dataset.face_crop_aug_range must be [low, high] with 0 < low"),
        (["dataset.face_crop_aug_range=[2.0]"], "dataset.face_crop_aug_range must be [low, high]"),
        (["dataset.face_crop_aug_range=[2.0,4.0]", "dataset.enable_bucket=true"], "set dataset.enable_bucket=false"),
    ],
)
def test_face_crop_options_that_cannot_work_are_named(overrides, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data_for(*overrides)


def test_face_crops_change_pixels_every_step_so_latents_are_not_cached():
    allowed, reason = can_cache_latents(False, False, face_crop=True)
    assert not allowed and "face_crop_aug_range" in reason


def test_face_crop_and_resize_interpolation_train_and_are_recorded(tmp_path, caplog):
    root = tmp_path / "data"
    for i, face in enumerate([(200, 60, 40), (60, 180, 50)]):
        face_image(root / "2_face", f"img{i}", face=face)
    caplog.set_level(logging.INFO)
    options = ["dataset.face_crop_aug_range=[2.0,4.0]", "dataset.resize_interpolation=bicubic"]
    run_dir, summary = train(tmp_path, f"dataset.train_data_dir={root}", *options, "training.max_train_steps=2",
                             NO_SAMPLES)  # fmt: skip
    assert summary["status"] == "completed"
    assert "Latent caching is disabled: face_crop_aug_range" in caplog.text
    meta = load_lora(run_dir / "demo.safetensors")[1]
    assert meta["ss_face_crop_aug_range"] == "(2.0, 4.0)" and meta["ss_resize_interpolation"] == "bicubic"
    assert meta["ss_cache_latents"] == "False"
    plain, _ = train(tmp_path, "training.max_train_steps=1", NO_SAMPLES, name="plain")
    assert not {"ss_face_crop_aug_range", "ss_resize_interpolation"} & set(load_lora(plain / "demo.safetensors")[1])
