"""Typed schemas for every config group, one module per group.

Each YAML option under conf/<group>/ extends one of these dataclasses (see
`register_schemas`), so a typo'd key or a wrong type fails at compose time, before any
model is loaded. Field names follow kohya sd-scripts where one exists; every field is
declared with `option(...)` (fields.py), which carries its doc, its sd-scripts flag and
the ss_* metadata keys it feeds (read by atelier.config.options).
"""

from atelier.config.schema.dataset import DatasetConfig
from atelier.config.schema.enums import (
    Attention,
    HuberSchedule,
    LossType,
    MixedPrecision,
    ModelVersion,
    NetworkModule,
    OptimizerType,
    SavePrecision,
    SchedulerType,
)
from atelier.config.schema.fields import flag_name, option
from atelier.config.schema.model import ModelConfig
from atelier.config.schema.network import NetworkConfig
from atelier.config.schema.optimizer import (
    OptimizerConfig,
    PartLearningRates,
    part_learning_rates,
)
from atelier.config.schema.output import OutputConfig
from atelier.config.schema.root import SCHEMAS, AtelierConfig, register_schemas
from atelier.config.schema.sampling import SamplingConfig
from atelier.config.schema.scheduler import SchedulerConfig
from atelier.config.schema.training import TrainingConfig

__all__ = [
    "SCHEMAS",
    "AtelierConfig",
    "Attention",
    "DatasetConfig",
    "HuberSchedule",
    "LossType",
    "MixedPrecision",
    "ModelConfig",
    "ModelVersion",
    "NetworkConfig",
    "NetworkModule",
    "OptimizerConfig",
    "OptimizerType",
    "OutputConfig",
    "PartLearningRates",
    "SamplingConfig",
    "SavePrecision",
    "SchedulerConfig",
    "SchedulerType",
    "TrainingConfig",
    "flag_name",
    "option",
    "part_learning_rates",
    "register_schemas",
]
