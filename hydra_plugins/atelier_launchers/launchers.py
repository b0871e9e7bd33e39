"""Registers `hydra/launcher=local_gpus` and `hydra/launcher=fused`; the logic is in
atelier.launch.local_gpus and atelier.launch.fused.

Hydra instantiates only plugin classes defined inside the hydra_plugins package.
"""

from dataclasses import dataclass
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from atelier.launch.fused import FusedLauncher as _FusedLauncher
from atelier.launch.local_gpus import LocalGpusLauncher as _LocalGpusLauncher


class LocalGpusLauncher(_LocalGpusLauncher):
    pass


class FusedLauncher(_FusedLauncher):
    pass


@dataclass
class LocalGpusLauncherConf:
    _target_: str = "hydra_plugins.atelier_launchers.launchers.LocalGpusLauncher"
    # GPU ids to use; null = every visible GPU. Without GPUs, cpu_slots jobs run at once.
    gpus: Optional[List[str]] = None
    jobs_per_gpu: int = 1
    # GPUs per job, for data-parallel jobs (training.num_processes set to the same number).
    gpus_per_job: int = 1
    cpu_slots: int = 1
    # Seconds a job gets to save its state after SIGTERM before it is killed.
    stop_timeout: float = 60.0


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.atelier_launchers.launchers.FusedLauncher"
    # Most jobs trained in one pass (one process, one copy of the base model).
    max_adapters: int = 8
    # GPU ids to use; null = every visible GPU. One process (a group or a job alone) per GPU.
    gpus: Optional[List[str]] = None
    # Processes at once when there is no GPU.
    cpu_slots: int = 1
    # Seconds a process gets to save its state after SIGTERM before it is killed.
    stop_timeout: float = 60.0


store = ConfigStore.instance()
store.store(group="hydra/launcher", name="local_gpus", node=LocalGpusLauncherConf, provider="atelier")
store.store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="atelier")
