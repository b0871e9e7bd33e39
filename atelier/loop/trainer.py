"""`Trainer`: a plain run, the K=1 case of the training loop.

One Adapter, its network applied to a base model of its own, driven by a TrainingLoop
without a router: an error or a stop propagates at once (atelier.loop.run records it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.config.schema import AtelierConfig
from atelier.loop.adapter import Adapter, NonFiniteLossError
from atelier.loop.loop import TrainingLoop
from atelier.loop.result import TrainResult
from atelier.runtime import phases


class Trainer:
    """cfg's run into run_dir. After setup(), the run's parts (network, optimizer, data, plan,
    captions, validator, ...) are its adapter's, and read through the Trainer too."""

    def __init__(self, cfg: AtelierConfig, run_dir: Path):
        phases.attach_trainer()  # summary.json's phase_seconds
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.adapter = Adapter(cfg, self.run_dir)
        self.result: TrainResult = self.adapter.result
        self.accelerator = self.adapter.accelerator
        self.device = self.adapter.device

    def __getattr__(self, name: str) -> Any:
        # Only for names the Trainer itself lacks: the adapter's parts once it is set up.
        if name == "adapter":
            raise AttributeError(name)
        return getattr(self.adapter, name)

    def setup(self) -> None:
        self.adapter.setup()


    def train(self) -> TrainResult:
        self.setup()
        self.adapter.open_metrics(resumed=self.adapter.restore())
        TrainingLoop([self.adapter]).run()
        return self.result


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer"]
