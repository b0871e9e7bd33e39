"""Caption files: `<image stem><caption_extension>` beside each image, as in kohya."""

from __future__ import annotations

from pathlib import Path

from atelier.data.errors import DatasetError


def normalize_caption_extension(caption_extension: str) -> str:
    """Accept `txt` as well as `.txt`: both spellings are common in configs."""
    ext = caption_extension.strip()
    if not ext or ext == ".":
        raise DatasetError(
            "dataset.caption_extension is empty; set it to the extension of your caption "
            "files, e.g. dataset.caption_extension=.txt"
        )
    return ext if ext.startswith(".") else f".{ext}"


def caption_path_for(image_path: Path, caption_extension: str) -> Path:
    return image_path.with_suffix(caption_extension)


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """The image's caption: None without a caption file, "" when the file is blank.

    Like sd-scripts, only the first non-blank line is the caption.
    """
    path = caption_path_for(image_path, caption_extension)
    if not path.is_file():
        return None
    try:
        # utf-8-sig also drops the byte-order mark that Windows editors like to add.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"Caption file {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "re-save it with UTF-8 encoding."
        ) from exc
    except OSError as exc:
        raise DatasetError(f"Cannot read caption file {path}: {exc.strerror or exc}.") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def split_tags(caption: str) -> list[str]:
    """Booru-style tags of a caption: comma separated, trimmed, lower-cased, no blanks.

    Lower-casing matches how sd-scripts counts tags for `ss_tag_frequency`.
    """
    return [tag.strip().lower() for tag in caption.split(",") if tag.strip()]
