"""The training-state part of an Adapter: saving the state a run continues from, keeping
copies to train on from later (output.save_state_on_train_end, save_last_n_*_state),
restoring it (a run started again) or starting from another run's (training.resume_from),
and stopping on a signal with the state saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from atelier.loop.epochs import step_place
from atelier.loop.result import EpochProgress, TrainResult
from atelier.loop.state import (
    STATE_FILE,
    ResumeError,
    config_fingerprint,
    drop_old_states,
    kept_state_name,
    load_training_state,
    rng_states,
    save_training_state,
    set_rng_states,
    state_to_resume_from,
)
from atelier.runtime import phases
from atelier.runtime.signals import StopFlag, StopRequested

if TYPE_CHECKING:
    import torch

    from atelier.conditioning.training_data import TrainingData
    from atelier.config.schema import AtelierConfig
    from atelier.data.plan import TrainingPlan
    from atelier.loop.run_start import RunStart
    from atelier.network.lora import LoRANetwork
    from atelier.runtime.distributed import DataParallel

log = logging.getLogger(__name__)


class AdapterState:
    """Mixed into atelier.loop.adapter.Adapter, whose parts it saves and loads."""

    cfg: AtelierConfig
    run_dir: Path
    result: TrainResult
    position: EpochProgress | None
    parallel: DataParallel
    plan: TrainingPlan
    start: RunStart
    data: TrainingData
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler

    def save_state(self, due: str | None = None) -> None:
        """training_state.pt (output.save_state), which a run started again continues from.
        `due`: "epoch" / "step" when output.save_state_every_n_epochs / _steps asked for this save
        (not a stop signal): output.save_last_n_epochs_state / _steps_state then keep a copy."""
        out = self.cfg.output
        if not out.save_state or not self.parallel.is_main:
            return
        kept = {"epoch": out.save_last_n_epochs_state, "step": out.save_last_n_steps_state}.get(due or "")
        with phases.phase("state_saving"):
            tic = time.perf_counter()
            state = self._state_dict()
            save_training_state(self.run_dir, state)
            if kept:
                r = self.result
                save_training_state(self.run_dir, state, kept_state_name(out.output_name, r.epochs if due == "epoch"
                                                                         else None, r.steps))  # fmt: skip
                drop_old_states(self.run_dir, out.output_name, out.save_last_n_epochs_state,
                                out.save_last_n_steps_state, r.steps)  # fmt: skip
            log.info("training state saved at step %d (%.2f s)", self.result.steps, time.perf_counter() - tic)

    def save_final_state(self) -> None:
        """output.save_state_on_train_end: the last step's state as <output_name>-state.pt (main
        process), to train on from (training.resume_from). Saved before the epoch's end is
        processed, as a stop's state is: a run resumed from it replays that end, then goes on."""
        if not (self.cfg.output.save_state_on_train_end and self.parallel.is_main):
            return
        with phases.phase("state_saving"):
            path = save_training_state(self.run_dir, self._state_dict(), kept_state_name(self.cfg.output.output_name))
        log.info("final training state kept in %s (training.resume_from=%s trains on from it)", path.name, path)

    def stop_if_asked(self, epoch: int, stop: StopFlag, stop_signal: int | None) -> None:
        """StopRequested when a process got a stop signal (its state was saved just before)."""
        if not stop_signal:
            return
        stop.signal = stop_signal  # another process may have got it
        where = f"step {self.result.steps} (epoch {epoch})"
        if self.cfg.output.save_state:
            message = (
                f"stopped by {stop.name} at {where}; the training state is in {self.run_dir / STATE_FILE}: "
                "run the same command again (same run dir) to continue"
            )
        else:
            message = f"stopped by {stop.name} at {where}; output.save_state=false, so it cannot be continued"
        raise StopRequested(stop, message)

    def _state_dict(self) -> dict:
        r = self.result
        return {
            "config_fingerprint": config_fingerprint(self.cfg),
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": rng_states(),
            "position": self.position.as_dict(),
            "epoch": r.epochs,
            "steps": r.steps,
            "epoch_losses": r.epoch_losses,
            "validation_losses": r.validation_losses,
            "train_seconds": r.train_seconds,
            "checkpoints": [p.name for p in r.checkpoints],
        }

    def restore(self) -> bool:
        """Load the run dir's training state if there is one (True: the run continues); else,
        with training.resume_from, start from that state (a new run, False)."""
        with phases.phase("restore"):
            state = load_training_state(self.run_dir, config_fingerprint(self.cfg))
            if state is not None:
                self._load_state(state)
                return True
            if self.cfg.training.resume_from is not None:
                self._start_from(Path(self.cfg.training.resume_from).expanduser())
            if self.start.given:
                self._begin_at_start()
        return False

    def _begin_at_start(self) -> None:
        """training.initial_epoch / initial_step (atelier.loop.run_start): the run's count starts
        there. With skip_until_initial_step the data of the epochs before are drawn and dropped
        (no image is loaded), and the first epoch skips its batches before the step, so the run
        trains what an unbroken run would from that step on."""
        start, r = self.start, self.result
        if self.cfg.training.resume_from is not None:
            log.warning("training.initial_epoch / initial_step: the step count and data position of training.resume_from's "
                        "state are not used (its network, optimizer and schedule position are), as sd-scripts ignores "
                        "the state's steps then")  # fmt: skip
        r.epochs, r.steps, r.epoch_losses, r.validation_losses = start.epochs_before, start.steps_before, [], []
        self.data.restart_draws()
        self.position = None  # the first epoch's draws start from the data's state (epochs.draws)
        if start.steps_before:
            for epoch in range(1, start.epochs_before + 1):
                self.data.epoch(epoch, step_place(self, epoch))
            self.position = EpochProgress(self.data.state_dict(), start.batches_done)
        log.info("starting at epoch %d, step %d%s", r.epochs + 1, r.steps,
                 f" ({start.batches_done} batches of it skipped)" if start.batches_done else "")  # fmt: skip

    def _start_from(self, path: Path) -> None:
        """training.resume_from (sd-scripts' --resume): another run's state, under this config."""
        # With training.initial_epoch / initial_step the state's step count is not used.
        state = state_to_resume_from(path, None if self.start.given else self.plan.total_steps)
        try:
            self._load_state({**state, "checkpoints": []}, source=path.name)  # its checkpoints are the other run's
        except (RuntimeError, ValueError, KeyError) as err:  # torch's load_state_dict mismatches
            raise ResumeError(f"training.resume_from={path}: the state does not fit this run's network or optimizer "
                              f"({str(err).strip().splitlines()[0][:300]}); network.module, network.dim and "
                              "optimizer.type must be the ones it was saved with") from None

    def _load_state(self, state: dict, source: str = STATE_FILE) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_states(state["rng"])
        position = state["position"]
        self.data.load_state_dict(position["data"])
        self.position = EpochProgress(position["data"], position["batches_done"], list(position["losses"]))
        r = self.result
        r.epochs, r.steps, r.epoch_losses = state["epoch"], state["steps"], list(state["epoch_losses"])
        r.validation_losses = list(state["validation_losses"])
        r.train_seconds = state["train_seconds"]
        r.checkpoints = [self.run_dir / name for name in state["checkpoints"]]
        log.info(
            "resuming from %s: step %d, epoch %d (+%d batches of epoch %d)",
            source, r.steps, r.epochs, self.position.batches_done, r.epochs + 1,
        )
