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
4. one backward of the sum of the group's finite lane losses: a lane's parameters only
   see its rows, so each gets the gradient of its own loss;
5. each lane steps its own optimizer / scheduler and logs to its own metrics.

A lane whose loss is NaN/inf is marked failed (summary.json: status failed + reason)
and leaves the batch; a lane that has done its steps saves its LoRA (Trainer._finish:
same file, metadata and samples as a solo run) and leaves. The others go on.

Each lane saves and restores its training state as a run alone does (periodically and on
SIGTERM / SIGUSR1 / SIGUSR2, in its run dir), so a stopped fused sweep continues lane by
lane when it is run again.

Not fused here (atelier.fused.grouping says which configs can be lanes): text-encoder
training (the frozen text encoder only encodes captions), fp16 (one grad scaler per
lane), dropouts and DyLoRA (they draw from the global RNG, so no lane could match its
solo run), multi-process data parallel.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atelier.conditioning.unet_call import unet_prediction
from atelier.config.validate import validate
from atelier.fused.grouping import check_group
from atelier.fused.lane_logs import as_lane
from atelier.fused.slots import LaneRouter, Slot, install_slots, remove_lane
from atelier.models.loading import BaseModel
from atelier.network.factory import build_network
from atelier.network.lora import LoRANetwork
from atelier.outputs.run_dir import write_environment, write_resolved_config
from atelier.outputs.summary import write_summary
from atelier.train import phases, reuse
from atelier.train.data import Batch, batch_time_ids
from atelier.train.metrics import MetricsLog
from atelier.train.run import failure_reason, summarise
from atelier.train.signals import StopFlag, StopRequested, stop_on_signals
from atelier.train.trainer import EpochProgress, StepInputs, Trainer, TrainResult

