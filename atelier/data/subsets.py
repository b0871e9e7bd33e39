"""Where a run's images come from: train_data_dir's N_name folders or dataset.subsets, and the
regularization images (reg_data_dir, subsets with is_reg), scanned into two DatasetIndexes."""

from __future__ import annotations

from dataclasses import replace

from atelier.config.schema import DatasetConfig
from atelier.config.schema.dataset import caption_options
from atelier.data.dataset import (
    DatasetIndex,
    check_samples_per_epoch,
    scan_dataset,
    scan_image_folder,
)
from atelier.data.images import ImageLimits

REG_DATA_DIR_KEY = "dataset.reg_data_dir"


def scan_sources(d: DatasetConfig, limits: ImageLimits | None = None) -> tuple[DatasetIndex, DatasetIndex | None]:
    """(the training images, the regularization images or None), in the order the config gives them."""
    if d.subsets:
        train, reg = scan_subsets(d, limits)
    else:
        reg = None
        train = scan_dataset(d.train_data_dir, d.caption_extension, limits=limits,
                             max_samples_per_epoch=d.max_samples_per_epoch, all_caption_lines=d.enable_wildcard)  # fmt: skip
    if d.reg_data_dir:
        reg_dir = scan_dataset(d.reg_data_dir, d.caption_extension, REG_DATA_DIR_KEY, limits, d.max_samples_per_epoch,
                               d.enable_wildcard)  # fmt: skip
        reg = joined([reg, reg_dir]) if reg is not None else reg_dir
    return train, reg


def scan_subsets(d: DatasetConfig, limits: ImageLimits | None = None) -> tuple[DatasetIndex, DatasetIndex | None]:
    """dataset.subsets as (training index, regularization index or None); each item knows its subset."""
    base = caption_options(d)
    train: list[DatasetIndex] = []
    reg: list[DatasetIndex] = []
    for i, subset in enumerate(d.subsets):
        folder, items, warnings = scan_image_folder(
            subset.image_dir, subset.num_repeats, subset.class_tokens or "",
            subset.caption_extension or d.caption_extension, f"dataset.subsets[{i}].image_dir", limits,
            subset.captions(base).enable_wildcard,
        )  # fmt: skip
        index = DatasetIndex(folder.path, [folder], [replace(item, subset=i) for item in items], warnings)
        (reg if subset.is_reg else train).append(index)
    for indexes in (train, reg):
        folders = [folder for index in indexes for folder in index.folders]
        check_samples_per_epoch([(f.path, f.repeats, f.num_images) for f in folders], d.max_samples_per_epoch)
    return joined(train), joined(reg) if reg else None


def joined(indexes: list[DatasetIndex]) -> DatasetIndex:
    """One index of several; its root is the first one's (the latent cache's default folder)."""
    return DatasetIndex(
        root=indexes[0].root,
        folders=[folder for index in indexes for folder in index.folders],
        items=[item for index in indexes for item in index.items],
        warnings=[warning for index in indexes for warning in index.warnings],
    )


__all__ = ["REG_DATA_DIR_KEY", "joined", "scan_sources", "scan_subsets"]
