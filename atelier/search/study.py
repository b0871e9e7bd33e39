"""The Optuna study of a sweep: `<sweep dir>/study.db` (SQLite), so a resumed sweep continues
it, its runs report to it from any process that sees the sweep dir (a local GPU, a fused
group, a SLURM node), and the report reads it.

What the runs and the report need to know is kept in the study itself: the pruner's
settings (each run builds the same pruner), the objective, the fixed overrides; and on each
trial its run dir name, its overrides and, when it failed, why.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler

from atelier.errors import ConfigError
from atelier.search.settings import STUDY_FILE, PrunerSettings, SearchSettings
from atelier.search.space import SearchSpace

STUDY_NAME = "atelier"
# Several runs write to one SQLite file (each reports as it validates): wait for the lock.
SQLITE_TIMEOUT_S = 120

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log lines say what happens


def study_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir).absolute() / STUDY_FILE


def storage(sweep_dir: Path) -> optuna.storages.RDBStorage:
    url = f"sqlite:///{study_path(sweep_dir)}"
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


def make_pruner(settings: PrunerSettings | None) -> BasePruner:
    if settings is None:
        return NopPruner()
    if settings.type == "median":
        return MedianPruner(n_startup_trials=settings.n_startup_trials, n_warmup_steps=settings.n_warmup_steps)
    min_resource: Any = settings.min_resource or "auto"
    if settings.type == "halving":
        return SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=settings.reduction_factor)
    return HyperbandPruner(min_resource=settings.min_resource or 1, reduction_factor=settings.reduction_factor)


def make_sampler(settings: SearchSettings, space: SearchSpace, trials_before: int = 0) -> BaseSampler:
    """The search's sampler. A resumed search seeds it with seed + its trials so far: the same
    seed again would draw the first trials' values again."""
    seed = None if settings.seed is None else settings.seed + trials_before
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if settings.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it)
        except ImportError as err:
            raise ConfigError("hydra.sweeper.search.sampler=cmaes needs the cmaes package: pip install cmaes") from err
        # Categorical values (optimizer, network) are drawn by the independent sampler beside it.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def trial_id(store: optuna.storages.BaseStorage, number: int) -> int:
    """The storage's id of the sweep study's trial `number`."""
    return store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(STUDY_NAME), number)


def live_trial(study: optuna.Study, store: optuna.storages.BaseStorage, number: int) -> optuna.Trial:
    """Trial `number` of the sweep's study, to report to or mark (from any process)."""
    return optuna.Trial(study, trial_id(store, number))


def open_study(
    sweep_dir: Path,
    store: optuna.storages.BaseStorage,
    direction: str,
    sampler: BaseSampler | None = None,
    pruner: PrunerSettings | None = None,
    attrs: dict[str, Any] | None = None,
) -> optuna.Study:
    """The sweep's study in `store` (storage(sweep_dir)), created or (a resumed sweep) loaded;
    `attrs` stored on it."""
    existed = any(s.study_name == STUDY_NAME for s in optuna.get_all_study_summaries(store))
    study = optuna.create_study(
        storage=store, study_name=STUDY_NAME, direction=direction, sampler=sampler,
        pruner=make_pruner(pruner), load_if_exists=True,
    )  # fmt: skip
    if existed and study.direction.name.lower() != direction:
        raise ConfigError(
            f"{study_path(sweep_dir)} is a study to {study.direction.name.lower()}; this sweep would {direction} "
            "(hydra.sweeper.search.direction): keep its direction to resume it, or start a new sweep dir"
        )
    study.set_user_attr("pruner", asdict(pruner) if pruner is not None else None)
    for key, value in (attrs or {}).items():
        study.set_user_attr(key, value)
    return study


def load_study(sweep_dir: Path, store: optuna.storages.BaseStorage | None = None) -> optuna.Study | None:
    """The sweep's study with the pruner it was made with (None: the sweep has no study).
    `store`: the sweep's storage(), when the caller keeps a handle on it."""
    if not study_path(sweep_dir).is_file():
        return None
    store = store or storage(sweep_dir)
    summaries = optuna.get_all_study_summaries(store)
    if not any(s.study_name == STUDY_NAME for s in summaries):
        return None
    study = optuna.load_study(study_name=STUDY_NAME, storage=store)
    settings = study.user_attrs.get("pruner")
    study.pruner = make_pruner(PrunerSettings(**settings) if settings else None)
    return study
