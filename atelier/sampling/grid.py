"""Comparison grids: a labelled table of images.

`grid_image` is the generic table (any rows, e.g. runs of a sweep, by any columns, e.g.
epochs); `make_grid` fills it from a samples folder: one row per prompt, one column per
epoch (or step), each cell the latest sample taken there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from atelier.sampling.manifest import read_manifest
from atelier.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

# Default cell sizes: tiny 64 px samples are enlarged so labels stay in proportion, and
# large ones shrunk so a grid of many epochs stays a reasonable file.
MIN_CELL, MAX_CELL = 128, 512
MARGIN, GAP = 8, 4
HEADER_LINES = 2
MAX_LABEL_CHARS = 300
BACKGROUND, TEXT, MISSING = (255, 255, 255), (0, 0, 0), (225, 225, 225)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Where a long label may wrap: at spaces, or after -, _, / and , (run names, tag lists).
_WRAP_PIECE = re.compile(r"(\s*)([^\s\-_/,]+[\-_/,]*|[\-_/,]+)")


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: title, header row of column labels, label column, cells."""

    n_rows: int
    n_cols: int
    cell_w: int
    cell_h: int
    label_w: int
    header_h: int
    title_h: int
    margin: int = MARGIN
    gap: int = GAP

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * self.margin + self.label_w + self.n_cols * (self.gap + self.cell_w)
        height = 2 * self.margin + self.title_h + self.header_h + self.n_rows * (self.gap + self.cell_h)
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.margin + self.label_w + self.gap + col * (self.gap + self.cell_w)
        y = self.margin + self.title_h + self.header_h + self.gap + row * (self.gap + self.cell_h)
        return x, y, x + self.cell_w, y + self.cell_h

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.cell_box(row, 0)
        return self.margin, y0, self.margin + self.label_w, y1

    def col_label_box(self, col: int) -> tuple[int, int, int, int]:
        x0, _, x1, _ = self.cell_box(0, col)
        y = self.margin + self.title_h
        return x0, y, x1, y + self.header_h

    def title_box(self) -> tuple[int, int, int, int]:
        return self.margin, self.margin, self.size[0] - self.margin, self.margin + self.title_h


def default_cell_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """A cell that holds the largest image, its longer side brought into MIN_CELL..MAX_CELL."""
    if not sizes:
        return MIN_CELL, MIN_CELL
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    longest = max(width, height)
    scale = min(MAX_CELL, max(MIN_CELL, longest)) / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_layout(
    n_rows: int,
    n_cols: int,
    cell_size: tuple[int, int],
    title: str | None = None,
    font_size: int | None = None,
) -> GridLayout:
    """The geometry `grid_image` uses for these counts, cell size, title and font size."""
    cell_w, cell_h = cell_size
    font_size = font_size or default_font_size(cell_size)
    label_w = font_size * 14  # about 25 characters a line
    line_h = _line_height(_font(font_size))
    header_h = HEADER_LINES * line_h + GAP
    width = 2 * MARGIN + label_w + n_cols * (GAP + cell_w)
    title_h = 0
    if title:
        title_font = _font(font_size + 4)
        title_lines = _wrap(title, title_font, width - 2 * MARGIN, max_lines=3)
        title_h = len(title_lines) * _line_height(title_font) + GAP
    return GridLayout(n_rows, n_cols, cell_w, cell_h, label_w, header_h, title_h)


