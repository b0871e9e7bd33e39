"""A run dir (or sweep dir) belongs to one config: checked before Hydra writes anything.

Registered as a Hydra callback in conf/config.yaml. `on_run_start` / `on_multirun_start`
run before Hydra creates the dir and writes .hydra/, so a refused run leaves the dir as it
was. The rules, for a dir that already holds something:

- files the project did not write (a folder of the user's): refused, always;
- a run of another config: refused, naming the differing keys;
- a finished run of this config: refused unless resume=true (then skipped) or overwrite=true;
- an unfinished run of this config: continued (from its training state, if any);
- a sweep dir: refused unless resume=true (finished jobs skipped, changed ones run as new
  jobs, atelier/sweep/placement.py) or overwrite=true.

overwrite=true never deletes: the old files move into `replaced-<UTC time>/` inside the dir.
The dir's lock (atelier/outputs/lock.py) is taken before any of this is decided, so a second
writer fails at once and a resume never starts while the old writer lives.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from atelier.config.schema.checks import name_problem
from atelier.config.validate import NAME_KEYS, ConfigError, check_known_keys, check_names, check_required
from atelier.errors import UserError
from atelier.outputs.lock import LOCK_FILE, DirLockedError, announce_holder, lock_dir
from atelier.outputs.summary import read_summary

log = logging.getLogger(__name__)

# Files only this project (or Hydra for it) writes into a run or sweep dir.
OUR_MARKERS = (".hydra", LOCK_FILE, "summary.json", "multirun.yaml", "training_state.pt", "command.sh",
               "stdout.log", "stderr.log")  # fmt: skip
RESOLVED_CONFIG = "config.yaml"
# Keys that say how to start a run, not what it trains (trial: which study it reports to).
BOOKKEEPING_KEYS = ("resume", "overwrite", "trial")
REPLACED_PREFIX = "replaced-"


class RunDirError(UserError, RuntimeError):
    """The run dir cannot take this run; the message says why and how to go on."""


class RunDirGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from atelier.runtime.distributed import in_worker

        if in_worker():  # a data-parallel rank: the process that started the ranks holds the dir
            return
        # Keys no code reads, then mandatory keys: hydra.run.dir is built from them (${project}).
        _refuse_on_error(lambda: check_known_keys(_task_config(config)))
        _refuse_on_error(lambda: check_required(_task_config(config)))
        _refuse_on_error(lambda: guard_run_dir(Path(str(config.hydra.run.dir)), _task_config(config)))
        announce_holder(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        def check() -> None:
            check_known_keys(_task_config(config))
            check_required(_task_config(config))
            check_swept_names(list(config.hydra.overrides.task))
            guard_sweep_dir(Path(str(config.hydra.sweep.dir)), _task_config(config))

        _refuse_on_error(check)
        announce_holder(Path(str(config.hydra.sweep.dir)))


def guard_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Check `run_dir` can take a run of `cfg`, lock it, move old results aside if asked.
    The lock is taken before the checks, and announced (pid, host) only once they pass."""
    if not _claim(run_dir, cfg, "run"):
        return
    if cfg.get("overwrite"):
        move_aside(run_dir)
        return
    stored = _stored_config(run_dir)
    if stored is None:  # a run that stopped before its config was written: nothing trained
        return
    differing = differing_keys(stored, _plain(cfg))
    if differing:
        raise RunDirError(
            f"{run_dir} holds a run of another config (differing: {', '.join(differing)}). "
            "Write this run elsewhere (another hydra.run.dir), or pass overwrite=true to move the old "
            "results aside into a replaced-<time>/ subfolder."
        )
    summary = read_summary(run_dir) or {}
    if summary.get("status") in ("completed", "pruned") and not cfg.get("resume"):
        raise RunDirError(
            f"{run_dir} holds a finished run of this config{' (pruned by its search trial)' if summary['status'] == 'pruned' else ''}. Pass resume=true to keep it (nothing is "
            "trained again), overwrite=true to train it again (the old results move into a "
            "replaced-<time>/ subfolder), or write this run elsewhere (another hydra.run.dir)."
        )


