"""The trackers beside metrics.jsonl (output.log_with): TensorBoard and Weights & Biases.

Where they write follows sd-scripts (library/train_util.py: prepare_accelerator, init_trackers):
output.logging_dir holds one folder per run, <log_prefix><YYYYmmddHHMMSS>, TensorBoard's events in
its <log_tracker_name>/ subfolder (default network_train), wandb's files in its wandb/ subfolder,
the wandb project being the tracker name. Two changes, both for runs that log side by side: the
folder ends in _<output_name> (the jobs of a sweep, the lanes of a fused group, start within
the same second), and each run's wandb run is its own (named output.output_name unless
output.wandb_run_name says otherwise), never the process's global one. Without
output.logging_dir everything stays in the run dir: tensorboard/ and wandb/.

Where a run logged is kept in <run dir>/trackers.json (only when a logging_dir or wandb is
used), so a resumed run goes on in the same folder and the same wandb run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from atelier.config.schema import AtelierConfig
from atelier.config.schema.output import tracker_start_args, uses_tracker
from atelier.errors import UserError
from atelier.utils.atomic import write_text

TENSORBOARD = "tensorboard"
TRACKER_NAME = "network_train"  # sd-scripts' default for train_network.py
PLACE_FILE = "trackers.json"


class TrackerError(UserError, RuntimeError):
    """A tracker could not start (e.g. wandb online without an account)."""


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float], fields: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LogPlace:
    """Where one run's trackers write, and under which names."""

    folder: str  # the run's log folder (wandb's dir)
    tensorboard: str  # TensorBoard's event folder
    project: str  # the tracker name: the wandb project
    run_name: str  # the wandb run's name
    wandb_id: str | None = None  # set once a wandb run was started (a resumed run continues it)


def log_place(cfg: AtelierConfig, run_dir: Path, resumed: bool) -> LogPlace:
    """This run's place: the one it logged to before when it continues, else a new one."""
    saved = run_dir / PLACE_FILE
    if resumed and saved.is_file():
        return LogPlace(**json.loads(saved.read_text()))
    out = cfg.output
    project = out.log_tracker_name or TRACKER_NAME
    run_name = out.wandb_run_name or out.output_name
    if out.logging_dir is None:
        return LogPlace(str(run_dir), str(run_dir / TENSORBOARD), project, run_name)
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    folder = Path(out.logging_dir).expanduser().resolve() / f"{out.log_prefix or ''}{stamp}_{out.output_name}"
    return LogPlace(str(folder), str(folder / project), project, run_name)


def keep_place(run_dir: Path, place: LogPlace) -> None:
    write_text(run_dir / PLACE_FILE, json.dumps(asdict(place), indent=2) + "\n")


class TensorBoardTracker:
    def __init__(self, folder: str, purge_step: int, start_args: dict[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a run continuing from a state drops what a killed run logged after it.
        self.writer = SummaryWriter(folder, purge_step=purge_step, **(start_args or {}))

    def log(self, step: int, scalars: dict[str, float], fields: dict[str, Any]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run of its own (reinit="create_new"): a fused group's lanes log at once from
    one process. WANDB_MODE=offline (or `wandb offline`) logs without an account or network."""

    def __init__(self, place: LogPlace, config: dict[str, Any], resumed: bool, start_args: dict[str, Any]):
        import wandb

        Path(place.folder).mkdir(parents=True, exist_ok=True)
        # output.log_tracker_config's [wandb] arguments; the schema refused those set here.
        start_args = {"settings": wandb.Settings(console="off"), **start_args}
        try:
            self.run = wandb.init(
                project=place.project, name=place.run_name, dir=place.folder, config=config,
                id=place.wandb_id, resume="allow" if resumed and place.wandb_id else None,
                reinit="create_new", **start_args,
            )  # fmt: skip
        except Exception as error:  # wandb's errors (no API key, no network) have no common base
            raise TrackerError(
                f"output.log_with: wandb did not start ({type(error).__name__}: {error}). Log in with "
                "`.venv/bin/wandb login` or WANDB_API_KEY, or log offline with WANDB_MODE=offline"
            ) from error

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, step: int, scalars: dict[str, float], fields: dict[str, Any]) -> None:
        numbers = {k: v for k, v in fields.items() if isinstance(v, (int, float))}  # epoch, as sd-scripts adds it
        self.run.log({**scalars, **numbers}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: AtelierConfig | None, run_dir: Path, resume_step: int | None) -> list[Tracker]:
    """The trackers output.log_with asks for (TensorBoard in <run dir>/tensorboard without a config)."""
    kept = resume_step if resume_step is not None else -1
    if cfg is None:
        return [TensorBoardTracker(str(run_dir / TENSORBOARD), kept + 1)]
    out, resumed = cfg.output, resume_step is not None
    place = log_place(cfg, run_dir, resumed)
    start_args = tracker_start_args(out.log_tracker_config) if out.log_tracker_config else {}
    trackers: list[Tracker] = []
    if uses_tracker(out.log_with, "wandb"):  # first: when it cannot start, nothing else was opened
        wandb_tracker = WandbTracker(place, run_config(cfg), resumed, start_args.get("wandb", {}))
        place = LogPlace(**{**asdict(place), "wandb_id": wandb_tracker.id})
        trackers.append(wandb_tracker)
    if uses_tracker(out.log_with, TENSORBOARD):
        trackers.append(TensorBoardTracker(place.tensorboard, kept + 1, start_args.get(TENSORBOARD)))
    if out.logging_dir is not None or uses_tracker(out.log_with, "wandb"):
        keep_place(run_dir, place)
    return trackers


def run_config(cfg: AtelierConfig) -> dict[str, Any]:
    """The resolved config as plain values: wandb shows it beside each run (a sweep's axes)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
