"""Loss masks (training.masked_loss): an image's alpha channel or a mask image beside it.

sd-scripts' two sources (library/train_util.py):
- dataset.alpha_mask (--alpha_mask): the image's alpha, 0..1 (an image without alpha: all ones);
- dataset.conditioning_data_dir (its dataset-config subset key): a mask image of the same
  file stem per training image, whose R channel (0..255 -> 0..1) is the mask.

A mask goes through the image's own scale, crop and flip (augment.place_on_bucket with the
same seed), then is area-averaged to the latent size; the loss multiplies by it
(atelier.objective.losses.apply_masked_loss). The RGB pixels and so the latents and their
cache keys do not depend on the mask: a run with masks reuses the latent cache of one without.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from atelier.data.augment import load_training_mask
from atelier.data.buckets import Resolution
from atelier.data.dataset import ImageItem
from atelier.data.images import is_image_file, upright_size
from atelier.errors import DatasetError

CONDITIONING_DATA_DIR_KEY = "dataset.conditioning_data_dir"
_MAX_NAMED = 10  # missing masks named in one message


def mask_folder(conditioning_dir: Path, item: ImageItem) -> Path:
    """Where item's mask is looked for: <conditioning_data_dir>/<its concept folder>/ when that
    folder exists (the train_data_dir layout mirrored), else conditioning_data_dir itself (one
    flat folder, as an sd-scripts subset's conditioning_data_dir is)."""
    mirrored = conditioning_dir / item.folder_name
    return mirrored if mirrored.is_dir() else conditioning_dir


# What is wrong with an image's mask -> how the refusal says it and its fix.
_PROBLEMS = {
    "missing": ("have no mask file", "add a mask of the same file stem (white = trained, black = ignored)"),
    "doubled": ("have more than one mask file", "keep one mask per image"),
    "resized": ("have a mask of another size", "save each mask at its image's size"),
}


def find_mask_files(items: Sequence[ImageItem], conditioning_dir: str | Path) -> dict[Path, Path]:
    """image path -> its mask file (same stem, any image extension) for every item.

    Raises DatasetError naming the folder when it does not exist, and every image without a
    mask, with two masks, or with a mask of another size (sd-scripts asserts all three).
    """
    found, problems = match_masks(items, conditioning_dir)
    for kind, (what, fix) in _PROBLEMS.items():
        named = [f"{path}: {text}" for path, problem, text in problems if problem == kind]
        if named:
            shown = named[:_MAX_NAMED] + ([f"... and {len(named) - _MAX_NAMED} more"]
                                          if len(named) > _MAX_NAMED else [])  # fmt: skip
            raise DatasetError(f"{len(named)} image(s) under {CONDITIONING_DATA_DIR_KEY}={conditioning_dir} {what} "
                               f"({fix}):\n  - " + "\n  - ".join(shown))  # fmt: skip
    return found


def match_masks(items: Sequence[ImageItem], conditioning_dir: str | Path
                ) -> tuple[dict[Path, Path], list[tuple[Path, str, str]]]:  # fmt: skip
    """(image path -> mask file, [(image path, problem kind, what is wrong)]); the kinds are
    _PROBLEMS' keys. DatasetError when the folder does not exist."""
    root = Path(conditioning_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{CONDITIONING_DATA_DIR_KEY}={conditioning_dir}: no such folder; it holds one mask "
                           "image per training image (same file stem); fix the path or drop the key")  # fmt: skip
    listings: dict[Path, dict[str, list[Path]]] = {}
    found: dict[Path, Path] = {}
    problems: list[tuple[Path, str, str]] = []
    for item in items:
        folder = mask_folder(root, item)
        if folder not in listings:
            listings[folder] = _by_stem(folder)
        candidates = listings[folder].get(item.path.stem, [])
        if not candidates:
            problems.append((item.path, "missing", f"no mask {folder / item.path.stem}.<png|jpg|webp|...>"))
        elif len(candidates) > 1:
            problems.append((item.path, "doubled", "masks " + ", ".join(str(p) for p in candidates)))
        elif upright_size(candidates[0]) != upright_size(item.path):
            problems.append((item.path, "resized", f"{_size(item.path)}, its mask {candidates[0]} is "
                                                   f"{_size(candidates[0])}"))  # fmt: skip
        else:
            found[item.path] = candidates[0]
    return found, problems


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    stems: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if is_image_file(path):
            stems.setdefault(path.stem, []).append(path)
    return stems


def _size(path: Path) -> str:
    width, height = upright_size(path)
    return f"{width}x{height}"


def open_mask(image_path: Path, mask_path: Path | None) -> Image.Image:
    """The 8-bit (mode L) upright mask of an image: its mask file's R channel, or without one the
    image's alpha (all 255 when it has none), as sd-scripts reads them."""
    source = mask_path if mask_path is not None else image_path
    try:
        with Image.open(source) as img:
            upright = ImageOps.exif_transpose(img)
            if mask_path is not None:
                return upright.convert("RGB").getchannel("R")
            if upright.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in upright.info:
                return upright.convert("RGBA").getchannel("A")
            return Image.new("L", upright.size, 255)
    except OSError as exc:
        raise DatasetError(f"Cannot read the mask of {image_path} from {source}: {exc}") from exc


@dataclass(frozen=True)
class MaskOptions:
    """How masks are cut: the image's own augmentation settings."""

    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    interpolation: str | None = None


class MaskSource:
    """The masks of a batch, [B, h, w] at the latent size, cut as the batch's images are.

    mask_files: image path -> mask file (conditioning_data_dir); an image not in it (a reg
    image) gets its alpha when `alpha` (dataset.alpha_mask), else all ones. Without
    per-step crops a mask is the same every step: kept in memory (latent size, small).
    """

    def __init__(self, mask_files: dict[Path, Path] | None, alpha: bool, options: MaskOptions):
        self.mask_files = mask_files or {}
        self.alpha = alpha
        self.options = options
        self._fixed = not options.random_crop and options.face_crop_aug_range is None
        self._memo: dict[tuple[Path, Resolution, bool, tuple[int, int]], torch.Tensor] = {}

    def mask(self, path: Path, bucket: Resolution, flip: bool, seed: int, size: tuple[int, int]) -> torch.Tensor:
        """One image's mask [h, w] (size = (h, w), the latent's), values 0..1."""
        key = (path, bucket, flip, size)
        if self._fixed and key in self._memo:
            return self._memo[key]
        mask_path = self.mask_files.get(path)
        if mask_path is None and not self.alpha:
            return torch.ones(size)
        o = self.options
        pixels = load_training_mask(open_mask(path, mask_path), path, bucket, flip=flip, random_crop=o.random_crop,
                                    seed=seed, face_crop_aug_range=o.face_crop_aug_range,
                                    interpolation=o.interpolation)  # fmt: skip
        # sd-scripts: interpolate(mode="area") to the loss's size, i.e. the mean over each latent pixel.
        mask = F.interpolate(pixels[None, None], size=size, mode="area")[0, 0]
        if self._fixed:
            self._memo[key] = mask
        return mask

    def batch(self, paths: Sequence[Path], buckets: Sequence[Resolution], flips: Sequence[bool],
              seeds: Sequence[int], size: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        return torch.stack([self.mask(*args, size) for args in zip(paths, buckets, flips, seeds, strict=True)])


__all__ = ["MaskOptions", "MaskSource", "find_mask_files", "mask_folder", "match_masks", "open_mask"]
