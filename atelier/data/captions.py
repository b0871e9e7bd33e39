"""Caption files: `<image stem><caption_extension>` beside each image, as in kohya."""

from __future__ import annotations

from pathlib import Path

from atelier.errors import DatasetError


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


def link_leaving(path: Path, root: Path | None) -> str | None:
    """Why `path` is refused as a symlink that points outside the dataset folder `root`
    (a dataset shared as a folder must not read ~/.ssh/id_rsa as a caption), or None."""
    if root is None or not path.is_symlink():
        return None
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return (
        f"{path} is a symbolic link to {target}, outside the dataset folder {root}; "
        "copy the file into the dataset folder instead of linking to it"
    )


def read_caption(
    image_path: Path, caption_extension: str, root: Path | None = None, all_lines: bool = False
) -> str | None:
    """The image's caption: None without a caption file, "" when the file is blank.

    Like sd-scripts, only the first non-blank line is the caption; with `all_lines`
    (dataset.enable_wildcard) every non-blank line, joined by newlines. With the dataset
    folder `root`, a caption file that links outside it is refused.
    """
    path = caption_path_for(image_path, caption_extension)
    if not path.is_file():
        return None
    refused = link_leaving(path, root)
    if refused is not None:
        raise DatasetError(f"Caption file {refused}.")
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
    if all_lines:
        return "\n".join(lines)
    return lines[0] if lines else ""


def split_tags(caption: str) -> list[str]:
    """Booru-style tags of a caption: comma separated, trimmed, lower-cased, no blanks.

    Lower-casing matches how sd-scripts counts tags for `ss_tag_frequency`. The lines of
    a multi-line (enable_wildcard) caption are counted as tags of their own.
    """
    return [tag.strip().lower() for line in caption.split("\n") for tag in line.split(",") if tag.strip()]
