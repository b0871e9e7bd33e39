"""Image files: which ones count, checking they decode, loading them as tensors."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dataclasses import dataclass

from atelier.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Image formats people drop into datasets that sd-scripts does not train on; naming
# them in a warning beats ignoring them without a word.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".gif", ".tif", ".tiff", ".avif", ".heic", ".jxl"})

# PIL reports a broken file through many exception types depending on the codec.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

# PIL's verify() checks nothing for these formats (it does check PNG chunks and WebP).
_VERIFY_IS_A_NO_OP = frozenset({"JPEG", "MPO", "BMP", "DIB"})

_WHITE = (255, 255, 255)

# dataset.resize_interpolation -> PIL's filter. sd-scripts scales with OpenCV for all but
# lanczos; cv2's INTER_AREA (area) is the pixel-area average, PIL's BOX when shrinking.
RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class ImageLimits:
    """Sizes an image may have, checked from its header before anything is decoded: a
    tiny file can declare a huge or absurdly thin image that would take all memory once
    scaled to the training resolution. Defaults match dataset.max_image_pixels/_aspect_ratio."""

    # PIL's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): what decodes anyway.
    max_pixels: int = 178_956_970
    # Wider than any bucket (the 256..1024 defaults give 4:1); a 1x200000 sliver is not an image.
    max_aspect_ratio: float = 16.0


def header_problem(path: Path, limits: ImageLimits) -> str | None:
    """Why the image's declared size is refused (naming the key to raise), or None.

    Image.open reads only the header, so this costs the same for a 12000x12000 image.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
    except _DECODE_ERRORS:
        return None  # unreadable_reason explains it
    if width < 1 or height < 1:
        return f"its header declares {width}x{height} pixels, an empty image"
    if width * height > limits.max_pixels:
        return (
            f"{width}x{height} = {width * height:,} pixels is more than dataset.max_image_pixels="
            f"{limits.max_pixels}; downscale the image or raise dataset.max_image_pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        return (
            f"{width}x{height} has an aspect ratio of {ratio:.0f}:1, more than dataset.max_aspect_ratio="
            f"{limits.max_aspect_ratio:g}; crop the image or raise dataset.max_aspect_ratio"
        )
    return None


def is_image_file(path: Path) -> bool:
    return _has_visible_suffix(path, IMAGE_EXTENSIONS)


def is_unsupported_image_file(path: Path) -> bool:
    return _has_visible_suffix(path, UNSUPPORTED_IMAGE_EXTENSIONS)


def _has_visible_suffix(path: Path, suffixes: frozenset[str]) -> bool:
    # Dot files beside images are editor/OS metadata (e.g. macOS `._img.png`), never images.
    return path.suffix.lower() in suffixes and not path.name.startswith(".") and path.is_file()


def unreadable_reason(path: Path, limits: ImageLimits | None = None) -> str | None:
    """Why PIL cannot read the image (or its header is refused by `limits`), or None when
    it looks intact.

    Cheap enough to run on every image at scan time; a file that still fails to
    decode later is reported by load_image.
    """
    refused = header_problem(path, limits or ImageLimits())
    if refused is not None:
        return refused
    try:
        with Image.open(path) as img:
            if img.format in _VERIFY_IS_A_NO_OP:
                # Decoding at 1/8 scale still walks the whole JPEG stream, so a truncated
                # download is caught for ~1/10 of the cost of a full decode.
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
            else:
                img.verify()
    except _DECODE_ERRORS as exc:
        return _describe(exc)
    return None


def unreadable_images_message(problems: list[tuple[Path, str]]) -> str:
    lines = [f"{len(problems)} image(s) cannot be read:"]
    lines += [f"  - {path}: {reason}" for path, reason in problems]
    lines.append("Re-export these files (e.g. save them again as PNG) or remove them from the dataset.")
    return "\n".join(lines)


