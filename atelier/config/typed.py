"""The config boundary: a composed DictConfig becomes the schema's dataclasses here, once.

`run_config` is the one door: train.py's job (atelier.launch.job.run_job), a data-parallel
process and the fused worker (a run dir's config.yaml, `load_run_config`), the fused
launcher's check of each job, and tools that train or read a run's config all pass
through it. Code below it receives `AtelierConfig` objects (enums are members, numbers
are numbers, every key exists) and never a DictConfig.

The checks that name a bad key run here too: that every key is an option of the schema
(a `+key=value` outside the schema's dicts would be set and never read), that no mandatory ??? is left unset, then
each schema dataclass's own `__post_init__` (atelier/config/schema/) as OmegaConf.to_object
builds it, the whole config's cross-group rules last (AtelierConfig.__post_init__).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from atelier.config.schema import AtelierConfig
from atelier.config.validate import check_known_keys, check_required

RUN_CONFIG_FILE = "config.yaml"  # atelier.outputs.run_dir.RESOLVED_CONFIG


def run_config(cfg: DictConfig | AtelierConfig) -> AtelierConfig:
    """The typed, checked config of a run; ConfigError (or MissingFileError) names a bad key.

    `cfg` is the job's config without its `hydra` node (the task function's cfg). One that is
    typed already is returned as it is (tests build them with atelier.config.load).
    """
    if isinstance(cfg, AtelierConfig):
        return cfg
    check_known_keys(cfg)  # a key no code reads, named with the option meant
    if OmegaConf.get_type(cfg) is not AtelierConfig:  # e.g. read back from a config.yaml
        cfg = OmegaConf.merge(OmegaConf.structured(AtelierConfig), cfg)
    check_required(cfg)  # a ??? named with its fix, before OmegaConf's own error
    typed = OmegaConf.to_object(cfg)  # each schema dataclass checks its fields in __post_init__
    assert isinstance(typed, AtelierConfig), type(typed)
    return typed


def load_run_config(run_dir: Path) -> AtelierConfig:
    """A run dir's config.yaml, typed and checked again (a data-parallel process or a fused
    lane trains exactly the config its job recorded)."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a worker process trains the config its job wrote there")
    return run_config(OmegaConf.load(path))


def as_dictconfig(cfg: AtelierConfig) -> DictConfig:
    """The typed config as OmegaConf again: for writing it (config.yaml) and hashing it."""
    return OmegaConf.structured(cfg)
