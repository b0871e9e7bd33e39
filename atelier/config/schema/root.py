"""The whole run config (AtelierConfig) and its registration with Hydra's ConfigStore."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, SI

from atelier.config.block_weights import check_block_counts
from atelier.config.schema.checks import check_name
from atelier.errors import ConfigError
from atelier.families import family_of, second_text_encoders
from atelier.config.schema.dataset import DatasetConfig
from atelier.config.schema.fields import option
from atelier.config.schema.flow_matching import check_flow_matching_options
from atelier.config.schema.model import ModelConfig
from atelier.config.schema.network import NetworkConfig
from atelier.config.schema.optimizer import OptimizerConfig, check_can_suggest, check_schedule_fits
from atelier.config.schema.output import OutputConfig
from atelier.config.schema.sampling import SamplingConfig
from atelier.config.schema.scheduler import SchedulerConfig
from atelier.config.schema.training import (
    TrainingConfig,
    check_flow_matching_run,
    check_masked_loss,
    check_noise_options,
)

log = logging.getLogger(__name__)


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
    trial: Optional[int] = option(
        None, doc="Set by the sweeper in a search (hparams_search=...) or a grid with hydra.sweeper.prune=true: the "
        "Optuna trial this run reports its validation loss to (<sweep dir>/study.db), which may stop it early.",
        kohya="atelier's search; sd-scripts has no pruning",
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

    def __post_init__(self) -> None:
        """The rules that span groups; each group's own rules ran as it was built."""
        check_name("project", self.project)
        check_noise_options(self.training, self.model.v_parameterization)
        family = family_of(self.model.version)
        check_block_counts(self.network, family.blocks, family.label)
        check_flow_matching_options(self.training, family.objective, family.label)
        if family.objective == "flow_matching":
            check_flow_matching_run(self.training, family.label)
            if self.model.v_parameterization:
                raise ConfigError(f"model.v_parameterization: {family.label} predicts a flow velocity, not v: drop it")
            check_flux_network(self.network, family.label)
            if self.dataset.weighted_captions:
                raise ConfigError(f"dataset.weighted_captions: {family.label}'s CLIP-L and T5 read captions without "
                                  "weights (as sd-scripts' FLUX script): drop it")
        elif self.network.train_blocks is not None:
            raise ConfigError(f"network.train_blocks={self.network.train_blocks.value} picks FLUX.1's transformer "
                              f"blocks; {family.label} has none: drop it")
        check_masked_loss(self.training, self.dataset)
        opt, sched = self.optimizer, self.scheduler
        check_schedule_fits(opt.type, sched.class_path or sched.type.value, sched.warmup_steps or sched.warmup_ratio or 0)
        if opt.text_encoder_2_lr is not None and family.lora_text_encoders < 2:
            raise ConfigError(f"optimizer.text_encoder_2_lr={opt.text_encoder_2_lr}: only {second_text_encoders()} has a "
                              f"second text encoder (model.version={family.version}); set optimizer.text_encoder_lr")
        if self.training.suggest_lr:
            check_can_suggest(opt.type, opt.args)
        if self.trial is not None and self.dataset.validation_split == 0:
            raise ConfigError(
                f"trial={self.trial}: a run of a search or a pruned sweep reports its validation loss, and "
                "dataset.validation_split is 0: hold out images, e.g. dataset.validation_split=0.2"
            )
        if self.dataset.resolution % family.bucket_step:
            log.warning("dataset.resolution=%s: %s buckets step by %s; a multiple of %s suits it best",
                        self.dataset.resolution, family.label, family.bucket_step, family.bucket_step)


# The network options a FLUX.1 LoRA takes (atelier.network.flux_lora builds sd-scripts' lora_flux);
# the others are SD-UNet or LyCORIS options.
FLUX_NETWORK_DEFAULTS = {"conv_dim": None, "conv_alpha": None, "unit": None, "dora_wd": False, "use_tucker": False,
                         "preset": None}  # fmt: skip


def check_flux_network(net: NetworkConfig, label: str) -> None:
    if net.module.value != "lora":
        raise ConfigError(f"network.module={net.module.value}: {label} trains kohya LoRA (network=lora) only here "
                          "(sd-scripts' networks.lora_flux); LyCORIS kinds on FLUX are not built yet")
    for key, default in FLUX_NETWORK_DEFAULTS.items():
        if getattr(net, key) != default:
            raise ConfigError(f"network.{key}={getattr(net, key)}: not an option of a {label} LoRA (sd-scripts' "
                              "lora_flux takes dim, alpha, dropout, rank/module dropout, train_blocks, LoRA+): drop it")


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
