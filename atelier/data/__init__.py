"""The dataset layer: scan a kohya-layout folder, load images, count steps."""

from atelier.data.dataset import (
    ConceptFolder,
    DatasetError,
    DatasetIndex,
    ImageItem,
    epoch_order,
    expand_repeats,
    load_image,
    parse_concept_folder_name,
    scan_dataset,
    steps_per_epoch,
    total_steps,
)

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
    "steps_per_epoch",
    "total_steps",
]
