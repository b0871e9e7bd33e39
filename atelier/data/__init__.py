"""The dataset layer: scan a kohya-layout folder, load images and captions, bucket them, cache
latents, count steps (schedule.py) and a run's length (plan.py), hold images out for
validation (holdout.py), and serve a run's batches (training_data.py: TrainingData, with
latents.py and regularization.py)."""

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
