"""What a run has done (`TrainResult`) and where its epoch in progress stands (`EpochProgress`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    steps: int = 0
    epochs: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    output_file: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.epoch_losses[-1] if self.epoch_losses else None

    @property
    def best_loss(self) -> float | None:
        return min(self.epoch_losses) if self.epoch_losses else None

    @property
    def validation_loss(self) -> float | None:
        return self.validation_losses[-1] if self.validation_losses else None

    @property
    def best_validation_loss(self) -> float | None:
        return min(self.validation_losses) if self.validation_losses else None

    @property
    def seconds_per_step(self) -> float | None:
        return self.train_seconds / self.steps if self.steps else None


@dataclass
class EpochProgress:
    """Where the epoch in progress stands: what a state saved mid-epoch needs to continue."""

    data_state: dict  # TrainingData's random state before this epoch's draws
    batches_done: int = 0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"data": self.data_state, "batches_done": self.batches_done, "losses": list(self.losses)}

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)
