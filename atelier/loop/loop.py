"""`TrainingLoop`: one loop for one adapter (a plain run) or K adapters (a fused group).

Per pass, every running adapter draws its next batch and builds its UNet inputs; inputs of
the same shapes share one UNet call (K=1: one group, the UNet call a plain run makes); each
adapter's loss is its own, and one backward of the group's finite losses gives each adapter
the gradient of its own loss (its parameters only see its rows). Then, per adapter:

- inside an accumulation group: the loss is kept for the epoch's mean;
- at a group's end: optimizer step, metrics, data-parallel agreement on the loss and on a
  stop signal, the state saved every save_state_every_n_steps or on a stop, the stop;
- at an epoch's end: the epoch loss, validation, checkpoint and samples (the optimizer's
  eval weights in the model), the state saved every save_state_every_n_epochs or on a stop,
  the stop; after the last epoch the final LoRA, and the adapter leaves.
- a run of a search reports each validation loss to its trial (the last epoch's excepted:
  that is its result); when the trial is pruned, the adapter saves its LoRA as it stands
  and leaves as "pruned" (in a fused group, the others go on without it).

`isolate_failures` (a fused group): an adapter whose loss is NaN/inf, that fails or that
stops leaves, and the others go on; once none is left, a stop signal raises StopRequested
for the group. Without it (a plain run) the error or the stop propagates at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from atelier.loop.adapter import Adapter
from atelier.loop.epochs import Draw, draws
from atelier.loop.inputs import StepInputs, joined, same_shapes
from atelier.loop.result import EpochProgress
from atelier.runtime import phases
from atelier.conditioning.training_data import batch_time_ids
from atelier.optim.optimizers import eval_weights
from atelier.runtime.signals import StopFlag, StopRequested, stop_on_signals

log = logging.getLogger(__name__)


class Router(Protocol):
    """How adapters share the base model's layers (atelier.fused.slots.LaneRouter)."""

    def fused(self, lanes_and_sizes: list[tuple[int, int]]) -> AbstractContextManager:
        """The forward in progress holds these lanes' rows, in order."""

    def alone(self, lane: int) -> AbstractContextManager:
        """Lane `lane` alone in the model and in the logs (validation, samples, saving)."""


@dataclass
class _Step:
    adapter: Adapter
    draw: Draw
    inputs: StepInputs
    loss: torch.Tensor | None = None


@dataclass
class _Track:
    """The loop's hold on one adapter: its batches, the one in progress, its group's start."""

    draws: Iterator[Draw]
    draw: Draw | None = None
    group_started: float = 0.0


