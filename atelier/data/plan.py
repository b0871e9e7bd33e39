"""How long a run is: batches per epoch, epochs and optimizer steps."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from atelier.config.schema import TrainingConfig
from atelier.data.schedule import steps_per_epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    num_samples: int  # images x repeats in one epoch
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    updates_per_epoch: int
    num_epochs: int
    total_steps: int  # optimizer steps

    def log_summary(self, num_processes: int = 1) -> None:
        log.info(
            "num train images * repeats: %d, num batches per epoch: %d, num epochs: %d, "
            "batch size per process: %d, processes: %d, gradient accumulation steps: %d, "
            "total batch size: %d, total optimization steps: %d",
            self.num_samples,
            self.batches_per_epoch,
            self.num_epochs,
            self.batch_size,
            num_processes,
            self.gradient_accumulation_steps,
            self.batch_size * num_processes * self.gradient_accumulation_steps,
            self.total_steps,
        )


def plan_for(training: TrainingConfig, num_samples: int, batches_per_epoch: int, processes: int = 1) -> TrainingPlan:
    """The plan of a run with these `training.*` options: the trainer's and `atelier dataset check`'s.

    `batches_per_epoch` counts every batch of the dataset (the sum over buckets); with several
    processes each trains its share (sd-scripts' arithmetic under accelerate).
    """
    processes = max(1, processes)
    return make_plan(
        num_samples,
        training.train_batch_size,
        training.gradient_accumulation_steps,
        training.max_train_epochs,
        training.max_train_steps,
        batches_per_epoch=math.ceil(batches_per_epoch / processes),
    )


def make_plan(
    num_samples: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    max_train_epochs: int | None,
    max_train_steps: int | None,
    batches_per_epoch: int | None = None,
) -> TrainingPlan:
    """max_train_steps, when set, fixes the run length; otherwise max_train_epochs does.

    batches_per_epoch: with aspect buckets, the sum over buckets of
    ceil(samples in the bucket / batch_size) (buckets.bucket_steps_per_epoch); when
    not given, ceil(num_samples / batch_size), the one-bucket count.
    """
    batches = steps_per_epoch(num_samples, batch_size) if batches_per_epoch is None else batches_per_epoch
    if batches < 1:
        raise ValueError(f"an epoch needs at least one batch, got {batches} for {num_samples} samples")
    updates = math.ceil(batches / gradient_accumulation_steps)
    # The lengths were checked by TrainingConfig: steps win when set, else epochs.
    if max_train_steps is not None:
        total = max_train_steps
        epochs = math.ceil(total / updates)
    else:
        assert max_train_epochs is not None, "TrainingConfig requires one of the two"
        epochs = max_train_epochs
        total = epochs * updates
    return TrainingPlan(num_samples, batch_size, gradient_accumulation_steps, batches, updates, epochs, total)
