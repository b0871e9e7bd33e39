"""Registers `hydra/launcher=local_gpus`; the logic is in atelier.launch.local_gpus.

Hydra instantiates only plugin classes defined inside the hydra_plugins package.
"""

from dataclasses import dataclass
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from atelier.launch.local_gpus import LocalGpusLauncher as _LocalGpusLauncher


class LocalGpusLauncher(_LocalGpusLauncher):
    pass


@dataclass
class LocalGpusLauncherConf:
    _target_: str = "hydra_plugins.atelier_launchers.local_gpus_launcher.LocalGpusLauncher"
    # GPU ids to use; null = every visible GPU. Without GPUs, cpu_slots jobs run at once.
    gpus: Optional[List[str]] = None
    jobs_per_gpu: int = 1
    # GPUs per job, for data-parallel jobs (training.num_processes set to the same number).
    gpus_per_job: int = 1
    cpu_slots: int = 1
    # Seconds a job gets to save its state after SIGTERM before it is killed.
    stop_timeout: float = 60.0


ConfigStore.instance().store(
    group="hydra/launcher", name="local_gpus", node=LocalGpusLauncherConf, provider="atelier"
)