log = logging.getLogger(__name__)

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
    status: str = "running"  # running | completed | failed | interrupted
    reason: str | None = None
    summary: dict[str, Any] | None = None
    metrics: MetricsLog | None = None
    batches: Iterator[Batch] | None = None
    # The batch in progress (its place in the epoch and in its accumulation group).
    epoch: int = 0
    batch_index: int = 0
    group_size: int = 1
    closes_group: bool = True

    @property
    def run_dir(self) -> Path:
        return self.trainer.run_dir

    @property
    def result(self) -> TrainResult:
        return self.trainer.result

    @property
    def done(self) -> bool:
        return self.result.steps >= self.trainer.plan.total_steps


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
        self.stop = StopFlag()
        self.fused_steps = 0
        self.step_seconds: list[float] = []

    @contextmanager
    def _as_lane(self, lane: Lane) -> Iterator[None]:
        """Lane `lane` alone: its LoRA in the model (validation, samples) and its log."""
        with self.router.only(lane.index), as_lane(lane.index):
            yield

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        with reuse.sharing_latents():  # one dataset, one VAE: the first lane encodes, the others read
            for index, (cfg, run_dir) in enumerate(zip(self.cfgs, self.run_dirs)):
                self._setup_lane(index, cfg, run_dir)
        self.slots = install_slots([lane.trainer.network if lane.status == "running" else _EMPTY
                                    for lane in self.lanes], self.router)  # fmt: skip
        for lane in self._active():
            lane.batches = self._lane_batches(lane)

    def _setup_lane(self, index: int, cfg: DictConfig, run_dir: Path) -> None:
        lane = Lane(index, None, time.time())  # type: ignore[arg-type]
        self.lanes.append(lane)
        with as_lane(index):
            try:
                phases.share_job()
                lane.trainer = LaneTrainer(cfg, run_dir, self.shared)
                write_environment(run_dir, str(lane.trainer.device))
                with self.router.only(index):
                    lane.trainer.setup()  # set_seed(seed) first: its network starts as in a solo run
                    resumed = lane.trainer._restore()
                lane.metrics = MetricsLog(run_dir, resume_step=lane.result.steps if resumed else None)
            except Exception as err:
                self._fail(lane, err)

    def _active(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.status == "running"]

    # -------------------------------------------------------------- training
    def train(self) -> list[dict[str, Any]]:
        """Train every lane; each lane's summary (also written to its run dir).

        A stop signal (Ctrl-C, SIGTERM, SIGUSR1/2) lets each lane finish its accumulation
        group, save its state and say "interrupted"; then StopRequested is raised. One during
        setup (latent caching) raises at once: atelier.fused.worker marks the lanes.
        """
        with stop_on_signals() as self.stop:
            try:
                self.setup()
                total = max((lane.trainer.plan.total_steps - lane.result.steps for lane in self._active()), default=0)
                progress = tqdm(total=total, desc=f"training {len(self.lanes)} lanes", unit="step", dynamic_ncols=True)
                try:
                    while self._active():
                        if self._fused_step():
                            progress.update(1)
                            progress.set_postfix(lanes=len(self._active()))
                        if self.stop.signal:
                            self._stop_lanes()
                finally:
                    progress.close()
            finally:
                self._close()
        if self.stop.signal:
            raise StopRequested(self.stop, f"stopped by {self.stop.name}: {self._stopped_summary()}")
        return [lane.summary for lane in self.lanes]

    def _close(self) -> None:
        """The base model's layers back as they were; every lane's metrics file closed."""
        for slot in self.slots:
            slot.restore()
        for lane in self.lanes:
            if lane.metrics is not None:
                lane.metrics.close()
                lane.metrics = None

    def _fused_step(self) -> bool:
        """One forward/backward of every active lane; False when none had a batch left."""
        steps: list[_Step] = []
        for lane in self._active():
            batch = self._next_batch(lane)
            if batch is None:
                continue
            try:
                steps.append(_Step(lane, batch, lane.trainer._step_inputs(batch)))
            except Exception as err:
                self._fail(lane, err)
        if not steps:
            return False
        tic = time.perf_counter()
        finite: list[_Step] = []
        for group in _same_shapes(steps):
            try:
                finite += self._forward_backward(group)
            except Exception as err:  # the shared forward: every lane of the group stops
                for step in group:
                    if step.lane.status == "running":
                        self._fail(step.lane, err)
        elapsed = time.perf_counter() - tic
        for step in finite:
            try:
                self._after_backward(step.lane, step.loss.item(), elapsed)
            except Exception as err:
                self._fail(step.lane, err)
        self.fused_steps += 1
        self.step_seconds.append(elapsed)
        return True

    def _next_batch(self, lane: Lane) -> Batch | None:
        """The lane's next batch; None when it has left (done: its LoRA saved, or failed)."""
        try:
            return next(lane.batches)  # may first run the epoch outputs of its previous epoch
        except StopIteration:
            self._complete(lane)
        except Exception as err:
            self._fail(lane, err)
        return None

    def _forward_backward(self, group: list[_Step]) -> list[_Step]:
        """One UNet call on the group's concatenated inputs, each lane's loss on its rows, one
        backward of the finite losses; the steps with a finite loss.

        The backward runs while the router still holds the group's rows: with gradient
        checkpointing it recomputes the forward, which must route the rows as the forward did.
        Each lane's parameters only see its rows, so each gets the gradient of its own loss.
        """
        first = group[0].lane.trainer
        noisy = torch.cat([s.inputs.noisy for s in group])
        timesteps = torch.cat([s.inputs.timesteps for s in group])
        hidden = _cat([s.inputs.hidden for s in group])

        def time_ids() -> torch.Tensor:
            return torch.cat([batch_time_ids(s.lane.trainer.data, s.batch) for s in group])

        with self.router.fused([(s.lane.index, len(s.batch)) for s in group]) as rows:
            with first.accelerator.autocast():
                pred = unet_prediction(first.base.unet, noisy, timesteps, hidden, time_ids)
            finite = []
            for step, lane_pred in zip(group, pred.split([r.end - r.start for r in rows])):
                step.loss = step.lane.trainer._step_loss(step.batch, step.inputs, lane_pred) / step.lane.group_size
                try:
                    step.lane.trainer._check_finite(step.loss, step.lane.epoch)
                    finite.append(step)
                except Exception as err:
                    self._fail(step.lane, err)
            if finite:
                first.accelerator.backward(torch.stack([s.loss for s in finite]).sum())
        return finite

    def _lane_batches(self, lane: Lane) -> Iterator[Batch]:
        """Trainer._run_epoch / _train_epoch for one lane, a batch at a time.

        The caller steps the lane (_after_backward) between two batches; the epoch's
        outputs (epoch loss, validation, checkpoints, samples, state) run with this lane
        alone. A lane restored from its training state starts where it stopped.
        """
        t = lane.trainer
        plan = t.plan
        accum = plan.gradient_accumulation_steps
        for epoch in range(t.result.epochs + 1, plan.num_epochs + 1):
            lane.epoch = epoch
            if t.position is None:
                t.position = EpochProgress(t.data.state_dict())
            batches = t.data.epoch(epoch)
            skip = t.position.batches_done
            for i, batch in enumerate(t.data.load(batches[skip:]), start=skip):
                lane.batch_index = i
                lane.group_size = min(accum, len(batches) - (i // accum) * accum)
                lane.closes_group = not ((i + 1) % accum and i + 1 != len(batches))
                yield batch
                if lane.done:
                    break
            losses = t.position.losses
            t.position = None
            with self._as_lane(lane):
                self._end_epoch(lane, epoch, sum(losses) / len(losses))

    def _end_epoch(self, lane: Lane, epoch: int, epoch_loss: float) -> None:
        t = lane.trainer
        t.result.epochs = epoch
        t.result.epoch_losses.append(epoch_loss)
        lane.metrics.log(t.result.steps, {"loss/epoch": epoch_loss}, epoch=epoch)
        t._validate(epoch, lane.metrics)
        t._end_epoch(epoch)
        if epoch == t.plan.num_epochs:
            return
        t.position = EpochProgress(t.data.state_dict())  # the next epoch starts from here
        every = t.cfg.output.save_state_every_n_epochs
        if every and epoch % every == 0:
            t._save_state()

    def _after_backward(self, lane: Lane, loss: float, elapsed: float) -> None:
        t = lane.trainer
        t.position.losses.append(loss * lane.group_size)
        if not lane.closes_group:
            return
        norms = t._optimizer_step()
        t.result.steps += 1
        t.position.batches_done = lane.batch_index + 1
        t.result.train_seconds += elapsed  # the fused step's time, shared by its lanes
        recent = sum(t.position.losses[-lane.group_size :]) / lane.group_size
        lane.metrics.log(t.result.steps, {**t._step_scalars(recent, elapsed), **norms}, epoch=lane.epoch)
        every = t.cfg.output.save_state_every_n_steps
        if every and t.result.steps % every == 0 and not lane.done:
            with as_lane(lane.index):
                t._save_state()

    # ------------------------------------------------------------ lane exits
    def _stop_lanes(self) -> None:
        """A stop was asked: lanes at the end of an accumulation group stop now (state
        saved, "interrupted"); lanes inside one take their next batch first."""
        for lane in self._active():
            if lane.done:  # as a run alone: its last step taken, it finishes
                if self._next_batch(lane) is not None:
                    self._fail(lane, RuntimeError("a lane that had taken all its steps drew another batch"))
            elif lane.closes_group:
                self._interrupt(lane)

    def _interrupt(self, lane: Lane) -> None:
        with as_lane(lane.index):
            try:
                lane.trainer._save_state()
                lane.trainer._stop_if_asked(lane.epoch, self.stop.signal)
            except StopRequested as stop:
                lane.reason = str(stop)
                log.warning("%s", stop)
            except Exception as err:
                self._fail(lane, err)
                return
        self._leave(lane, "interrupted")

    def _stopped_summary(self) -> str:
        return ", ".join(f"{lane.run_dir.name} {lane.status}" for lane in self.lanes)

    def _complete(self, lane: Lane) -> None:
        try:
            with self._as_lane(lane):
                lane.trainer._finish()
        except Exception as err:
            self._fail(lane, err)
            return
        self._leave(lane, "completed")
        with as_lane(lane.index):
            log.info("lane %d (%s) completed: %d steps", lane.index, lane.run_dir.name, lane.result.steps)

    def _fail(self, lane: Lane, err: BaseException) -> None:
        lane.reason = failure_reason(err)
        self._leave(lane, "failed")
        with as_lane(lane.index):
            log.warning("lane %d (%s) failed, the others go on: %s", lane.index, lane.run_dir.name, lane.reason)

    def _leave(self, lane: Lane, status: str) -> None:
        lane.status = status
        remove_lane(self.slots, lane.index)
        network = getattr(lane.trainer, "network", None)
        if network is not None:
            network.requires_grad_(False)
            for p in network.parameters():
                p.grad = None
        result = lane.trainer.result if lane.trainer is not None else None
        lane.summary = summarise(status, result, lane.started, lane.reason)
        # Which runs shared the pass (benchmarks/bench_train.py counts a group's steps once).
        lane.summary["fused"] = {"lane": lane.index, "lanes": len(self.cfgs), "runs": [d.name for d in self.run_dirs]}
        write_summary(self.run_dirs[lane.index], lane.summary)
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
    for cfg, run_dir in zip(cfgs, run_dirs):
        validate(cfg)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_resolved_config(Path(run_dir), cfg)
    return train_fused(cfgs, run_dirs)


def train_fused(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Train `cfgs` fused into run dirs that already hold their config.yaml (atelier.fused.worker)."""
    phases.start_job(time.time())
    return FusedTrainer(cfgs, run_dirs).train()
