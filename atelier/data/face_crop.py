"""sd-scripts' face_crop_aug_range: crop around the face whose position the file name gives.

sd-scripts' tools/detect_face_rotate.py writes crops named `<name>_<cx>_<cy>_<w>_<h>.<ext>`
(the face's centre and size in pixels). With face_crop_aug_range=[low, high], each time
such an image is drawn it is scaled so the face is between 1/high and 1/low of the
shorter training side (never enlarged past its size unless it must be to cover the
crop), then cropped around the face with a little jitter (a lot with random_crop). The
behaviour follows sd-scripts' BaseDataset.crop_target; the draws come from the sample's
own `random.Random`, so a sample is the same image in every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from atelier.data.images import crop_at, resample

# sd-scripts jitters the face position only for faces at least this big (pixels) ...
_MIN_JITTER_FACE = 40
# ... and bigger than this fraction of the shorter training side; by up to 1/20 of the face.
_JITTER_FACE_FRACTION = 10
_JITTER_DIVISOR = 20


@dataclass(frozen=True)
class Face:
    cx: int
    cy: int
    width: int
    height: int

    @property
    def size(self) -> int:
        return max(self.width, self.height)


def face_in_name(path: Path) -> Face | None:
    """The face a `<name>_<cx>_<cy>_<w>_<h>` file name gives, or None (another name, no face).

    sd-scripts reads the last four `_` parts as integers and uses them when cx > 0; a name
    whose parts are not integers is an ordinary image here rather than an error.
    """
    parts = path.stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, width, height = (int(part) for part in parts[-4:])
    except ValueError:
        return None
    face = Face(cx, cy, width, height)
    return face if cx > 0 and face.size > 0 else None


def face_scale(image_size: tuple[int, int], target: tuple[int, int], face_size: int,
               aug_range: tuple[float, float], rng: random.Random) -> float:  # fmt: skip
    """The scale of this draw: the face becomes short/high..short/low pixels (short: the shorter
    target side), capped at 1 (no enlarging) but never below the scale that covers the target."""
    cover = max(target[0] / image_size[0], target[1] / image_size[1])
    short = min(target)
    low = max(cover, min(1.0, short / (face_size * aug_range[1])))
    high = max(low, min(1.0, short / (face_size * aug_range[0])))
    return low if low >= high else rng.uniform(low, high)


def crop_start(length: int, target: int, face_pos: int, face_size: int, short: int,
               aug_range: tuple[float, float], random_crop: bool, rng: random.Random) -> int:  # fmt: skip
    """Where the crop starts on one axis: centred on the face; random_crop moves it by a
    triangular draw in -reach..reach (reach: the face's distance to the farther edge), else a
    range wider than one value moves a big face by up to 1/20 of its size; kept inside the image."""
    start = face_pos - target // 2
    if random_crop:
        reach = max(length - face_pos, face_pos)
        start += rng.randint(0, reach) + rng.randint(0, reach) - reach
    elif aug_range[0] != aug_range[1] and face_size > short // _JITTER_FACE_FRACTION and face_size >= _MIN_JITTER_FACE:
        start += rng.randint(-face_size // _JITTER_DIVISOR, face_size // _JITTER_DIVISOR)
    return max(0, min(start, length - target))


def face_crop(img: Image.Image, target: tuple[int, int], face: Face, aug_range: tuple[float, float],
              random_crop: bool, rng: random.Random, interpolation: str | None = None) -> Image.Image:  # fmt: skip
    """The target-sized (width, height) crop around `face`, scaled by one draw of face_scale."""
    width, height = target
    if img.size == target:
        return img
    scale = face_scale(img.size, target, face.size, aug_range, rng)
    size = (max(width, int(img.width * scale + 0.5)), max(height, int(img.height * scale + 0.5)))
    scaled = img if size == img.size else resample(img, size, scale < 1, interpolation)
    cx, cy = int(face.cx * scale + 0.5), int(face.cy * scale + 0.5)
    short = min(target)
    # sd-scripts draws the vertical offset first.
    top = crop_start(size[1], height, cy, face.size, short, aug_range, random_crop, rng)
    left = crop_start(size[0], width, cx, face.size, short, aug_range, random_crop, rng)
    return crop_at(scaled, width, height, left, top)


__all__ = ["Face", "crop_start", "face_crop", "face_in_name", "face_scale"]
