"""An adapter's batches over its epochs, one at a time, each with its place in the run.

The loop draws each adapter's next batch when it needs it (several adapters interleave);
what the batch closes (an accumulation group, an epoch) travels with it as a `Draw`. A run
resumed from its training state starts at the batch after the last step it saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atelier.loop.result import EpochProgress
from atelier.conditioning.training_data import Batch, StepPlace, shard

if TYPE_CHECKING:
    from atelier.loop.adapter import Adapter


@dataclass(frozen=True)
class Draw:
    """One batch and where it stands. batch=None: an epoch whose batches were all trained
    before the run was stopped and continued; only its end is left to run."""

    batch: Batch | None
    epoch: int
    index: int  # in this process's share of the epoch
    group_size: int  # batches in its accumulation group (an epoch's last group may be shorter)
    closes_group: bool  # an optimizer step follows it
    ends_epoch: bool


def step_place(adapter: Adapter, epoch: int) -> StepPlace:
    """Where `epoch`'s batches fall among the run's optimizer steps (token warmup reads it)."""
    plan = adapter.plan
    return StepPlace(adapter.start.first_step(epoch, plan), plan.gradient_accumulation_steps,
                     adapter.parallel.world_size, plan.total_steps)  # fmt: skip


def draws(adapter: Adapter) -> Iterator[Draw]:
    """The adapter's remaining batches, epoch after epoch (its data-parallel share of each)."""
    data, plan, parallel = adapter.data, adapter.plan, adapter.parallel
    accum = plan.gradient_accumulation_steps
    for epoch in range(adapter.result.epochs + 1, plan.num_epochs + 1):
        if adapter.position is None:  # a fresh run's first epoch (the loop sets it at an epoch's end)
            adapter.position = EpochProgress(data.state_dict())
        batches = shard(data.epoch(epoch, step_place(adapter, epoch)), parallel.rank, parallel.world_size)
        skip = adapter.position.batches_done  # a run resumed mid-epoch skips what it trained before
        if skip >= len(batches):
            yield Draw(None, epoch, skip - 1, 1, True, True)
            continue
        for i, batch in enumerate(data.load(batches[skip:]), start=skip):
            group_size = min(accum, len(batches) - (i // accum) * accum)
            closes_group = not ((i + 1) % accum and i + 1 != len(batches))
            yield Draw(batch, epoch, i, group_size, closes_group, i + 1 == len(batches))
