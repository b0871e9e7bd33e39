"""The sweeper's search and pruning settings (`hydra.sweeper.search`, `hydra.sweeper.pruner`).

Typed dataclasses: Hydra's ConfigStore checks keys and types as the command line composes,
`__post_init__` checks the values when the sweeper starts. Free of Optuna (a registered
plugin's config must import cheaply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from atelier.errors import ConfigError

# The sweep's Optuna study: <sweep dir>/study.db (atelier.search.study). Here, free of Optuna,
# for the report to see whether a sweep has one without importing it.
STUDY_FILE = "study.db"
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "halving", "hyperband")
DIRECTIONS = ("minimize", "maximize")
# What a run reports to its trial while it trains: pruners compare these (lower is better).
REPORTED = "validation loss"


@dataclass
class SearchSettings:
    """`hydra.sweeper.search`: set (e.g. by an hparams_search/ recipe), the sweep is a search.

    Its space is `hydra.sweeper.params` in Hydra's sweep grammar: `interval(a,b)` (float),
    `int(interval(a,b))`, `tag(log, interval(a,b))`, `range(a,b,step)`, `choice(a,b,c)` or `a,b,c`.
    """

    n_trials: int = 20  # trials in all, failed and pruned ones included
    n_jobs: int = 1  # trials asked at once and handed to the launcher together
    sampler: str = "tpe"  # tpe | random | grid | cmaes
    seed: Optional[int] = None  # the sampler's seed: the same seed suggests the same trials
    objective: str = "best_validation_loss"  # a numeric key of the runs' summary.json
    direction: str = "minimize"  # minimize | maximize

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"hydra.sweeper.search.n_trials must be at least 1, got {self.n_trials}")
        if self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.search.n_jobs must be at least 1, got {self.n_jobs}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"hydra.sweeper.search.sampler={self.sampler}: not a sampler; use one of {', '.join(SAMPLERS)}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.search.direction={self.direction}: use minimize or maximize")
        if not self.objective:
            raise ConfigError("hydra.sweeper.search.objective is empty: name a numeric key of summary.json, "
                              "e.g. best_validation_loss")


@dataclass
class PrunerSettings:
    """`hydra.sweeper.pruner`: how runs that fall behind are stopped (with `hydra.sweeper.prune=true`)."""

    type: str = "median"  # median | halving (successive halving) | hyperband
    n_startup_trials: int = 2  # median: finished trials before any run is pruned
    n_warmup_steps: int = 0  # median: a run is not pruned before this step
    min_resource: Optional[int] = None  # halving/hyperband: steps before the first rung (null: Optuna's "auto")
    reduction_factor: int = 3  # halving/hyperband: 1 in this many runs goes on at each rung

    def __post_init__(self) -> None:
        if self.type not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner.type={self.type}: not a pruner; use one of {', '.join(PRUNERS)}")
        for name, minimum in (("n_startup_trials", 0), ("n_warmup_steps", 0), ("reduction_factor", 2)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"hydra.sweeper.pruner.{name} must be at least {minimum}, got {getattr(self, name)}")
        if self.min_resource is not None and self.min_resource < 1:
            raise ConfigError(f"hydra.sweeper.pruner.min_resource must be at least 1 (or null), got {self.min_resource}")
