"""Draw the embedded demo dataset: two kohya concept folders of small procedural images.

    python scripts/make_demo_dataset.py            # writes atelier/assets/demo_dataset/
    python scripts/make_demo_dataset.py --force    # rewrites it in place

Everything is drawn from the table below with PIL and numpy (no randomness, no
external assets), so the same Pillow build always writes the same bytes. One image
deliberately has no caption file, to exercise the class-token caption fallback.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from atelier.utils.atomic import write_bytes, write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "atelier" / "assets" / "demo_dataset"

# Drawn at this multiple of the final size, then downscaled: cheap anti-aliasing.
SUPERSAMPLE = 4

COLOURS = {
    "red": (205, 45, 40),
    "green": (60, 165, 75),
    "blue": (45, 90, 200),
    "yellow": (235, 200, 50),
    "purple": (130, 70, 170),
    "orange": (235, 130, 40),
    "teal": (40, 150, 150),
    "pink": (235, 150, 185),
    "white": (235, 235, 235),
    "grey": (140, 140, 145),
    "black": (25, 25, 30),
    "dark blue": (25, 35, 80),
}

# Where the subject's centre sits, as fractions of the width and height.
POSITIONS = {
    "centered": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.35),
    "bottom": (0.5, 0.62),
}


@dataclass(frozen=True)
class DemoImage:
    folder: str
    filename: str
    size: tuple[int, int]
    subject: str  # "cube" or "orb"
    colour: str
    background: str
    position: str
    captioned: bool = True


CUBES = "6_atelier cube"
ORBS = "4_atelier orb"

DEMO_IMAGES = (
    DemoImage(CUBES, "cube_01.png", (64, 64), "cube", "red", "blue", "centered"),
    DemoImage(CUBES, "cube_02.png", (80, 80), "cube", "green", "white", "left"),
    DemoImage(CUBES, "cube_03.jpg", (96, 64), "cube", "yellow", "purple", "right"),
    DemoImage(CUBES, "cube_04.png", (64, 64), "cube", "blue", "orange", "top"),
    DemoImage(CUBES, "cube_05.png", (72, 72), "cube", "purple", "grey", "bottom"),
    DemoImage(CUBES, "cube_06.png", (64, 80), "cube", "orange", "teal", "centered", captioned=False),
    DemoImage(ORBS, "orb_01.png", (64, 64), "orb", "red", "black", "centered"),
    DemoImage(ORBS, "orb_02.jpg", (80, 80), "orb", "blue", "yellow", "left"),
    DemoImage(ORBS, "orb_03.png", (96, 64), "orb", "green", "pink", "right"),
    DemoImage(ORBS, "orb_04.png", (64, 64), "orb", "white", "dark blue", "top"),
    DemoImage(ORBS, "orb_05.png", (72, 72), "orb", "orange", "green", "centered"),
)


def caption_for(spec: DemoImage) -> str:
    return f"atelier {spec.subject}, {spec.colour}, {spec.background} background, {spec.position}"


def render(spec: DemoImage) -> Image.Image:
    width, height = (side * SUPERSAMPLE for side in spec.size)
    fx, fy = POSITIONS[spec.position]
    centre = (fx * width, fy * height)
    radius = 0.26 * min(width, height)
    canvas = _background(width, height, COLOURS[spec.background])
    _draw_shadow(canvas, centre, radius)
    draw_subject = _draw_cube if spec.subject == "cube" else _draw_orb
    draw_subject(canvas, centre, radius, COLOURS[spec.colour])
    return canvas.resize(spec.size, Image.Resampling.LANCZOS)


def _background(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    # A gentle top-to-bottom darkening reads as a floor/wall rather than flat paint.
    shade = np.linspace(1.08, 0.82, height)[:, None, None]
    pixels = np.clip(np.array(colour, dtype=np.float64)[None, None, :] * shade, 0, 255)
    return Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))


def _draw_shadow(canvas: Image.Image, centre: tuple[float, float], radius: float) -> None:
    cx, cy = centre
    shadow = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(shadow).ellipse(
        (cx - radius, cy + 0.8 * radius, cx + 1.1 * radius, cy + 1.2 * radius), fill=90
    )
    canvas.paste((0, 0, 0), mask=shadow)


def _draw_cube(canvas: Image.Image, centre: tuple[float, float], radius: float, colour: tuple[int, int, int]) -> None:
    """An isometric cube: three faces lit from the top left."""
    cx, cy = centre
    dx = radius * math.cos(math.radians(30))
    top, bottom = (cx, cy - radius), (cx, cy + radius)
    mid = (cx, cy)
    upper_left, upper_right = (cx - dx, cy - radius / 2), (cx + dx, cy - radius / 2)
    lower_left, lower_right = (cx - dx, cy + radius / 2), (cx + dx, cy + radius / 2)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([top, upper_right, mid, upper_left], fill=_scale(colour, 1.3))
    draw.polygon([upper_left, mid, bottom, lower_left], fill=_scale(colour, 1.0))
    draw.polygon([mid, upper_right, lower_right, bottom], fill=_scale(colour, 0.6))


def _draw_orb(canvas: Image.Image, centre: tuple[float, float], radius: float, colour: tuple[int, int, int]) -> None:
    """A sphere with diffuse and specular shading from a light at the top left."""
    cx, cy = centre
    ys, xs = np.mgrid[0 : canvas.height, 0 : canvas.width].astype(np.float64)
    nx, ny = (xs + 0.5 - cx) / radius, (ys + 0.5 - cy) / radius
    inside = nx**2 + ny**2 <= 1.0
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.0, 1.0))
    light = np.array([-0.45, -0.55, 0.7])
    light /= np.linalg.norm(light)
    diffuse = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, 1.0)
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    specular = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0.0, 1.0) ** 30
    shaded = np.array(colour, dtype=np.float64) * (0.2 + 0.8 * diffuse)[..., None] + 200.0 * specular[..., None]
    orb = Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8))
    canvas.paste(orb, mask=Image.fromarray((inside * 255).astype(np.uint8)))


def _scale(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(min(255, round(channel * factor)) for channel in colour)


def encode(img: Image.Image, filename: str) -> bytes:
    buffer = io.BytesIO()
    if filename.endswith(".jpg"):
        img.save(buffer, format="JPEG", quality=90)
    else:
        img.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_dataset(out: Path, force: bool = False) -> list[Path]:
    """Write every demo image and caption under `out`; returns the files written."""
    if out.is_file():
        raise SystemExit(f"error: {out} is a file; pass a folder to write the demo dataset into.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: {out} is not empty; pass --force to rewrite the demo dataset in it.")
    written = []
    for spec in DEMO_IMAGES:
        image_path = out / spec.folder / spec.filename
        caption_path = image_path.with_suffix(".txt")
        write_bytes(image_path, encode(render(spec), spec.filename))
        written.append(image_path)
        if spec.captioned:
            write_text(caption_path, caption_for(spec) + "\n")
            written.append(caption_path)
        else:
            # With --force, a caption left from an older layout would defeat the fallback case.
            caption_path.unlink(missing_ok=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite the demo files in a non-empty folder")
    args = parser.parse_args(argv)
    written = write_dataset(args.out, force=args.force)
    total_kb = sum(path.stat().st_size for path in written) / 1024
    print(f"wrote {len(written)} files ({total_kb:.1f} KB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
