"""The training set in kohya layout, scanned into a DatasetIndex.

    train_data_dir/
        10_sks dog/          N_name: N = repeats per epoch, name = class tokens
            001.png
            001.txt          caption of 001.png (the caption_extension)
        4_sks dog running/
            ...

This module is the entry point the trainer imports; image decoding, captions and
step/order maths live in sibling modules and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from atelier.data.captions import link_leaving, normalize_caption_extension, read_caption, split_tags
from atelier.errors import DatasetError
from atelier.data.images import (
    IMAGE_EXTENSIONS,
    ImageLimits,
    is_image_file,
    is_unsupported_image_file,
    load_image,
    unreadable_images_message,
    unreadable_reason,
)
from atelier.data.schedule import epoch_order, expand_repeats, steps_per_epoch, total_steps

__all__ = [
    "ConceptFolder",
    "DatasetError",
    "DatasetIndex",
    "ImageItem",
    "epoch_order",
    "expand_repeats",
    "load_image",
    "parse_concept_folder_name",
    "scan_dataset",
    "scan_image_folder",
    "steps_per_epoch",
    "total_steps",
]

logger = logging.getLogger("atelier.data")

CONFIG_KEY = "dataset.train_data_dir"

# `10_sks dog` -> (10, "sks dog"); a bare `10` is a concept without class tokens.
_CONCEPT_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)

# Warnings name at most this many files so a large uncaptioned folder stays readable.
_MAX_NAMED_FILES = 5

_EXTENSIONS_TEXT = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class ImageItem:
    """One training image; bucketing and latent caching work from a list of these."""

    path: Path
    caption: str
    folder_name: str
    repeats: int
    subset: int | None = None  # its place in dataset.subsets (its caption options); None: train_data_dir's


@dataclass(frozen=True)
class ConceptFolder:
    path: Path
    name: str
    class_tokens: str
    repeats: int
    num_images: int


@dataclass
class DatasetIndex:
    root: Path
    folders: list[ConceptFolder]
    items: list[ImageItem]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def num_train_samples(self) -> int:
        """Samples in one epoch: every image counted `repeats` times."""
        return sum(item.repeats for item in self.items)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: count}}, the `ss_tag_frequency` metadata of a kohya LoRA."""
        frequency: dict[str, dict[str, int]] = {folder.name: {} for folder in self.folders}
        for item in self.items:
            counts = frequency.setdefault(item.folder_name, {})
            for tag in split_tags(item.caption):
                counts[tag] = counts.get(tag, 0) + 1
        return frequency

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """{folder name: {"n_repeats", "img_count"}}, the `ss_dataset_dirs` metadata."""
        return {folder.name: {"n_repeats": folder.repeats, "img_count": folder.num_images} for folder in self.folders}


@dataclass
class _Concept:
    """A concept folder while scanning, before its captions are read."""

    path: Path
    repeats: int
    class_tokens: str
    images: list[Path]


