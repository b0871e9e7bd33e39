"""Config composition: every option composes; typos and bad values fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import atelier.config
from atelier.config.optimizer_types import NAMED_OPTIMIZERS
from atelier.config.schema import NetworkConfig
from tests.helpers import REPO_ROOT, run_train

CONF = REPO_ROOT / "conf"
GROUPS = ["model", "network", "optimizer", "scheduler", "dataset", "training", "sampling", "output", "debug"]
REQUIRED_OPTIONS = {
    "model": {"tiny", "sd15", "sd2_v", "sdxl"},
    "network": {"lora", "locon", "loha", "lokr", "dylora", "ia3"},
    "optimizer": {"adamw", "adamw8bit", "prodigy", "lion", "lion8bit", "adafactor", "dadapt_adam", "sgd_nesterov",
                  "adamw_schedulefree"},
    "scheduler": {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                  "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay", "piecewise_constant"},
    "debug": {"smoke"},
    **{group: {"default"} for group in ("training", "sampling", "output")},
}


def compose_config(*overrides: str):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(REQUIRED_OPTIONS))
def test_required_options_exist(group):
    assert REQUIRED_OPTIONS[group] <= set(options(group))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_on_its_schema(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "folder":
        overrides.append(f"dataset.train_data_dir={tmp_path / 'my_set'}")
    cfg = compose_config(*overrides)
    node = cfg.debug if group == "debug" and "debug" in cfg else cfg[group] if group != "debug" else cfg
    # Typed: a key the schema does not know is refused.
    with pytest.raises(Exception):
        node.not_a_key = 1
    if group == "dataset" and option == "folder":
        assert cfg.project == "my_set"  # project defaults to the dataset's folder name


def test_default_config_resolves_and_has_exact_paths():
    cfg = compose_config()
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["network"]["dim"] == NetworkConfig.dim
    assert "alpha" in resolved["network"]
    assert Path(resolved["dataset"]["train_data_dir"]).is_dir()
    assert resolved["model"]["path"] is None and resolved["model"]["builtin"] == "tiny-sd15"
    assert OmegaConf.get_type(cfg.network) is NetworkConfig


def test_smoke_debug_switch():
    cfg = compose_config("debug=smoke", "model=sd15", "model.path=/x")
    assert cfg.training.max_train_steps == 2
    assert cfg.output.save_every_n_epochs is None
    assert cfg.sampling.limit == 1


def test_optimizer_options_name_sd_scripts_optimizers():
    for name in options("optimizer"):
        cfg = compose_config(f"optimizer={name}")
        assert cfg.optimizer.type in NAMED_OPTIMIZERS


@pytest.mark.parametrize(
    "override,cause",
    [("network.dim=abc", "could not be converted to Integer"), ("scheduler.type=cosin", "Invalid value 'cosin'")],
)
def test_sweepable_paths_are_typed(override, cause):
    with pytest.raises(Exception, match=f"Error merging override {override}") as info:
        compose_config(override)
    assert cause in str(info.value.__cause__)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("training.multires_noise_iteration=6", "Key 'multires_noise_iteration' not in 'TrainingConfig'"),
        ("training.loss_type=huberr", "Invalid value 'huberr'"),
        ("training.huber_schedule=snrr", "Invalid value 'snrr'"),
        ("training.zero_terminal_snr=maybe", "Value 'maybe' is not a valid bool"),
        ("training.min_timestep=low", "could not be converted to Integer"),
        ("scheduler.min_lr_ration=0.1", "Key 'min_lr_ration' not in 'SchedulerConfig'"),
        ("scheduler.type=cosine_min_lr", "Invalid value 'cosine_min_lr'"),
    ],
)
def test_new_noise_loss_and_schedule_keys_are_typed(override, expected):
    with pytest.raises(Exception) as info:
        compose_config(override)
    assert expected in f"{info.value} {info.value.__cause__}"


def test_lr_find_recipe_asks_for_a_suggestion_from_an_adaptive_optimizer():
    cfg = compose_config("experiment=lr_find")
    assert cfg.training.suggest_lr is True and cfg.optimizer.type in {"Prodigy", "DAdaptAdam"}
    assert cfg.scheduler.type == "constant" and cfg.recipe == "lr_find"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("network.dimm=8", "Key 'dimm' not in 'NetworkConfig'"),
        ("optimizer=adamv", "Could not find 'optimizer/adamv'"),
        ("scheduler=cosine_restarts", "Available options in 'scheduler'"),
        ("training.max_train_epochs=ten", "could not be converted to Integer"),
        # a free str (a class path is a type too): its spelling is checked by the run-dir guard
        ("optimizer.type=AdamX", "Error: optimizer.type=AdamX: not an optimizer sd-scripts names"),
    ],
)
def test_cli_typo_fails_before_any_work(override, expected, tmp_path):
    proc = run_train(override, f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_missing_model_path_is_named(tmp_path):
    proc = run_train("model=sd15", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode != 0
    assert "'model.path' must be set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir
