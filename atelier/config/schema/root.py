"""The whole run config (AtelierConfig) and its registration with Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, SI

from atelier.config.schema.dataset import DatasetConfig
from atelier.config.schema.fields import option
from atelier.config.schema.model import ModelConfig
from atelier.config.schema.network import NetworkConfig
from atelier.config.schema.optimizer import OptimizerConfig
from atelier.config.schema.output import OutputConfig
from atelier.config.schema.sampling import SamplingConfig
from atelier.config.schema.scheduler import SchedulerConfig
from atelier.config.schema.training import TrainingConfig


@dataclass
class AtelierConfig:
    project: str = option(SI("${dataset.name}"), doc="Groups all studies of one dataset under outputs/<project>/ "
                          "(default: the dataset's name).", kohya="the output folder")  # fmt: skip
    recipe: Optional[str] = option(None, doc="Set by a recipe (conf/experiment/); names the folder of its sweeps.",
                                   kohya="a recipe names sweep axes; export one job's run dir")
    resume: bool = option(
        False, doc="Re-running into the same run dir / hydra.sweep.dir: resume=true keeps finished runs (a sweep "
        "skips its finished jobs, and runs the jobs whose config changed as new jobs).",
        kohya="sd-scripts: --resume <state folder> (needs --save_state)",
    )
    overwrite: bool = option(
        False, doc="A run dir that holds a finished run, or a run of another config, is refused "
        "(atelier/outputs/guard.py); overwrite=true moves its files into replaced-<time>/ first.",
        kohya="atelier's run-dir guard; sd-scripts writes into an existing output dir",
    )
    # The groups: each a schema of its own (the modules beside this one).
    model: ModelConfig = MISSING
    network: NetworkConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    dataset: DatasetConfig = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ConfigStore name -> schema. A YAML option extends its group's schema with
# `defaults: [/schema/<group>@_here_, _self_]`.
SCHEMAS = {
    "atelier": AtelierConfig,
    "model": ModelConfig,
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "dataset": DatasetConfig,
    "training": TrainingConfig,
    "sampling": SamplingConfig,
    "output": OutputConfig,
}


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)
