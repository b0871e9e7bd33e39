"""Several LoRA configs trained in one pass over one frozen base model (mLoRA / ASPEN style).

Each config is a *lane*: an ordinary `Trainer` (its own cfg, TrainingData and data
order, plan, network, optimizer, scheduler, metrics, run dir) whose base model is the
shared one and whose network is not patched in by itself. Per step:

1. every active lane draws its next batch and builds its UNet inputs with its own
   noise / timestep stream (Trainer._step_inputs: the batch's `noise_seed`);
2. lanes whose inputs have the same shapes are concatenated along the batch dimension
   and the UNet runs once on them (atelier.fused.slots: base layers once, each lane's
   LoRA on its own rows); lanes with other shapes (buckets) run in another group;
3. each lane's loss is its own loss options on its own rows (Trainer._step_loss);
4. one backward of the sum of the finite lane losses: a lane's parameters only see its
   rows, so each gets the gradient of its own loss;
5. each lane steps its own optimizer / scheduler and logs to its own metrics.

A lane whose loss is NaN/inf is marked failed (summary.json: status failed + reason)
and leaves the batch; a lane that has done its steps saves its LoRA (Trainer._finish:
same file, metadata and samples as a solo run) and leaves. The others go on.

Not fused here: text-encoder training (lanes need network.train_unet_only=true: the
frozen text encoder only encodes captions), fp16 (one grad scaler per lane), dropouts
and DyLoRA (they draw from the global RNG, so no lane could match its solo run), state
saving / resuming and signal handling, multi-process data parallel.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from atelier.config.schema import MixedPrecision
from atelier.models.loading import BaseModel
from atelier.network.factory import build_network
from atelier.network.lora import LoRANetwork
from atelier.network.spec import NetworkSpec
from atelier.outputs.run_dir import write_environment, write_resolved_config
from atelier.outputs.summary import write_summary
from atelier.train import phases
from atelier.train.data import Batch
from atelier.train.metrics import MetricsLog
from atelier.train.run import failure_reason, summarise, validate
from atelier.train.sdxl_conditioning import batch_time_ids, unet_prediction
from atelier.train.trainer import StepInputs, Trainer, TrainResult

from atelier.fused.slots import LaneRouter, Slot, install_slots, remove_lane

log = logging.getLogger(__name__)

# Config keys every lane of a group must share: one base model, one batch shape.
SHARED_KEYS = (
    "model",
    "dataset",
    "training.train_batch_size",
    "training.mixed_precision",
    "training.cpu",
    "training.gradient_checkpointing",
    "training.attention",
    "training.channels_last",
    "training.torch_compile",
    "network.train_unet_only",
)
FUSABLE_KINDS = ("lora", "locon")


class FusedGroupError(ValueError):
    """These configs cannot be trained in one fused pass; the message says why."""


def check_group(cfgs: Sequence[DictConfig]) -> None:
    """Raise FusedGroupError unless every config can be a lane of one fused run."""
    if not cfgs:
        raise FusedGroupError("no configs to fuse")
    problems = []
    for key in SHARED_KEYS:
        values = [OmegaConf.to_container(v, resolve=True) if isinstance(v := OmegaConf.select(c, key), DictConfig) else v
                  for c in cfgs]  # fmt: skip
        if any(v != values[0] for v in values[1:]):
            problems.append(f"{key} differs between the configs")
    for i, cfg in enumerate(cfgs):
        t, spec = cfg.training, NetworkSpec.from_config(cfg.network)
        where = f"config {i}"
        if not cfg.network.train_unet_only:
            problems.append(f"{where}: network.train_unet_only must be true (text-encoder training is not fused)")
        if spec.kind not in FUSABLE_KINDS:
            problems.append(f"{where}: network.module={spec.kind} cannot be fused (only {', '.join(FUSABLE_KINDS)})")
        if spec.dropout or spec.rank_dropout or spec.module_dropout:
            problems.append(f"{where}: network dropouts draw from the global RNG; set them to 0 to fuse")
        if MixedPrecision(t.mixed_precision) == MixedPrecision.fp16:
            problems.append(f"{where}: training.mixed_precision=fp16 is not fused (use bf16 or no)")
        if t.num_processes != 1:
            problems.append(f"{where}: training.num_processes must be 1")
        if t.torch_compile:
            problems.append(f"{where}: training.torch_compile is not fused")
    if problems:
        raise FusedGroupError("cannot fuse these configs: " + "; ".join(problems))


class SharedBase:
    """The base model the first lane loads; every lane gets a shallow copy (same modules,
    its own attributes: e.g. training.zero_terminal_snr replaces its noise_scheduler)."""

    def __init__(self) -> None:
        self.base: BaseModel | None = None


class LaneTrainer(Trainer):
    """A Trainer that shares the base model and leaves patching to the Slots."""

    def __init__(self, cfg: DictConfig, run_dir: Path, shared: SharedBase):
        self._shared = shared
        super().__init__(cfg, run_dir)

    def _load_base_model(self) -> BaseModel:
        if self._shared.base is None:
            self._shared.base = super()._load_base_model()
        return copy.copy(self._shared.base)

    def _create_network(self) -> LoRANetwork:
        network = build_network(self.cfg.network, self.base.unet, None)
        network.to(self.device)  # not applied: install_slots routes the base layers to it
        if self.cfg.training.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        return network


@dataclass
class Lane:
    index: int
    trainer: LaneTrainer
    started: float
    status: str = "running"  # running | completed | failed
    reason: str | None = None
    summary: dict[str, Any] | None = None
    metrics: MetricsLog | None = None
    batches: Iterator[Batch] | None = None
    # The step in progress.
    epoch: int = 0
    losses: list[float] = field(default_factory=list)
    group_size: int = 1
    closes_group: bool = True

    @property
    def run_dir(self) -> Path:
        return self.trainer.run_dir

    @property
    def result(self) -> TrainResult:
        return self.trainer.result


@dataclass
class _Step:
    lane: Lane
    batch: Batch
    inputs: StepInputs
    loss: torch.Tensor | None = None


class FusedTrainer:
    def __init__(self, cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]):
        if len(cfgs) != len(run_dirs):
            raise ValueError("one run dir per config")
        check_group(cfgs)
        self.cfgs, self.run_dirs = list(cfgs), [Path(d) for d in run_dirs]
        self.router = LaneRouter()
        self.shared = SharedBase()
        self.lanes: list[Lane] = []
        self.slots: list[Slot] = []
        self.fused_steps = 0
        self.step_seconds: list[float] = []

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        for index, (cfg, run_dir) in enumerate(zip(self.cfgs, self.run_dirs)):
            started = time.time()
            trainer = LaneTrainer(cfg, run_dir, self.shared)
            lane = Lane(index, trainer, started)
            self.lanes.append(lane)
            write_environment(run_dir, str(trainer.device))
            try:
                with self.router.only(index):
                    trainer.setup()  # set_seed(seed) first: its network starts as in a solo run
            except Exception as err:
                self._fail(lane, err)
        self.slots = install_slots([lane.trainer.network if lane.status == "running" else _EMPTY
                                    for lane in self.lanes], self.router)  # fmt: skip
        for lane in self._active():
            lane.metrics = MetricsLog(lane.run_dir)
            lane.batches = self._lane_batches(lane)

    def _active(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.status == "running"]

    # -------------------------------------------------------------- training
    def train(self) -> list[dict[str, Any]]:
        """Train every lane; each lane's summary (also written to its run dir)."""
        self.setup()
        try:
            while self._active():
                self._fused_step()
        finally:
            for slot in self.slots:
                slot.restore()
            for lane in self.lanes:
                if lane.metrics is not None:
                    lane.metrics.close()
                    lane.metrics = None
        return [lane.summary for lane in self.lanes]

    def _fused_step(self) -> None:
        steps: list[_Step] = []
        for lane in self._active():
            try:
                batch = next(lane.batches)  # may first finish lane's previous epoch
                steps.append(_Step(lane, batch, lane.trainer._step_inputs(batch)))
            except StopIteration:
                self._complete(lane)
            except Exception as err:
                self._fail(lane, err)
        if not steps:
            return
        tic = time.perf_counter()
        for group in _same_shapes(steps):
            try:
                self._forward(group)
            except Exception as err:  # the shared forward: every lane of the group stops
                for step in group:
                    self._fail(step.lane, err)
                    step.loss = None
        steps = [s for s in steps if s.loss is not None]
        finite = []
        for step in steps:
            lane, trainer = step.lane, step.lane.trainer
            try:
                trainer._check_finite(step.loss, lane.epoch)
                finite.append(step)
            except Exception as err:
                self._fail(lane, err)
        if finite:
            # One backward: each lane's parameters get the gradient of its own loss only.
            finite[0].lane.trainer.accelerator.backward(torch.stack([s.loss for s in finite]).sum())
        elapsed = time.perf_counter() - tic
        for step in finite:
            try:
                self._after_backward(step.lane, step.loss.item(), elapsed)
            except Exception as err:
                self._fail(step.lane, err)
        self.fused_steps += 1
        self.step_seconds.append(elapsed)

    def _forward(self, group: list[_Step]) -> None:
        """One UNet call on the group's concatenated inputs; each lane's loss on its rows."""
        first = group[0].lane.trainer
        noisy = torch.cat([s.inputs.noisy for s in group])
        timesteps = torch.cat([s.inputs.timesteps for s in group])
        hidden = _cat([s.inputs.hidden for s in group])

        def time_ids() -> torch.Tensor:
            return torch.cat([batch_time_ids(s.lane.trainer.data, s.batch) for s in group])

        with self.router.fused([(s.lane.index, len(s.batch)) for s in group]) as rows:
            with first.accelerator.autocast():
                pred = unet_prediction(first.base.unet, noisy, timesteps, hidden, time_ids)
        for step, lane_pred in zip(group, pred.split([r.end - r.start for r in rows])):
            step.loss = step.lane.trainer._step_loss(step.batch, step.inputs, lane_pred) / step.lane.group_size

    def _lane_batches(self, lane: Lane) -> Iterator[Batch]:
        """Trainer._train_epoch / _run_epoch for one lane, a batch at a time (no state saving).

        The caller steps the lane (_after_backward) between two batches; the epoch's
        outputs (epoch loss, validation, checkpoints, samples) run with this lane alone.
        """
        t = lane.trainer
        plan = t.plan
        accum = plan.gradient_accumulation_steps
        for epoch in range(1, plan.num_epochs + 1):
            lane.epoch, lane.losses = epoch, []
            batches = t.data.epoch(epoch)
            for i, batch in enumerate(t.data.load(batches)):
                lane.group_size = min(accum, len(batches) - (i // accum) * accum)
                lane.closes_group = not ((i + 1) % accum and i + 1 != len(batches))
                yield batch
                if t.result.steps >= plan.total_steps:
                    break
            epoch_loss = sum(lane.losses) / len(lane.losses)
            t.result.epochs = epoch
            t.result.epoch_losses.append(epoch_loss)
            lane.metrics.log(t.result.steps, {"loss/epoch": epoch_loss}, epoch=epoch)
            with self.router.only(lane.index):
                t._validate(epoch, lane.metrics)
                t._end_epoch(epoch)

    def _after_backward(self, lane: Lane, loss: float, elapsed: float) -> None:
        t = lane.trainer
        lane.losses.append(loss * lane.group_size)
        if not lane.closes_group:
            return
        norms = t._optimizer_step()
        t.result.steps += 1
        t.result.train_seconds += elapsed  # the fused step's time, shared by its lanes
        recent = sum(lane.losses[-lane.group_size :]) / lane.group_size
        lane.metrics.log(t.result.steps, {**t._step_scalars(recent, elapsed), **norms}, epoch=lane.epoch)

    # ------------------------------------------------------------ lane exits
    def _complete(self, lane: Lane) -> None:
        try:
            with self.router.only(lane.index):
                lane.trainer._finish()
        except Exception as err:
            self._fail(lane, err)
            return
        self._leave(lane, "completed")
        log.info("lane %d (%s) completed: %d steps", lane.index, lane.run_dir.name, lane.result.steps)

    def _fail(self, lane: Lane, err: BaseException) -> None:
        lane.reason = failure_reason(err)
        self._leave(lane, "failed")
        log.warning("lane %d (%s) failed, the others go on: %s", lane.index, lane.run_dir.name, lane.reason)

    def _leave(self, lane: Lane, status: str) -> None:
        lane.status = status
        remove_lane(self.slots, lane.index)
        network = getattr(lane.trainer, "network", None)
        if network is not None:
            network.requires_grad_(False)
            for p in network.parameters():
                p.grad = None
        lane.summary = summarise(status, lane.result, lane.started, lane.reason)
        lane.summary["fused"] = {"lane": lane.index, "lanes": len(self.lanes)}
        write_summary(lane.run_dir, lane.summary)
        if lane.metrics is not None:
            lane.metrics.close()
            lane.metrics = None


class _Empty:
    loras: dict = {}


_EMPTY = _Empty()


def _same_shapes(steps: list[_Step]) -> list[list[_Step]]:
    """Steps whose UNet inputs can be concatenated (same latent and text shapes), in lane order."""
    groups: dict[tuple, list[_Step]] = {}
    for step in steps:
        key = (tuple(step.inputs.noisy.shape[1:]), _text_shape(step.inputs.hidden), step.inputs.noisy.dtype)
        groups.setdefault(key, []).append(step)
    return list(groups.values())


def _text_shape(hidden: Any) -> tuple:
    if isinstance(hidden, torch.Tensor):
        return tuple(hidden.shape[1:])
    return tuple(tuple(getattr(hidden, f.name).shape[1:]) for f in fields(hidden))


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if is_dataclass(parts[0]):  # SDXLText
        return type(parts[0])(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})
    raise TypeError(f"cannot concatenate text conditioning of type {type(parts[0]).__name__}")


def run_fused(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Train `cfgs` fused, each into its run dir (config.yaml, environment, summary.json,
    metrics, the LoRA as a solo run writes them); the lanes' summaries."""
    started = time.time()
    phases.start_job(started)
    for cfg, run_dir in zip(cfgs, run_dirs):
        validate(cfg)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_resolved_config(Path(run_dir), cfg)
    return FusedTrainer(cfgs, run_dirs).train()
