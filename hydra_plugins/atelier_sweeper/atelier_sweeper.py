"""Registers `hydra/sweeper=atelier`; the logic is atelier.sweep.sweeper.TrainingSweeper.

Hydra instantiates only plugin classes defined inside the hydra_plugins package.
"""

from dataclasses import dataclass
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore

from atelier.sweep.sweeper import TrainingSweeper


class AtelierSweeper(TrainingSweeper):
    pass


@dataclass
class AtelierSweeperConf:
    _target_: str = "hydra_plugins.atelier_sweeper.atelier_sweeper.AtelierSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="atelier", node=AtelierSweeperConf, provider="atelier")