def default_font_size(cell_size: tuple[int, int]) -> int:
    return min(28, max(14, cell_size[1] // 8))


def grid_image(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    *,
    cell_size: tuple[int, int] | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """Lay images out as a labelled table; None (or a short row) leaves a grey "missing" cell.

    Images are fitted into a common cell keeping their aspect ratio; by default the cell
    is `default_cell_size` of all images.
    """
    _check_table(rows, row_labels, col_labels)
    if cell_size is None:
        cell_size = default_cell_size([im.size for row in rows for im in row if im is not None])
    layout = grid_layout(len(rows), len(col_labels), cell_size, title, font_size)
    font_size = font_size or default_font_size(cell_size)
    font = _font(font_size)

    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_text(draw, title, layout.title_box(), _font(font_size + 4), center=True)
    for col, label in enumerate(col_labels):
        _draw_text(draw, label, layout.col_label_box(col), font, center=True)
    for row, (label, images) in enumerate(zip(row_labels, rows)):
        _draw_text(draw, label, layout.row_label_box(row), font, center=False)
        for col in range(len(col_labels)):
            image = images[col] if col < len(images) else None
            _draw_cell(canvas, draw, image, layout.cell_box(row, col), font)
    return canvas


def make_grid(samples_dir: Path, out_path: Path, title: str | None = None) -> Path | None:
    """Grid of a samples folder's manifest (prompts x epochs); None when there are no samples."""
    samples_dir = Path(samples_dir)
    records = [r for r in read_manifest(samples_dir) if _sample_exists(samples_dir, r)]
    if not records:
        return None
    row_keys, col_keys, cells = latest_cells(records)
    cell_size = default_cell_size([(r["width"], r["height"]) for r in cells.values()])
    rows = [
        [_load_fitted(samples_dir / cells[r, c]["file"], cell_size) if (r, c) in cells else None for c in col_keys]
        for r in row_keys
    ]
    image = grid_image(
        rows,
        row_labels=[prompt or "(empty prompt)" for _, prompt in row_keys],
        col_labels=[f"{kind} {number}" for kind, number in col_keys],
        title=title,
        cell_size=cell_size,
    )
    save_image(image, Path(out_path))
    return Path(out_path)


RowKey = tuple[int, str]  # (prompt index, prompt)
ColKey = tuple[str, int]  # ("epoch" or "step", number)
Cells = dict[tuple[RowKey, ColKey], dict[str, Any]]


def latest_cells(records: Sequence[dict[str, Any]]) -> tuple[list[RowKey], list[ColKey], Cells]:
    """Rows, columns in training order, and the latest record of each cell (the manifest
    lists samples in the order they were taken)."""
    cells: Cells = {}
    first_step: dict[ColKey, int] = {}
    for record in records:
        row: RowKey = (int(record["index"]), str(record["prompt"]))
        col = column_key(record)
        cells[row, col] = record
        first_step[col] = min(first_step.get(col, record["step"]), record["step"])
    row_keys = sorted({row for row, _ in cells})
    col_keys = sorted(first_step, key=lambda col: (first_step[col], col))
    return row_keys, col_keys, cells


def column_key(record: dict[str, Any]) -> ColKey:
    """("epoch", n) for end-of-epoch samples, ("step", n) for those taken every n steps."""
    return ("epoch", int(record["epoch"])) if record.get("epoch") is not None else ("step", int(record["step"]))


def save_image(image: Image.Image, path: Path) -> None:
    # The temp file has no image suffix, so the format is taken from the target's.
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def _check_table(rows: Sequence[Sequence[Any]], row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    if not rows or not col_labels:
        raise ValueError("a grid needs at least one row and one column")
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    widest = max(len(row) for row in rows)
    if widest > len(col_labels):
        raise ValueError(f"a row has {widest} cells but there are only {len(col_labels)} column labels")


def _sample_exists(samples_dir: Path, record: dict[str, Any]) -> bool:
    if (samples_dir / record["file"]).is_file():
        return True
    logger.warning("sample %s is listed in the manifest but missing; left out of the grid", record["file"])
    return False


def _load_fitted(path: Path, cell_size: tuple[int, int]) -> Image.Image:
    """Load an image already fitted to its cell, so a long run's grid never holds full-size copies."""
    with Image.open(path) as image:
        return ImageOps.contain(image.convert("RGB"), cell_size, Image.Resampling.LANCZOS)


Box = tuple[int, int, int, int]


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, image: Image.Image | None, box: Box, font: Font) -> None:
    x0, y0, x1, y1 = box
    if image is None:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=MISSING)
        _draw_text(draw, "missing", box, font, center=True)
        return
    fitted = ImageOps.contain(image.convert("RGB"), (x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    canvas.paste(fitted, (x0 + (x1 - x0 - fitted.width) // 2, y0 + (y1 - y0 - fitted.height) // 2))


def _draw_text(draw: ImageDraw.ImageDraw, text: str, box: Box, font: Font, center: bool) -> None:
    """Wrap `text` into the box (an ellipsis marks a cut); centred vertically, optionally horizontally."""
    x0, y0, x1, y1 = box
    line_h = _line_height(font)
    lines = _wrap(text[:MAX_LABEL_CHARS], font, x1 - x0, max_lines=max(1, (y1 - y0) // line_h))
    y = y0 + (y1 - y0 - len(lines) * line_h) // 2
    for line in lines:
        x = x0 + (x1 - x0 - font.getlength(line)) / 2 if center else x0
        draw.text((x, y), line, fill=TEXT, font=font)
        y += line_h


def _wrap(text: str, font: Font, max_width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for match in _WRAP_PIECE.finditer(text):
        separator, word = (" " if match.group(1) else ""), match.group(2)
        for piece in _split_to_width(word, font, max_width):
            candidate = f"{current}{separator}{piece}" if current else piece
            if font.getlength(candidate) <= max_width:
                current = candidate
            else:
                lines.append(current)
                current = piece
            separator = ""
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, max_width)
    return lines


def _split_to_width(word: str, font: Font, max_width: int) -> list[str]:
    """A word wider than the box is cut into pieces that fit."""
    pieces: list[str] = []
    while word and font.getlength(word) > max_width:
        cut = len(word) - 1
        while cut > 1 and font.getlength(word[:cut]) > max_width:
            cut -= 1
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word] if word else pieces


def _ellipsize(line: str, font: Font, max_width: int) -> str:
    while line and font.getlength(line + "…") > max_width:
        line = line[:-1]
    return line.rstrip() + "…"


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _line_height(font: Font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom + max(2, bottom // 5)
