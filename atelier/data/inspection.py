"""A dataset folder inspected the way `atelier dataset check` reports it: every problem found.

scan_dataset stops at the first fatal problem; this inspection walks the whole folder
and collects every problem, so one run of the check lists everything to fix. No
model is loaded: images are only opened to verify them and read their size.
atelier.data.check turns an inspection into the report (buckets, steps, tags).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from atelier.data.buckets import (
    Resolution,
)
from atelier.data.captions import (
    link_leaving,
    normalize_caption_extension,
    read_caption,
)
from atelier.data.dataset import parse_concept_folder_name
from atelier.errors import DatasetError
from atelier.data.images import (
    ImageLimits,
    header_problem,
    is_image_file,
    is_unsupported_image_file,
    unreadable_reason,
    upright_size,
)

ERROR = "error"  # training would stop
WARNING = "warning"  # training runs, maybe not as intended


@dataclass(frozen=True)
class Problem:
    severity: str
    where: str  # path relative to the dataset root
    message: str

    def line(self) -> str:
        return f"{self.severity.upper():<7}  {self.where}: {self.message}"


@dataclass(frozen=True)
class CheckedImage:
    path: Path
    size: Resolution | None  # None when the file cannot be read
    caption_file: str | None  # the caption file's text; None without one
    caption: str  # what training uses: the caption, else the folder's class tokens


@dataclass
class CheckedFolder:
    path: Path
    repeats: int
    class_tokens: str
    images: list[CheckedImage]

    @property
    def readable(self) -> list[CheckedImage]:
        return [image for image in self.images if image.size is not None]

    @property
    def captions_found(self) -> int:
        return sum(1 for image in self.images if image.caption_file)


@dataclass
class DatasetInspection:
    root: Path
    caption_extension: str
    limits: ImageLimits = field(default_factory=ImageLimits)
    folders: list[CheckedFolder] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def add(self, severity: str, path: Path, message: str) -> None:
        self.problems.append(Problem(severity, self.relative(path), message))

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    @property
    def has_errors(self) -> bool:
        return any(problem.severity == ERROR for problem in self.problems)

    def count(self, severity: str) -> int:
        return sum(1 for problem in self.problems if problem.severity == severity)


# --------------------------------------------------------------------- inspection


def inspect_dataset(
    train_data_dir: str | Path, caption_extension: str = ".txt", limits: ImageLimits | None = None
) -> DatasetInspection:
    """Every folder, image and caption under train_data_dir, with every problem found."""
    root = Path(train_data_dir).expanduser().resolve()
    inspection = DatasetInspection(root, caption_extension, limits or ImageLimits())
    try:
        inspection.caption_extension = normalize_caption_extension(caption_extension)
    except DatasetError as exc:
        inspection.add(ERROR, root, str(exc))
        return inspection
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        inspection.add(ERROR, root, f"the dataset folder {what}")
        return inspection
    entries = _list_dir(root, inspection)
    for folder in entries:
        if folder.is_dir() and not folder.name.startswith("."):
            _inspect_candidate_folder(folder, inspection)
    _check_root_images([path for path in entries if is_image_file(path)], inspection)
    return inspection


def inspect_subsets(
    subsets: list[tuple[str | Path, int, str, str]], limits: ImageLimits | None = None
) -> DatasetInspection:
    """dataset.subsets' image folders, each (image_dir, num_repeats, class_tokens, caption_extension),
    with every problem found; paths are shown relative to the folders' common parent."""
    folders = [Path(folder).expanduser().resolve() for folder, *_ in subsets]
    inspection = DatasetInspection(Path(os.path.commonpath(folders)), ".txt", limits or ImageLimits())
    for i, (folder, (_, repeats, class_tokens, caption_extension)) in enumerate(zip(folders, subsets)):
        key = f"dataset.subsets[{i}]"
        try:
            inspection.caption_extension = normalize_caption_extension(caption_extension)
        except DatasetError as exc:
            inspection.add(ERROR, folder, f"{key}: {exc}")
            continue
        if not folder.is_dir():
            inspection.add(ERROR, folder, f"{key}.image_dir {'does not exist' if not folder.exists() else 'is a file'}")
            continue
        checked = _inspect_concept(folder, repeats, class_tokens, inspection)
        if checked.images:
            inspection.folders.append(checked)
        else:
            inspection.add(ERROR, folder, f"{key}.image_dir holds no png/jpg/jpeg/webp/bmp images (a subset's "
                           "image_dir is the folder of the images themselves)")  # fmt: skip
    return inspection