def guard_sweep_dir(sweep_dir: Path, cfg: DictConfig) -> None:
    """The same for a sweep dir; the jobs inside are placed by the sweeper."""
    if not _claim(sweep_dir, cfg, "sweep"):
        return
    if cfg.get("overwrite"):
        move_aside(sweep_dir)
    elif not cfg.get("resume"):
        raise RunDirError(
            f"{sweep_dir} already holds a sweep. Pass resume=true to continue it (finished jobs are "
            "skipped, jobs whose config changed run as new jobs beside the old ones), overwrite=true to "
            "move the old results aside into a replaced-<time>/ subfolder, or sweep into another "
            "hydra.sweep.dir."
        )


def check_swept_names(overrides: list[str]) -> None:
    """Each value a sweep gives `project` or `output.output_name` is a name too: checked
    before the first job runs, not when its own job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group.lstrip("+~")
        if key not in NAME_KEYS:
            continue
        values = override.sweep_string_iterator() if override.is_sweep_override() else [override.get_value_element_as_str()]
        for value in values:
            problem = name_problem(value)
            if problem:
                raise ConfigError(
                    f"{key}={value!r} (a value of the sweep) {problem}: it is a name, not a path. "
                    f"Sweep over plain names such as {key}=a,b."
                )


def differing_keys(old: dict, new: dict, limit: int = 8) -> list[str]:
    """Dotted keys whose values differ between two configs (bookkeeping keys left out)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _ABSENT) != b.get(k, _ABSENT)
                  and k.split(".")[0] not in BOOKKEEPING_KEYS)  # fmt: skip
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def move_aside(directory: Path) -> Path:
    """Every entry but the lock (and earlier replaced-* folders) into replaced-<UTC time>/."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    target = directory / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir()
    for entry in directory.iterdir():
        if entry.name != LOCK_FILE and entry != target and not entry.name.startswith(REPLACED_PREFIX):
            entry.rename(target / entry.name)
    log.warning("overwrite=true: moved the old results of %s into %s", directory, target.name)
    return target


def stored_job_config(job_dir: Path) -> dict | None:
    """The resolved config a job dir's run trained with (config.yaml), or None."""
    return _stored_config(job_dir)


def plain_config(cfg: DictConfig) -> dict:
    """`cfg` resolved, without Hydra's node, as config.yaml stores it."""
    return _plain(cfg)


# ---------------------------------------------------------------- helpers
_ABSENT = object()


def _task_config(config: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])


def _plain(cfg: DictConfig) -> dict:
    if "hydra" in cfg:  # Hydra's node resolves only inside a job (hydra.runtime.*)
        cfg = _task_config(cfg)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)


def _stored_config(directory: Path) -> dict | None:
    path = directory / RESOLVED_CONFIG
    if not path.is_file():
        return None
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return loaded if isinstance(loaded, dict) else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _claim(directory: Path, cfg: DictConfig, kind: str) -> bool:
    """Names checked, the dir created or found to be ours, and locked; True if it already
    held something (the caller then decides)."""
    check_names(cfg)
    held = _has_entries(directory)
    if held:
        _refuse_foreign(directory, kind)
    directory.mkdir(parents=True, exist_ok=True)
    lock_dir(directory, announce=False)
    return held


def _has_entries(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _refuse_foreign(directory: Path, kind: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{directory} is a file, not a folder: choose another hydra.{kind}.dir")
    if not any((directory / marker).exists() for marker in OUR_MARKERS):
        found = sorted(p.name for p in directory.iterdir())[:5]
        raise RunDirError(
            f"{directory} holds files Kohya-Atelier did not write ({', '.join(found)}"
            f"{', ...' if len(found) == 5 else ''}); nothing there is touched. Choose an empty or new "
            f"folder for hydra.{kind}.dir."
        )


def _refuse_on_error(check) -> None:
    """A refused dir ends the command with one line (HYDRA_FULL_ERROR=1: the traceback)."""
    try:
        check()
    except (UserError, DirLockedError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
