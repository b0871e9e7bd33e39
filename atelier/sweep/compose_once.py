"""Compose each job's config once per sweep, not twice.

Hydra's sweeper composes every job's config to check the whole batch before any job
starts (a bad value fails the sweep at once), then the launcher composes each again
right before running it: ~0.08 s a job on a 2-core CPU, a sizeable share of short
sweeps. While `composed_once` is active, the configs composed by the check are handed
to the launcher instead (each once, as a launcher changes the config it gets). Every
launcher here (basic, local_gpus, submitit) composes through the same config loader
in the sweep's process, so all of them take the kept configs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig

# A composed config is ~0.4 MB: beyond this many jobs the launcher composes the rest again.
MAX_KEPT_CONFIGS = 100


class ComposedConfigs:
    """The configs composed to check a batch, keyed by the master config and overrides."""

    def __init__(self, loader: Any):
        self._compose = loader.load_sweep_config  # Hydra's own (bound) method
        self._kept: dict[tuple[int, tuple[str, ...]], list[DictConfig]] = {}
        self._count = 0

    def check(self, master_config: DictConfig, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job of the batch (raising on the first bad one), keeping the configs."""
        for overrides in batch:
            config = self._compose(master_config=master_config, sweep_overrides=list(overrides))
            if self._count < MAX_KEPT_CONFIGS:
                self._kept.setdefault(self._key(master_config, overrides), []).append(config)
                self._count += 1

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """A kept config for these overrides if there is one, else a freshly composed one."""
        kept = self._kept.get(self._key(master_config, sweep_overrides))
        if kept:
            self._count -= 1
            return kept.pop(0)
        return self._compose(master_config=master_config, sweep_overrides=sweep_overrides)

    @staticmethod
    def _key(master_config: DictConfig, overrides: Sequence[str]) -> tuple[int, tuple[str, ...]]:
        return id(master_config), tuple(overrides)


@contextlib.contextmanager
def composed_once(loader: Any) -> Iterator[ComposedConfigs]:
    """While active, `loader.load_sweep_config` returns the configs `check` composed."""
    configs = ComposedConfigs(loader)
    shadowed = vars(loader).get("load_sweep_config")  # None: the class method
    loader.load_sweep_config = configs.load_sweep_config
    try:
        yield configs
    finally:
        if shadowed is None:
            del loader.load_sweep_config  # the kept configs are freed with `configs`
        else:
            loader.load_sweep_config = shadowed