def parse_concept_folder_name(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a folder named `N_name`, or None without a number prefix."""
    match = _CONCEPT_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), (match.group(2) or "").strip()


def scan_dataset(
    train_data_dir: str | os.PathLike,
    caption_extension: str = ".txt",
    config_key: str = CONFIG_KEY,
    limits: ImageLimits | None = None,
    max_samples_per_epoch: int | None = None,
    all_caption_lines: bool = False,
) -> DatasetIndex:
    """Index every image and caption under train_data_dir; raise DatasetError on bad data.

    Folders and files are sorted by name, so the same folder always gives the same index.
    `config_key` is the option named in error messages (e.g. dataset.reg_data_dir).
    `limits` refuses images by their header; `max_samples_per_epoch` caps images x repeats.
    `all_caption_lines` (dataset.enable_wildcard) keeps every line of a caption file.
    """
    root = _resolve_root(train_data_dir, config_key)
    caption_extension = normalize_caption_extension(caption_extension)
    warnings: list[str] = []
    entries = _list_dir(root)
    loose_images = [path for path in entries if is_image_file(path)]
    skipped: list[str] = []
    concepts = _find_concepts(entries, warnings, skipped)
    if not concepts:
        if loose_images:
            raise DatasetError(_image_folder_message(root, loose_images, config_key))
        raise DatasetError(_empty_dataset_message(root, skipped, config_key))
    if loose_images:
        _warn(
            warnings,
            f"{len(loose_images)} image(s) directly inside {root} are ignored "
            f"({_name_list(loose_images)}); only images in `N_<concept>` subfolders are trained on.",
        )
    if max_samples_per_epoch is not None:
        check_samples_per_epoch([(c.path, c.repeats, len(c.images)) for c in concepts], max_samples_per_epoch)
    images = [image for concept in concepts for image in concept.images]
    _check_links(images, root)
    _check_images_readable(images, limits)

    folders: list[ConceptFolder] = []
    items: list[ImageItem] = []
    for concept in concepts:
        folders.append(
            ConceptFolder(concept.path, concept.path.name, concept.class_tokens, concept.repeats, len(concept.images))
        )
        items.extend(_caption_items(concept, caption_extension, warnings, root, all_caption_lines))
    return DatasetIndex(root=root, folders=folders, items=items, warnings=warnings)


def scan_image_folder(
    folder: str | os.PathLike,
    repeats: int,
    class_tokens: str,
    caption_extension: str,
    config_key: str,
    limits: ImageLimits | None = None,
    all_caption_lines: bool = False,
) -> tuple[ConceptFolder, list[ImageItem], list[str]]:
    """One folder of images (a dataset.subsets entry): its folder, its items and the warnings.

    Unlike train_data_dir, the folder holds the images themselves; a folder of N_name
    concept folders given here is refused with the key that reads that layout.
    """
    root = _resolve_root(folder, config_key)
    warnings: list[str] = []
    images = _concept_images(root, warnings)
    if not images:
        concepts = [p.name for p in _list_dir(root) if p.is_dir() and parse_concept_folder_name(p.name)]
        if concepts:
            raise DatasetError(
                f"{config_key}={root} holds concept folders ({_name_list(concepts)}), not images: a subset's "
                f"image_dir is the folder of the images themselves; give one subset per folder "
                f"(e.g. {root / concepts[0]}), or give {root} as dataset.train_data_dir instead of subsets"
            )
        raise DatasetError(f"{config_key}={root} contains no {_EXTENSIONS_TEXT} images; fix the path")
    _check_links(images, root)
    _check_images_readable(images, limits)
    concept = _Concept(root, repeats, class_tokens, images)
    items = _caption_items(concept, normalize_caption_extension(caption_extension), warnings, root, all_caption_lines)
    return ConceptFolder(root, root.name, class_tokens, repeats, len(images)), items, warnings


def _resolve_root(train_data_dir: str | os.PathLike, config_key: str = CONFIG_KEY) -> Path:
    given = Path(train_data_dir).expanduser()
    root = given.resolve()
    if not root.exists():
        hint = ""
        if not given.is_absolute():
            # Relative paths surprise people when a launcher runs from another folder.
            hint = f" (the relative path '{given}' was resolved against the working directory {Path.cwd()})"
        raise DatasetError(
            f"{config_key} does not exist: {root}{hint}. Set {config_key} to the folder that holds "
            "your concept subfolders (named like `10_<concept>`), e.g. "
            f"{config_key}=/data/my_lora/train."
        )
    if not root.is_dir():
        raise DatasetError(
            f"{config_key} must be a folder, but {root} is a file. Set it to the folder that holds "
            "your concept subfolders (named like `10_<concept>`)."
        )
    return root


def _list_dir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError as exc:
        raise DatasetError(f"Cannot list folder {folder}: {exc.strerror or exc}. Check its permissions.") from exc


def _find_concepts(entries: list[Path], warnings: list[str], skipped: list[str]) -> list[_Concept]:
    """Concept folders with at least one image; every folder left out is explained."""
    concepts = []
    for folder in entries:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        parsed = parse_concept_folder_name(folder.name)
        if parsed is None:
            reason = (
                f"folder '{folder.name}' has no repeat-count prefix; rename it to e.g. "
                f"`10_{folder.name}` (10 = repeats per epoch) to train on it"
            )
        elif parsed[0] < 1:
            reason = f"folder '{folder.name}' has 0 repeats; rename it to e.g. `1_{parsed[1]}` to train on it"
        else:
            images = _concept_images(folder, warnings)
            if images:
                concepts.append(_Concept(folder, parsed[0], parsed[1], images))
                continue
            reason = f"folder '{folder.name}' contains no {_EXTENSIONS_TEXT} images"
            if any(child.is_dir() for child in _list_dir(folder)):
                reason += " (images in nested folders are not scanned)"
        skipped.append(reason)
        _warn(warnings, f"Skipping {folder}: {reason}.")
    return concepts


def _concept_images(folder: Path, warnings: list[str]) -> list[Path]:
    entries = _list_dir(folder)
    unsupported = [path for path in entries if is_unsupported_image_file(path)]
    if unsupported:
        _warn(
            warnings,
            f"Ignoring {len(unsupported)} file(s) in {folder} in an unsupported format "
            f"({_name_list(unsupported)}); convert them to png or jpg to train on them.",
        )
    return [path for path in entries if is_image_file(path)]


def too_many_samples_message(folders: list[tuple[Path, int, int]], limit: int) -> str | None:
    """Why images x repeats of these (folder, repeats, images) exceed `limit` per epoch, or None.

    Counted, never expanded: one epoch's order is a list of every sample, so a folder
    named `1000000000_x` would take tens of GB before the first step.
    """
    total = sum(repeats * images for _, repeats, images in folders)
    if total <= limit:
        return None
    folder, repeats, images = max(folders, key=lambda f: f[1] * f[2])
    return (
        f"{total:,} samples per epoch (images x repeats) is more than dataset.max_samples_per_epoch={limit:,}; "
        f"{folder} alone has {images} image(s) x {repeats:,} repeats. Rename the folder to a smaller "
        f"repeat count (e.g. `10_{folder.name.partition('_')[2]}`) or raise dataset.max_samples_per_epoch."
    )


def check_samples_per_epoch(folders: list[tuple[Path, int, int]], limit: int) -> None:
    message = too_many_samples_message(folders, limit)
    if message is not None:
        raise DatasetError(message)


def _check_links(images: list[Path], root: Path) -> None:
    refused = [reason for path in images if (reason := link_leaving(path, root)) is not None]
    if refused:
        raise DatasetError("Image " + "\nImage ".join(refused) + ".")


def _check_images_readable(images: list[Path], limits: ImageLimits | None = None) -> None:
    # Collect every broken file first: fixing them one failed run at a time is tedious.
    problems = [(path, reason) for path in images if (reason := unreadable_reason(path, limits)) is not None]
    if problems:
        raise DatasetError(unreadable_images_message(problems))


def _caption_items(
    concept: _Concept, caption_extension: str, warnings: list[str], root: Path, all_lines: bool = False
) -> list[ImageItem]:
    items = []
    uncaptioned: list[str] = []
    for image in concept.images:
        caption = read_caption(image, caption_extension, root, all_lines)
        if not caption:
            empty_file = " (empty caption file)" if caption == "" else ""
            uncaptioned.append(image.name + empty_file)
            caption = concept.class_tokens
        items.append(ImageItem(image, caption, concept.path.name, concept.repeats))
    if uncaptioned:
        _warn(warnings, _fallback_caption_message(concept, uncaptioned, caption_extension))
    return items


def _fallback_caption_message(concept: _Concept, uncaptioned: list[str], caption_extension: str) -> str:
    where = (
        f"{concept.path.name}: {len(uncaptioned)} image(s) without a {caption_extension} caption "
        f"({_name_list(uncaptioned)})"
    )
    if concept.class_tokens:
        return (
            f"{where}; using the folder's class tokens '{concept.class_tokens}' as their caption. "
            f"Add `<image name>{caption_extension}` files beside the images to caption them."
        )
    return (
        f"{where} and the folder name has no class tokens; they are trained with an EMPTY caption. "
        f"Add caption files or rename the folder to `{concept.repeats}_<class tokens>`."
    )


def _image_folder_message(root: Path, loose_images: list[Path], config_key: str = CONFIG_KEY) -> str:
    return (
        f"{root} contains images directly ({_name_list(loose_images)}) but no concept subfolders: "
        "this looks like an image folder. Put the images in a subfolder named like `10_<concept>` "
        f"(10 = repeats per epoch, <concept> = class tokens) and pass its parent as {config_key}."
    )


def _empty_dataset_message(root: Path, skipped: list[str], config_key: str = CONFIG_KEY) -> str:
    lines = [
        f"No training images found in {root} (empty dataset). {config_key} must hold subfolders "
        f"named like `10_<concept>` that contain {_EXTENSIONS_TEXT} images."
    ]
    lines += [f"  - {reason}" for reason in skipped]
    return "\n".join(lines)


def _name_list(names: list[Path] | list[str]) -> str:
    shown = [name.name if isinstance(name, Path) else name for name in names[:_MAX_NAMED_FILES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _warn(warnings: list[str], message: str) -> None:
    logger.warning(message)
    warnings.append(message)