class TrainingLoop:
    def __init__(
        self,
        adapters: list[Adapter],
        router: Router | None = None,
        isolate_failures: bool = False,
        on_leave: Callable[[Adapter, BaseException | None], None] | None = None,
    ):
        """router: None when one adapter's network is applied to the model itself.
        on_leave(adapter, error): called as an adapter leaves (its status set)."""
        self.adapters = adapters
        self.router = router
        self.isolate = isolate_failures
        self.on_leave = on_leave
        self.stop = StopFlag()
        self.passes = 0  # forward/backward passes (a fused group's steps)
        self.pass_seconds: list[float] = []
        self._tracks: dict[int, _Track] = {}
        self._progress: tqdm | None = None

    def active(self) -> list[Adapter]:
        return [a for a in self.adapters if a.status == "running"]

    def run(self) -> None:
        """Train every running adapter to its end (restore() and open_metrics() done before)."""
        with stop_on_signals() as self.stop:
            for adapter in self.active():
                self._tracks[id(adapter)] = _Track(draws(adapter), group_started=time.perf_counter())
                # Only then: a schedule-free optimizer's eval/train switch rounds the weights.
                if adapter.first_samples_due:
                    with self._errors_of([adapter]), self._alone(adapter), phases.phase("epoch_outputs"), \
                            eval_weights(adapter.optimizer):
                        adapter.samples.generate(0, 0)
            self._progress = self._progress_bar()
            try:
                while self.active():
                    self._pass()
            finally:
                self._progress.close()
                for adapter in self.adapters:
                    adapter.close()
        if self.isolate and self.stop.signal:
            where = ", ".join(f"{a.run_dir.name} {a.status}" for a in self.adapters)
            raise StopRequested(self.stop, f"stopped by {self.stop.name}: {where}")

    # ------------------------------------------------------------------ pass
    def _pass(self) -> None:
        steps: list[_Step] = []
        for adapter in self.active():
            with self._errors_of([adapter]):
                draw = self._next_draw(adapter)
                if draw is not None:
                    steps.append(_Step(adapter, draw, adapter.step_inputs(draw.batch)))
        if not steps:
            return
        tic = time.perf_counter()
        finite: list[_Step] = []
        for group in same_shapes(steps, lambda step: step.inputs):
            with self._errors_of([step.adapter for step in group]):  # the shared forward: all of them
                finite += self.forward_backward(group)
        self.passes += 1
        self.pass_seconds.append(time.perf_counter() - tic)
        for step in finite:
            with self._errors_of([step.adapter]):
                self.after_backward(step.adapter, step.loss.item())

    def _next_draw(self, adapter: Adapter) -> Draw | None:
        """The adapter's next batch; None when it left instead (its last epoch ended)."""
        track = self._tracks[id(adapter)]
        for draw in track.draws:
            if draw.batch is not None:
                track.draw = draw
                return draw
            self._end_epoch(adapter, draw.epoch)  # its batches were trained before a restart
            if adapter.status != "running":
                return None
        self._complete(adapter)  # not reached: the last epoch's end completes it
        return None

    def forward_backward(self, group: list[_Step]) -> list[_Step]:
        """One UNet call on the group's inputs, each adapter's loss on its rows, one backward
        of the finite losses; the steps with a finite loss.

        The backward runs while the router still holds the group's rows: with gradient
        checkpointing it recomputes the forward, which must route the rows as the forward did.
        """
        lead = group[0].adapter
        noisy = joined([s.inputs.noisy for s in group])
        timesteps = joined([s.inputs.timesteps for s in group])
        hidden = joined([s.inputs.hidden for s in group])

        def time_ids() -> torch.Tensor:
            return joined([batch_time_ids(s.adapter.data, s.draw.batch) for s in group])

        with self._rows(group):
            with lead.accelerator.autocast():
                pred = lead.objective.predict(lead.base.unet, noisy, timesteps, hidden, time_ids)
            preds = pred.split([len(s.draw.batch) for s in group]) if len(group) > 1 else [pred]
            finite = []
            for step, adapter_pred in zip(group, preds):
                with self._errors_of([step.adapter]):
                    step.loss = step.adapter.step_loss(step.draw.batch, step.inputs, adapter_pred) / step.draw.group_size
                    step.adapter.check_finite(step.loss, step.draw.epoch)
                    finite.append(step)
            if finite:
                losses = [s.loss for s in finite]
                lead.accelerator.backward(losses[0] if len(losses) == 1 else torch.stack(losses).sum())
        return finite

    def after_backward(self, adapter: Adapter, loss: float) -> None:
        """The adapter's part after a backward: at its group's end the optimizer step and what follows."""
        track = self._tracks[id(adapter)]
        draw, position, result = track.draw, adapter.position, adapter.result
        position.losses.append(loss * draw.group_size)
        if not draw.closes_group:
            return
        norms = adapter.optimizer_step()
        result.steps += 1
        position.batches_done = draw.index + 1
        elapsed = time.perf_counter() - track.group_started
        result.train_seconds += elapsed
        # Processes decide together, so none waits for a step the others will not take.
        recent = sum(position.losses[-draw.group_size :]) / draw.group_size
        recent, stop_signal = adapter.parallel.agree(recent, self.stop.signal)
        adapter.metrics.log(result.steps, {**adapter.step_scalars(recent, elapsed), **norms}, epoch=draw.epoch)
        self._show_progress(draw.epoch, recent)
        if not (adapter.done or draw.ends_epoch) and adapter.validation_due(None):  # else the epoch's end does it
            if self._validate(adapter, draw.epoch):
                return
        if adapter.done:  # its last step: the final LoRA follows; a state only if one is to be kept
            with self._alone(adapter):
                adapter.save_final_state()
        else:
            # Only on the steps it saves or samples: a schedule-free optimizer's eval/train switch rounds the weights.
            if adapter.step_outputs_due:
                with self._alone(adapter), phases.phase("epoch_outputs"), eval_weights(adapter.optimizer):
                    adapter.step_outputs(draw.epoch)
            with self._alone(adapter):
                every = adapter.cfg.output.save_state_every_n_steps
                due = bool(every) and result.steps % every == 0
                if stop_signal or due:
                    adapter.save_state("step" if due else None)
                adapter.stop_if_asked(draw.epoch, self.stop, stop_signal)
        if adapter.done or draw.ends_epoch:
            self._end_epoch(adapter, draw.epoch)
        track.group_started = time.perf_counter()

    # ----------------------------------------------------------------- epoch
    def _end_epoch(self, adapter: Adapter, epoch: int) -> None:
        result = adapter.result
        epoch_loss = adapter.position.mean_loss
        result.epochs = epoch
        result.epoch_losses.append(epoch_loss)
        adapter.metrics.log(result.steps, {"loss/epoch": epoch_loss}, epoch=epoch)
        last = epoch == adapter.plan.num_epochs or adapter.done
        # The last epoch's validation loss is the trial's result, not a report to prune on.
        if adapter.validation_due(epoch) and self._validate(adapter, epoch, report=not last):
            return
        with self._alone(adapter):
            if adapter.parallel.is_main:
                with phases.phase("epoch_outputs"), eval_weights(adapter.optimizer):
                    adapter.epoch_outputs(epoch)
            if last:
                self._complete(adapter)
                return
            # The next epoch starts from the data state this one left.
            adapter.position = EpochProgress(adapter.data.state_dict())
            _, stop_signal = adapter.parallel.agree(0.0, self.stop.signal)
            every = adapter.cfg.output.save_state_every_n_epochs
            due = bool(every) and epoch % every == 0
            if stop_signal or due:
                adapter.save_state("epoch" if due else None)
            adapter.stop_if_asked(epoch, self.stop, stop_signal)

    def _validate(self, adapter: Adapter, epoch: int, report: bool = True) -> bool:
        """The validation loss now (main process), reported to the adapter's trial if it has
        one; True when the trial pruned it (it has left)."""
        loss = None
        with self._alone(adapter):
            if adapter.parallel.is_main:
                # Two blocks, as two switches: a schedule-free optimizer's eval/train switch
                # rounds, and the weights must be those of a run that always switched so.
                with phases.phase("validation"), eval_weights(adapter.optimizer):
                    loss = adapter.validate(epoch)
            if not (report and adapter.should_prune(loss)):
                return False
            shown = "" if loss is None else f" (validation loss {loss:.5f})"
            adapter.reason = f"pruned by its search trial at step {adapter.result.steps}{shown}"
            with phases.phase("final_outputs"), eval_weights(adapter.optimizer):
                adapter.finish_pruned()
        self._leave(adapter, "pruned", None)
        return True

    def _complete(self, adapter: Adapter) -> None:
        with self._alone(adapter), phases.phase("final_outputs"), eval_weights(adapter.optimizer):
            adapter.finish()
        self._leave(adapter, "completed", None)

    # ---------------------------------------------------------- leaving early
    @contextlib.contextmanager
    def _errors_of(self, adapters: list[Adapter]) -> Iterator[None]:
        """Isolating: an error (or a stop) inside makes these adapters leave; else it propagates."""
        try:
            yield
        except (Exception, StopRequested) as err:
            if not self.isolate:
                raise
            status = "interrupted" if isinstance(err, StopRequested) else "failed"
            for adapter in adapters:
                if adapter.status == "running":
                    self._leave(adapter, status, err)

    def _leave(self, adapter: Adapter, status: str, error: BaseException | None) -> None:
        adapter.status = status
        adapter.close()
        if self.on_leave is not None:
            self.on_leave(adapter, error)

    # ------------------------------------------------------------- routing
    def _rows(self, group: list[_Step]) -> AbstractContextManager:
        if self.router is None:
            return contextlib.nullcontext()
        return self.router.fused([(s.adapter.index, len(s.draw.batch)) for s in group])

    def _alone(self, adapter: Adapter) -> AbstractContextManager:
        return contextlib.nullcontext() if self.router is None else self.router.alone(adapter.index)

    # ------------------------------------------------------------ progress
    def _progress_bar(self) -> tqdm:
        active = self.active()
        single = len(self.adapters) == 1
        return tqdm(
            total=max((a.last_step for a in active), default=0),
            initial=max((a.result.steps for a in active), default=0),
            desc="training" if single else f"training {len(self.adapters)} lanes",
            unit="step",
            dynamic_ncols=True,
            disable=not all(a.parallel.is_main for a in active),
        )

    def _show_progress(self, epoch: int, loss: float) -> None:
        """The bar follows the adapter furthest on; one adapter shows its epoch and loss."""
        progress = self._progress
        steps = max(a.result.steps for a in self.adapters)
        if progress is None or steps <= progress.n:
            return
        progress.update(steps - progress.n)
        if len(self.adapters) == 1:
            progress.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        else:
            progress.set_postfix(lanes=len(self.active()))
