"""The search space: `hydra.sweeper.params` and the command line's sweeps, in Hydra's grammar,
as Optuna distributions; a trial's values back as overrides.

    interval(1e-5, 1e-3)              float, uniform        FloatDistribution
    tag(log, interval(1e-5, 1e-3))    float, log-uniform    FloatDistribution(log=True)
    int(interval(4, 64))              int                   IntDistribution
    range(4, 33, 4)                   int (or float) steps  IntDistribution(step=4)
    choice(4, 8, 16) or adamw,prodigy categorical           CategoricalDistribution

A plain value (`training.seed=3`) is the same for every trial.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from atelier.errors import ConfigError

_PLAIN = re.compile(r"[A-Za-z0-9_.\-+/:@]+")


@dataclass
class SearchSpace:
    """What varies (`distributions`, by override key) and what every trial shares (`fixed`)."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]  # override strings, e.g. "training.seed=3"

    def grid(self) -> dict[str, list[Any]]:
        """Every value of every key, for sampler=grid; an interval() has none to list."""
        grid = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif dist.step is not None:
                count = int(round((dist.high - dist.low) / dist.step)) + 1
                grid[key] = [dist.low + i * dist.step for i in range(count)]
            else:
                raise ConfigError(
                    f"hydra.sweeper.params.{key}: sampler=grid needs values it can list: use choice(...) "
                    "or range(start,stop,step) instead of interval(...), or another sampler"
                )
        return grid

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's command-line overrides: the fixed ones, then its values."""
        return [*self.fixed, *(f"{key}={override_value(value)}" for key, value in params.items())]


def parse_space(arguments: Sequence[str]) -> SearchSpace:
    """The space from override strings (`hydra.sweeper.params` as `key=value`, then the
    command line's, which win); a sweep over nothing is refused."""
    parsed: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        parsed[override.get_key_element()] = override  # a later one (the command line) wins
    distributions, fixed = {}, []
    for key, override in parsed.items():
        if override.is_sweep_override():
            distributions[key] = distribution(override.input_line, override.value())
        else:
            fixed.append(override.input_line)
    if not distributions:
        raise ConfigError(
            "the search has nothing to search: give hydra.sweeper.params (an hparams_search/ recipe) or a sweep "
            "on the command line, e.g. 'optimizer.learning_rate=tag(log,interval(1e-5,1e-3))'"
        )
    return SearchSpace(distributions, fixed)


def distribution(text: str, sweep: Any) -> BaseDistribution:
    """`text`: the override as written (`key=sweep`), for the messages."""
    key = text.split("=", 1)[0]
    log = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not low < high:
            raise ConfigError(f"{text}: the start must be below the end")
        if log and low <= 0:
            raise ConfigError(f"{key}: a log interval needs a start above 0, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        if log:
            raise ConfigError(f"{key}: tag(log, range(...)) is not a search range; use tag(log, interval(a,b))")
        start, stop, step = sweep.start, sweep.stop, sweep.step
        count = math.ceil((stop - start) / step) if step else 0
        if count < 1:
            raise ConfigError(f"{text} holds no value")
        last = start + (count - 1) * step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(start, last, step=step)
        return FloatDistribution(float(start), float(last), step=float(step))
    if isinstance(sweep, ChoiceSweep):
        if len(sweep.list) < 1:
            raise ConfigError(f"{key}=choice(): give at least one value")
        return CategoricalDistribution(tuple(v.text if isinstance(v, QuotedString) else v for v in sweep.list))
    raise ConfigError(f"{key}: {type(sweep).__name__} cannot be searched; use interval(), range() or choice()")


def override_value(value: Any) -> str:
    """A suggested value as the override grammar reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
