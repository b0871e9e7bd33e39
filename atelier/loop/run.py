"""One training job: check the config, record how to replay it, train, summarise."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from atelier.config.schema import AtelierConfig
from atelier.outputs.run_dir import write_environment
from atelier.outputs.summary import write_summary
from atelier.runtime import phases
from atelier.loop.lr_find import suggest_and_report
from atelier.runtime.distributed import process_rank
from atelier.loop.metrics import peak_memory_mb
from atelier.runtime.signals import SECOND_CTRL_C, StopRequested, raise_if_stop_asked, stop_on_signals
from atelier.loop.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM)

def failure_reason(err: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message}"


def summarise(status: str, result: TrainResult | None, started: float, reason: str | None = None) -> dict[str, Any]:
    wall = time.time() - started
    summary: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "wall_seconds": round(wall, 3),
        "finished_at": time.time(),
        "peak_memory_mb": peak_memory_mb(),
        # Where the wall time went: setup phases, "steps" (the timed training steps), "other".
        "phase_seconds": phases.job_phases(wall, **({"steps": result.train_seconds} if result else {})),
    }
    if phases.process_start_seconds is not None:  # the first job of a process: imports, Hydra
        summary["process_start_seconds"] = round(phases.process_start_seconds, 3)
    if phases.import_seconds is not None:  # ... of which importing the training stack
        summary["import_seconds"] = round(phases.import_seconds, 3)
    if result is not None:
        summary.update(
            steps=result.steps,
            epochs=result.epochs,
            final_loss=result.final_loss,
            best_loss=result.best_loss,
            validation_loss=result.validation_loss,
            best_validation_loss=result.best_validation_loss,
            epoch_losses=result.epoch_losses,
            seconds_per_step=result.seconds_per_step,
            output_file=result.output_file.name if result.output_file else None,
            checkpoints=[p.name for p in result.checkpoints],
        )
    return summary


def record_ending(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json of a run ending on an error or a stop. Failing to write it (the disk that
    ended the run is full) is logged, never raised over what ended the run."""
    try:
        write_summary(run_dir, summary)
    except OSError as err:
        log.error("summary.json not written: %s", err)


def run_training(cfg: AtelierConfig, run_dir: Path, started: float | None = None) -> dict[str, Any]:
    """Train one LoRA into `run_dir`; summary.json is written whatever ends it.

    A stop signal (Ctrl-C, SIGTERM, ...) at any point, setup included, ends it as
    "interrupted" and raises StopRequested. Ctrl-C or SIGTERM that came as the run was
    completing raise it too, after the "completed" summary: a sweep in this process
    must not start its next job.
    """
    started = started or time.time()
    main = process_rank() == 0  # the other processes of a data-parallel run write nothing
    trainer = None
    with stop_on_signals() as flag:
        try:
            raise_if_stop_asked("starting the run")
            trainer = Trainer(cfg, run_dir)
            if main:
                write_environment(run_dir, str(trainer.device))
            result = trainer.train()
            # experiment=lr_find: the logged d*lr as a learning rate for AdamW (lr_suggestion.json).
            suggestion = suggest_and_report(run_dir, cfg.optimizer.type) if cfg.training.suggest_lr and main else None
        except StopRequested as stop:
            if main:
                record_ending(run_dir, summarise("interrupted", trainer and trainer.result, started, str(stop)))
            log.warning("%s", stop)
            stop.flag.pass_on()  # e.g. submitit's SIGUSR2 handler: requeue the job and exit
            raise
        except KeyboardInterrupt:  # a second Ctrl-C (signals.SECOND_CTRL_C)
            if main:
                record_ending(run_dir, summarise("interrupted", trainer and trainer.result, started, SECOND_CTRL_C))
            log.warning("%s", SECOND_CTRL_C)
            raise
        except BaseException as err:
            if main:
                record_ending(run_dir, summarise("failed", trainer and trainer.result, started, failure_reason(err)))
            raise
        # completed, or pruned by its search trial (with the reason)
        summary = summarise(trainer.adapter.status, result, started, trainer.adapter.reason)
        if suggestion is not None:
            summary["lr_suggestion"] = suggestion["learning_rate"]
        if main:
            write_summary(run_dir, summary)
            if trainer.adapter.trial_link is not None:
                trainer.adapter.trial_link.tell(summary)
        log.info(
            "%s: %d steps in %.1f s (%.3f s/step), final loss %.4f -> %s",
            "done" if summary["status"] == "completed" else summary["status"],
            result.steps,
            summary["wall_seconds"],
            result.seconds_per_step or 0.0,
            result.final_loss or float("nan"),
            result.output_file or (result.checkpoints[-1] if result.checkpoints else None),
        )
        if flag.signal in ENDING_SIGNALS:  # SIGUSR1/2 only warn of a time limit: nothing is left to save
            message = f"stopped by {flag.name} as the run completed (its LoRA is saved: {result.output_file})"
            log.warning("%s", message)
            raise StopRequested(flag, message)
    return summary
