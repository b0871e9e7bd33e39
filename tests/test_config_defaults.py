"""One set of defaults: the schema. The YAML files state only what an option changes, each
with a comment on top; conf/local/default.yaml (git-ignored) is loaded when present."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import atelier.config
from atelier.config.schema import SCHEMAS
from tests.helpers import REPO_ROOT, TRAIN

CONF = REPO_ROOT / "conf"
# Keys that say which option a file is (network.module, optimizer.type, model.version and
# the model's native resolution): stated even when the schema's default is the same.
IDENTITY_KEYS = {"module", "type", "version", "resolution"}
REQUIRED = "???"  # a value the user must give (model.path of sd15.yaml): stated on purpose


def schema_defaults(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]), enum_to_str=True)


def group_files() -> list[tuple[str, Path]]:
    return [(group, path) for group in SCHEMAS if group != "atelier" for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", group_files(), ids=lambda x: getattr(x, "name", x))
def test_a_group_file_states_only_what_differs_from_the_schema(group, path):
    defaults = schema_defaults(group)
    stated = yaml.safe_load(path.read_text()) or {}
    restated = [
        key for key, value in stated.items()
        if key in defaults and value == defaults[key] and key not in IDENTITY_KEYS and value != REQUIRED
    ]  # fmt: skip
    assert not restated, f"{path.relative_to(REPO_ROOT)} restates schema defaults {restated}: delete those lines"


def test_the_top_config_sets_no_option_of_a_group():
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    assert set(top) <= {"defaults", "hydra"}, "a default belongs in atelier/config/schema/"


@pytest.mark.parametrize("path", sorted(p for p in CONF.rglob("*.yaml") if "local" not in p.parts), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_file_starts_with_a_comment_saying_what_it_is_for(path):
    assert path.read_text().startswith("#"), f"{path.relative_to(REPO_ROOT)}: add a comment on top"


@pytest.mark.parametrize("group", ["training", "sampling", "output"])
def test_each_swappable_group_has_a_default_that_is_the_schema(group):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    assert OmegaConf.to_container(cfg[group], enum_to_str=True) == schema_defaults(group)


@pytest.fixture
def conf_with_local(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    return conf


LOCAL = """\
# The machine's own model and precision.
defaults:
  - override /model: sd15
model:
  path: /models/v1-5-pruned-emaonly.safetensors
training:
  mixed_precision: bf16
"""


def compose_in(conf: Path, *overrides: str):
    atelier.config.register()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_without_a_local_file_the_config_composes_as_before(conf_with_local):
    cfg = compose_in(conf_with_local)
    assert cfg.model.builtin == "tiny-sd15" and cfg.training.mixed_precision.value == "no"


def test_a_local_file_is_loaded_and_the_command_line_still_wins(conf_with_local):
    (conf_with_local / "local").mkdir()
    (conf_with_local / "local" / "default.yaml").write_text(LOCAL)
    cfg = compose_in(conf_with_local)
    assert cfg.model.path == "/models/v1-5-pruned-emaonly.safetensors" and cfg.model.version.value == "sd1"
    assert cfg.training.mixed_precision.value == "bf16"
    cfg = compose_in(conf_with_local, "training.mixed_precision=no", "experiment=demo")
    assert cfg.training.mixed_precision.value == "no" and cfg.model.path.endswith("emaonly.safetensors")


def test_a_typo_in_the_local_file_fails_naming_the_key(conf_with_local):
    (conf_with_local / "local").mkdir()
    (conf_with_local / "local" / "default.yaml").write_text("# typo\ntraining:\n  mixed_precison: bf16\n")
    with pytest.raises(Exception, match="mixed_precison"):
        compose_in(conf_with_local)


def test_train_py_reads_a_local_file_from_a_config_dir(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text(LOCAL)
    proc = subprocess.run([sys.executable, str(TRAIN), "--config-dir", str(tmp_path), "--cfg", "job"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["model"]["path"] == "/models/v1-5-pruned-emaonly.safetensors"
    assert job["training"]["mixed_precision"] == "bf16"


def test_git_ignores_local_files_and_keeps_the_folder():
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO_ROOT)
    kept = subprocess.run(["git", "check-ignore", "-q", "conf/local/.gitkeep"], cwd=REPO_ROOT)
    assert ignored.returncode == 0 and kept.returncode == 1
