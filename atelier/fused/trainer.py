"""Several LoRA configs trained in one pass over one frozen base model (mLoRA / ASPEN style).

Each config is a *lane*: an ordinary Adapter (its own cfg, TrainingData and data order,
plan, network, optimizer, scheduler, metrics, run dir) whose base model is the shared one
(loaded by the first lane, a shallow copy for each) and whose network is reached through
atelier.fused.slots instead of being applied. The loop is a plain run's
(atelier.loop.loop.TrainingLoop): per step each lane draws its own batch and noise, lanes
whose inputs have the same shapes share one UNet call, each steps its own optimizer.

What is only about several lanes lives here: the shared base, the slots, and a lane's exit.
A lane whose loss is NaN/inf, or that fails, is marked failed (summary.json: status failed
+ reason) and leaves; a lane its search trial prunes saves its LoRA as it stands and leaves; a lane that has done its steps saves its LoRA (same file, metadata
and samples as a solo run) and leaves; on a stop signal each lane saves its state at its
accumulation group's or epoch's end and says "interrupted". The others go on.

Not fused here (atelier.fused.grouping says which configs can be lanes): text-encoder
training (the frozen text encoder only encodes captions), fp16 (one grad scaler per
lane), dropouts and DyLoRA (they draw from the global RNG, so no lane could match its
solo run), multi-process data parallel.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from atelier.config.schema import AtelierConfig
from atelier.fused.grouping import check_group
from atelier.fused.lane_logs import as_lane
from atelier.fused.slots import LaneRouter, Slot, install_slots, remove_lane
from atelier.loop import build
from atelier.loop.adapter import Adapter
from atelier.loop.loop import TrainingLoop
from atelier.models.loading import BaseModel
from atelier.outputs.run_dir import write_environment, write_resolved_config
from atelier.outputs.summary import write_summary
from atelier.runtime import phases, reuse
from atelier.loop.run import failure_reason, summarise
from atelier.runtime.signals import StopRequested, stop_on_signals

log = logging.getLogger(__name__)


class FusedTrainer:
    def __init__(self, cfgs: Sequence[AtelierConfig], run_dirs: Sequence[Path]):
        if len(cfgs) != len(run_dirs):
            raise ValueError("one run dir per config")
        check_group(cfgs)
        self.cfgs, self.run_dirs = list(cfgs), [Path(d) for d in run_dirs]
        self.router = LaneRouter()
        self.adapters: list[Adapter] = []  # the lanes that could be made, in lane order
        self.slots: list[Slot] = []
        self.summaries: list[dict[str, Any] | None] = [None] * len(self.cfgs)
        self._started = [time.time()] * len(self.cfgs)
        self._base: BaseModel | None = None
        self.loop = TrainingLoop(self.adapters, self.router, isolate_failures=True, on_leave=self._left)

    @property
    def fused_steps(self) -> int:
        return self.loop.passes

    @property
    def step_seconds(self) -> list[float]:
        return self.loop.pass_seconds

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        with reuse.sharing_latents():  # one dataset, one VAE: the first lane encodes, the others read
            for index, (cfg, run_dir) in enumerate(zip(self.cfgs, self.run_dirs)):
                self._setup_lane(index, cfg, run_dir)
        networks = {a.index: a.network for a in self.loop.active()}
        self.slots = install_slots([networks.get(i, _EMPTY) for i in range(len(self.cfgs))], self.router)

    def _setup_lane(self, index: int, cfg: AtelierConfig, run_dir: Path) -> None:
        self._started[index] = time.time()
        with as_lane(index):
            try:
                adapter = Adapter(cfg, run_dir, index)
            except Exception as err:
                self._summarise(index, "failed", None, failure_reason(err))
                return
            self.adapters.append(adapter)
            try:
                write_environment(run_dir, str(adapter.device))
                with self.router.only(index):
                    adapter.setup(self._shared_base, apply=False)  # set_seed(seed) first: as a solo run
                    adapter.open_metrics(resumed=adapter.restore())
            except Exception as err:
                adapter.status = "failed"
                adapter.close()
                self._left(adapter, err)

    def _shared_base(self, cfg: AtelierConfig, device: torch.device) -> BaseModel:
        """The first lane loads the base model; every lane gets a shallow copy (same modules,
        its own attributes: e.g. training.zero_terminal_snr replaces its noise_scheduler)."""
        if self._base is None:
            self._base = build.load_base(cfg, device)
        return copy.copy(self._base)

    # -------------------------------------------------------------- training
    def train(self) -> list[dict[str, Any]]:
        """Train every lane; each lane's summary (also written to its run dir).

        A stop signal (Ctrl-C, SIGTERM, SIGUSR1/2) lets each lane finish its accumulation
        group, save its state and say "interrupted"; then StopRequested is raised. One during
        setup (latent caching) raises at once: atelier.fused.worker marks the lanes.
        """
        with stop_on_signals():
            try:
                self.setup()
                self.loop.run()
            finally:
                for slot in self.slots:  # the base model's layers back as they were
                    slot.restore()
                for adapter in self.adapters:
                    adapter.close()
        return list(self.summaries)

    # ------------------------------------------------------------ lane exits
    def _left(self, adapter: Adapter, error: BaseException | None) -> None:
        """A lane left the group (adapter.status says how): its rows and gradients go, its summary is written."""
        remove_lane(self.slots, adapter.index)
        network = getattr(adapter, "network", None)  # None: it failed before its network was made
        if network is not None:
            network.requires_grad_(False)
            for p in network.parameters():
                p.grad = None
        reason = adapter.reason  # a pruned lane's
        if isinstance(error, StopRequested):
            reason = str(error)
        elif error is not None:
            reason = failure_reason(error)
        self._summarise(adapter.index, adapter.status, adapter.result, reason)
        if getattr(adapter, "trial_link", None) is not None:  # None: it failed before its link was made
            adapter.trial_link.tell(self.summaries[adapter.index])
        with as_lane(adapter.index):
            name = adapter.run_dir.name
            if adapter.status in ("completed", "pruned"):
                log.info("lane %d (%s) %s: %d steps", adapter.index, name, adapter.status, adapter.result.steps)
            elif adapter.status == "interrupted":
                log.warning("%s", reason)
            else:
                log.warning("lane %d (%s) failed, the others go on: %s", adapter.index, name, reason)

    def _summarise(self, index: int, status: str, result: Any, reason: str | None) -> None:
        summary = summarise(status, result, self._started[index], reason)
        # Which runs shared the pass (benchmarks/bench_train.py counts a group's steps once).
        summary["fused"] = {"lane": index, "lanes": len(self.cfgs), "runs": [d.name for d in self.run_dirs]}
        self.summaries[index] = summary
        write_summary(self.run_dirs[index], summary)


class _Empty:
    loras: ClassVar[dict] = {}


_EMPTY = _Empty()  # a lane without a network (it failed in setup) targets no layer


def run_fused(cfgs: Sequence[AtelierConfig], run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Train `cfgs` fused, each into its run dir (config.yaml, environment, summary.json,
    metrics, the LoRA as a solo run writes them); the lanes' summaries. The configs are
    typed, so checked already (atelier.config.typed.run_config)."""
    for cfg, run_dir in zip(cfgs, run_dirs):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_resolved_config(Path(run_dir), cfg)
    return train_fused(cfgs, run_dirs)


def train_fused(cfgs: Sequence[AtelierConfig], run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Train `cfgs` fused into run dirs that already hold their config.yaml (atelier.fused.worker)."""
    phases.start_job(time.time())
    return FusedTrainer(cfgs, run_dirs).train()
