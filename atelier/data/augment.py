"""Per-step image augmentations (sd-scripts' flip_aug, random_crop, color_aug, face_crop_aug_range).

Every random choice comes from the `random.Random` it is given, so a sample drawn
with the same seed is the same image in every run, also in a DataLoader worker.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from atelier.data.buckets import Resolution, resize_and_crop_to_bucket
from atelier.data.face_crop import face_crop, face_in_name
from atelier.data.images import open_rgb, to_tensor

# sd-scripts' color_aug: with probability 0.33 one of two changes, chosen 50/50:
# a hue rotation of up to 8 on OpenCV's 0-180 hue scale (+-16 degrees), or a gamma
# in [0.95, 1.05]. sd-scripts applies that gamma to raw 0-255 values, which can
# brighten or darken far more than 5%; here it acts on [0, 1] values as intended.
COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8.0  # on a 0-180 scale, as OpenCV and sd-scripts count hue
GAMMA_RANGE = (0.95, 1.05)


def color_aug(img: Image.Image, rng: random.Random) -> Image.Image:
    """The image, sometimes with its hue rotated or its gamma changed (see above)."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return img
    if rng.random() > 0.5:
        return shift_hue(img, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT) / 180.0)
    return apply_gamma(img, rng.uniform(*GAMMA_RANGE))


def shift_hue(img: Image.Image, turns: float) -> Image.Image:
    """Rotate the hue by `turns` of the colour wheel (0.5 = complementary colours)."""
    hsv = np.asarray(img.convert("HSV"), dtype=np.int32).copy()
    hsv[..., 0] = (hsv[..., 0] + round(turns * 256)) % 256
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def apply_gamma(img: Image.Image, gamma: float) -> Image.Image:
    values = np.asarray(img, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(np.rint(values**gamma * 255.0), 0, 255).astype(np.uint8))


def load_training_pixels(
    path: Path,
    bucket: Resolution,
    *,
    flip: bool = False,
    random_crop: bool = False,
    color: bool = False,
    seed: int = 0,
    face_crop_aug_range: tuple[float, float] | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """The image as the VAE sees it: [3, h, w] in [-1, 1], cropped to its bucket.

    Order as in the latent cache: scale to cover (with `interpolation`'s filter), crop
    (centre, random from `seed`, or around the face the file name gives with
    face_crop_aug_range), mirror, then colour. Without random_crop, color and face crops,
    `seed` is unused.
    """
    rng = random.Random(seed)
    image = place_on_bucket(open_rgb(path), path, bucket, flip, random_crop, rng, face_crop_aug_range, interpolation)
    if color:
        image = color_aug(image, rng)
    return to_tensor(image)


def place_on_bucket(img: Image.Image, path: Path, bucket: Resolution, flip: bool, random_crop: bool,
                    rng: random.Random, face_crop_aug_range: tuple[float, float] | None = None,
                    interpolation: str | None = None) -> Image.Image:  # fmt: skip
    """img scaled, cropped and mirrored onto its bucket: the geometry of load_training_pixels.

    The draws depend only on the sizes, so a mask of the image's size given the same `rng`
    state is cut exactly as the image is (load_training_mask).
    """
    face = face_in_name(path) if face_crop_aug_range is not None else None
    if face is not None:
        image = face_crop(img, bucket, face, face_crop_aug_range, random_crop, rng, interpolation)
    else:
        image, _ = resize_and_crop_to_bucket(img, bucket, random_crop, rng if random_crop else None, interpolation)
    return ImageOps.mirror(image) if flip else image


def load_training_mask(
    mask: Image.Image,
    path: Path,
    bucket: Resolution,
    *,
    flip: bool = False,
    random_crop: bool = False,
    seed: int = 0,
    face_crop_aug_range: tuple[float, float] | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """The 8-bit mask (mode L, the size of the image at `path`) cut as load_training_pixels cuts that
    image with the same arguments: [h, w] float32 in 0..1."""
    if mask.mode != "L":
        raise ValueError(f"a mask is a mode L image, got mode {mask.mode}")
    placed = place_on_bucket(mask, path, bucket, flip, random_crop, random.Random(seed), face_crop_aug_range,
                             interpolation)  # fmt: skip
    return torch.from_numpy(np.asarray(placed, dtype=np.uint8).copy()).to(torch.float32).div_(255.0)


__all__ = ["apply_gamma", "color_aug", "load_training_mask", "load_training_pixels", "place_on_bucket", "shift_hue"]
