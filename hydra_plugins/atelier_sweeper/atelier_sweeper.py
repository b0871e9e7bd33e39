"""Registers `hydra/sweeper=atelier`; the logic is atelier.sweep.sweeper.TrainingSweeper.

Hydra instantiates only plugin classes defined inside the hydra_plugins package.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore

from atelier.search.settings import PrunerSettings, SearchSettings
from atelier.sweep.sweeper import TrainingSweeper


class AtelierSweeper(TrainingSweeper):
    pass


@dataclass
class AtelierSweeperConf:
    _target_: str = "hydra_plugins.atelier_sweeper.atelier_sweeper.AtelierSweeper"
    max_batch_size: Optional[int] = None
    # A grid's axes, or (with search set) the search space, in Hydra's sweep grammar.
    params: Optional[Dict[str, str]] = None
    # Set: an Optuna search (conf/hparams_search/); null: a grid.
    search: Optional[SearchSettings] = None
    # Runs report their validation loss to an Optuna study; the pruner stops those that fall behind.
    prune: bool = False
    pruner: PrunerSettings = field(default_factory=PrunerSettings)


ConfigStore.instance().store(group="hydra/sweeper", name="atelier", node=AtelierSweeperConf, provider="atelier")