def load_image(path: str | Path, width: int, height: int) -> torch.Tensor:
    """Load an image as a float32 RGB tensor [3, height, width] with values in [-1, 1].

    The image is upright per its EXIF orientation, scaled to cover width x height with
    its aspect ratio kept, then centre-cropped to exactly that size.
    """
    if width < 1 or height < 1:
        raise ValueError(f"load_image needs a positive size, got {width}x{height}")
    rgb = open_rgb(Path(path))
    return to_tensor(center_crop(resize_to_cover(rgb, width, height), width, height))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparent pixels become white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _high_bit_depth_to_l(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        # White, not black: a transparent cut-out on black teaches the LoRA dark halos.
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_cover(img: Image.Image, width: int, height: int, interpolation: str | None = None) -> Image.Image:
    """Scale (aspect kept) to the smallest size that covers width x height."""
    scale = max(width / img.width, height / img.height)
    # max() guards against rounding landing one pixel short of the target.
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if new_size == img.size:
        return img
    return resample(img, new_size, scale < 1, interpolation)


def resample(img: Image.Image, size: tuple[int, int], shrinking: bool, interpolation: str | None = None) -> Image.Image:
    """img scaled to size with the filter dataset.resize_interpolation names (RESAMPLING); by
    default Lanczos, which shrinks big photos in cheap integer steps first (reducing_gap)."""
    if interpolation is not None:
        return img.resize(size, RESAMPLING[interpolation])
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0 if shrinking else None)


def center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 [3, H, W] in [-1, 1], the range the VAE expects."""
    pixels = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own conversion clips 16-bit grey at 255, which turns the image white.
    # Integer maths a band of rows at a time: a float64 copy of a 12000x12000 scan
    # alone took 1.1 GB; this needs the 8-bit result and one band.
    low, high = img.getextrema()
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top in range(0, img.height, _ROWS_PER_BAND):
        band = np.asarray(img.crop((0, top, img.width, min(img.height, top + _ROWS_PER_BAND))))
        if high > 255:  # round(v / 257): 0..65535 onto 0..255
            band = (np.clip(band, 0, 65535).astype(np.uint32) + 128) // 257
        out[top : top + band.shape[0]] = np.clip(band, 0, 255)
    return Image.fromarray(out)


_ROWS_PER_BAND = 256


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# EXIF orientations 5-8 rotate by 90 degrees: the upright image has width and height swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as load_image will see it, read from the header without decoding.

    Only EXIF already parsed with the header counts: PIL's PNG getexif() would decode
    the whole image to look for a trailing eXIf chunk, which defeats the point.
    """
    with Image.open(path) as img:
        width, height = img.size
        raw_exif = img.info.get("exif")
    if raw_exif:
        exif = Image.Exif()
        exif.load(raw_exif)
        if exif.get(_EXIF_ORIENTATION_TAG, 1) in _SWAPPED_ORIENTATIONS:
            return height, width
    return width, height


def open_rgb(path: Path, data: bytes | None = None) -> Image.Image:
    """The image upright and in RGB, decoded from `data` when given (else read from path).

    Decoding bytes that were already read (and hashed) guarantees both describe the
    same file content, even if the file changes meanwhile.
    """
    source = io.BytesIO(data) if data is not None else path
    try:
        with Image.open(source) as img:
            return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError as exc:
        raise DatasetError(f"Image {path} does not exist (was it moved or deleted after the scan?).") from exc
    except _DECODE_ERRORS as exc:
        raise DatasetError(
            f"Cannot read image {path}: {_describe(exc)}. "
            "Re-export it (e.g. save it again as PNG) or remove it from the dataset."
        ) from exc


def crop_at(img: Image.Image, width: int, height: int, left: int, top: int) -> Image.Image:
    """The width x height window whose top-left corner is (left, top); it must fit in img."""
    if not (0 <= left <= img.width - width and 0 <= top <= img.height - height):
        raise ValueError(f"crop {width}x{height} at ({left}, {top}) does not fit in a {img.width}x{img.height} image")
    return img.crop((left, top, left + width, top + height))


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLimits",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "center_crop",
    "crop_at",
    "header_problem",
    "is_image_file",
    "is_unsupported_image_file",
    "load_image",
    "open_rgb",
    "RESAMPLING",
    "resample",
    "resize_to_cover",
    "to_rgb",
    "to_tensor",
    "unreadable_images_message",
    "unreadable_reason",
    "upright_size",
]
