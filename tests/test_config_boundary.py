"""The config is typed once (atelier.config.typed.run_config) and every rule about a value runs
there, on its schema field, before anything is loaded ([9] points 1 and 2)."""

from __future__ import annotations

import ast
import dataclasses

import pytest
from hydra import compose, initialize_config_dir

import atelier.config
from atelier.config.schema import (
    AtelierConfig,
    DatasetConfig,
    MixedPrecision,
    NetworkConfig,
    NetworkModule,
    SchedulerConfig,
    TrainingConfig,
)
from atelier.config.typed import as_dictconfig, run_config
from atelier.errors import UserError
from tests.helpers import REPO_ROOT

# Modules that hold the config before it is typed: composition, Hydra callbacks and launchers.
ABOVE_THE_BOUNDARY = ("atelier/config/", "atelier/outputs/guard.py", "atelier/sweep/", "atelier/launch/")


def composed(*overrides: str):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_boundary_gives_schema_objects_with_enum_members():
    cfg = run_config(composed("network.dim=4", "optimizer=prodigy"))
    assert type(cfg) is AtelierConfig and type(cfg.network) is NetworkConfig
    assert cfg.network.module is NetworkModule.lora and cfg.optimizer.type == "Prodigy"
    assert cfg.training.mixed_precision is MixedPrecision.no
    assert cfg.sampling.width == cfg.dataset.resolution  # interpolations resolved
    assert run_config(cfg) is cfg  # typed once
    assert run_config(as_dictconfig(cfg)) == cfg  # a written config.yaml reads back the same


def test_no_module_below_the_boundary_handles_a_dictconfig():
    offenders = []
    for path in sorted((REPO_ROOT / "atelier").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        if rel.startswith(ABOVE_THE_BOUNDARY):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "omegaconf":
                if any(alias.name == "DictConfig" for alias in node.names):
                    offenders.append(rel)
    assert not offenders, f"below the config boundary, code takes schema objects, not a DictConfig: {offenders}"


# One bad value per group; each fails at the boundary with its key in the message.
BAD = [
    ("network.dim=0", "'network.dim' must be at least 1"),
    ("network.module=lora network.factor=4", "network.factor=4 does not apply to network.module=lora"),
    ("network.train_unet_only=true network.train_text_encoder_only=true", "cannot both be true"),
    ("optimizer.learning_rate=-1", "'optimizer.learning_rate' must be a finite number >= 0"),
    ("scheduler=cosine scheduler.min_lr_ratio=0.1", "scheduler.min_lr_ratio=0.1 is only read by"),
    ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio must be in"),
    ("training.train_batch_size=0", "'training.train_batch_size' must be at least 1"),
    ("training.max_train_steps=0", "'training.max_train_steps' must be at least 1"),
    ("training.adaptive_noise_scale=0.1", "training.adaptive_noise_scale scales training.noise_offset"),
    ("dataset.resolution=100", "dataset.resolution=100: 100 is not a multiple of 8"),
    ("dataset.max_token_length=100", "dataset.max_token_length must be 75, 150 or 225"),
    ("dataset.keep_tokens=-1", "dataset.keep_tokens must not be negative"),
    ("sampling.sampler=turbo", "sampling.sampler"),
    ("output.output_name=../x", "output.output_name='../x' holds a path separator"),
    ("optimizer=adamw_schedulefree scheduler=cosine", "needs no learning-rate schedule"),
    ("training.suggest_lr=true optimizer=adamw", "training.suggest_lr needs an optimizer that estimates"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0] for b in BAD])
def test_each_rule_names_its_key_at_the_boundary(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_config(composed(*overrides.split()))


def test_the_rules_hold_for_objects_built_in_code_too():
    """A rule lives on its field: a schema object made in Python is checked the same way."""
    with pytest.raises(UserError, match="'training.clip_skip' must be at least 1"):
        TrainingConfig(clip_skip=0)
    with pytest.raises(UserError, match="needs scheduler.step_rules"):
        SchedulerConfig(type="piecewise_constant")
    ok = run_config(composed()).dataset
    with pytest.raises(UserError, match="dataset.max_bucket_reso"):
        dataclasses.replace(ok, max_bucket_reso=ok.min_bucket_reso - 1)
    assert isinstance(dataclasses.replace(ok, resolution=64), DatasetConfig)


def test_fp16_on_a_cpu_is_named_with_its_fix():
    t = TrainingConfig(mixed_precision=MixedPrecision.fp16)
    with pytest.raises(UserError, match="training.mixed_precision=fp16 needs a CUDA GPU"):
        t.check_precision(cuda_available=False)
    t.check_precision(cuda_available=True)
    TrainingConfig(mixed_precision=MixedPrecision.fp16, cpu=True).check_precision(cuda_available=False)


def test_a_learning_rate_of_zero_is_a_rate():
    from atelier.config.schema import part_learning_rates

    cfg = run_config(composed("optimizer.learning_rate=1e-4", "optimizer.text_encoder_lr=0"))
    assert part_learning_rates(cfg.optimizer) == (1e-4, 0.0, 0.0)  # SDXL's second text encoder: as the first
