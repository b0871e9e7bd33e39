"""The dataset layer: scan a kohya-layout folder, load images and captions, bucket them, cache
latents, count steps (schedule.py) and a run's length (plan.py), hold images out for
validation (holdout.py), balance regularization images (regularization.py), encode latents
(latents.py), and read the dataset config as these option objects (options.py). A run's batches
are atelier.conditioning.training_data's."""

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