def _list_dir(folder: Path, inspection: DatasetInspection) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError as exc:
        inspection.add(ERROR, folder, f"cannot list the folder: {exc.strerror or exc}")
        return []


def _inspect_candidate_folder(folder: Path, inspection: DatasetInspection) -> None:
    parsed = parse_concept_folder_name(folder.name)
    if parsed is None:
        inspection.add(
            WARNING, folder, f"no repeat-count prefix, skipped; rename it to e.g. `10_{folder.name}` to train on it"
        )
        return
    repeats, class_tokens = parsed
    if repeats < 1:
        inspection.add(WARNING, folder, f"0 repeats, skipped; rename it to e.g. `1_{class_tokens}` to train on it")
        return
    checked = _inspect_concept(folder, repeats, class_tokens, inspection)
    if checked.images:
        inspection.folders.append(checked)
    else:
        inspection.add(WARNING, folder, "no png/jpg/jpeg/webp/bmp images, skipped")


def _inspect_concept(folder: Path, repeats: int, class_tokens: str, inspection: DatasetInspection) -> CheckedFolder:
    entries = _list_dir(folder, inspection)
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            inspection.add(WARNING, entry, "nested folder: images inside it are not trained on")
        elif is_unsupported_image_file(entry):
            inspection.add(WARNING, entry, f"unsupported format {entry.suffix}, ignored; convert it to png or jpg")
    image_paths = [path for path in entries if is_image_file(path)]
    _check_duplicate_stems(image_paths, inspection)
    images = [_inspect_image(path, class_tokens, inspection) for path in image_paths]
    return CheckedFolder(folder, repeats, class_tokens, images)


def _check_duplicate_stems(image_paths: list[Path], inspection: DatasetInspection) -> None:
    by_stem: dict[str, list[Path]] = {}
    for path in image_paths:
        by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(path.name for path in paths)
            inspection.add(
                WARNING,
                paths[0].parent / stem,
                f"{names} share one caption file ({stem}{inspection.caption_extension}); rename one of them",
            )


def _inspect_image(path: Path, class_tokens: str, inspection: DatasetInspection) -> CheckedImage:
    size = _image_size(path, inspection)
    try:
        caption_file = read_caption(path, inspection.caption_extension, inspection.root)
    except DatasetError as exc:
        inspection.add(ERROR, path, str(exc))
        caption_file = None
    else:
        _check_caption(path, caption_file, class_tokens, inspection)
    return CheckedImage(path, size, caption_file, caption_file or class_tokens)


def _image_size(path: Path, inspection: DatasetInspection) -> Resolution | None:
    refused = link_leaving(path, inspection.root) or header_problem(path, inspection.limits)
    if refused is not None:
        inspection.add(ERROR, path, f"refused: {refused}")
        return None
    reason = unreadable_reason(path)
    if reason is None:
        try:
            return upright_size(path)
        except (OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
    inspection.add(ERROR, path, f"corrupt image, cannot be read ({reason}); re-export it or remove it")
    return None


def _check_caption(path: Path, caption_file: str | None, class_tokens: str, inspection: DatasetInspection) -> None:
    if caption_file:
        return
    if caption_file == "":
        missing = "empty caption file"
    else:
        missing = f"missing caption {path.stem}{inspection.caption_extension}"
    if class_tokens:
        fallback = f"trained with the folder's class tokens '{class_tokens}'"
    else:
        fallback = "trained with an EMPTY caption"
    inspection.add(WARNING, path, f"{missing}; {fallback}")


def _check_root_images(loose_images: list[Path], inspection: DatasetInspection) -> None:
    if inspection.folders:
        for path in loose_images:
            inspection.add(
                WARNING, path, "image directly in the dataset folder is ignored; move it into a concept folder"
            )
        return
    if any(problem.severity == ERROR and problem.where == "." for problem in inspection.problems):
        return
    if loose_images:
        inspection.add(
            ERROR,
            inspection.root,
            f"holds {len(loose_images)} image(s) but no concept subfolders: this is an image folder. Move the "
            "images into a subfolder named like `10_<concept>` and check (and train on) its parent.",
        )
    else:
        inspection.add(ERROR, inspection.root, "no training images (no `N_<concept>` subfolder holds any image)")
