"""atelier.config.network_kinds is the one table of network kinds: every consumer reads it, and a
kind added there as one entry composes, trains, saves under its kohya names and fuses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atelier.config.schema import NetworkConfig, NetworkModule
from atelier.fused.grouping import lane_problems
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.config import network_kinds as kinds
from atelier.network.factory import create_network, file_family
from atelier.config.network_spec import NetworkSpec, kohya_module
from atelier.network.lora_file import load_lora
from atelier.tools.common import ToolError, split_lora
from tests.helpers import REPO_ROOT, TRAIN, final_lora
from tests.test_config import compose_config


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


def test_the_config_offers_exactly_the_registered_kinds():
    assert [m.value for m in NetworkModule] == list(kinds.KINDS)
    for name in kinds.KINDS:
        assert compose_config(f"network.module={name}", "network.dim=4").network.module.value == name


def test_an_unknown_kind_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"network.module=lorra is not one of lora, locon, loha, lokr, dylora, ia3"):
        kinds.kind_named("lorra")


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_kind_writes_files_of_its_family_and_fuses_as_declared(name, parts):
    entry = kinds.KINDS[name]
    spec = NetworkSpec.from_config(NetworkConfig(module=name, dim=4, alpha=2.0, **({"unit": 2} if "unit" in entry.options else {})))
    network = create_network(spec, *parts)
    state = network.kohya_state_dict()
    assert file_family(state) == entry.family
    if kinds.family(entry.family).lycoris:
        with pytest.raises(ToolError, match="is a LyCORIS"):
            split_lora(state, "test.safetensors")
    cfg = compose_config(f"network.module={name}", "network.dim=4", "network.train_unet_only=true")
    assert kohya_module(cfg.network) == entry.kohya_module
    refused = any("cannot be fused" in p for p in lane_problems(cfg))
    assert refused != entry.fusable


def test_a_kind_added_as_one_entry_is_known_everywhere(parts, monkeypatch):
    """In-process: the spec, factory, file recognition and fused grouping read the new entry."""
    mirror = dataclasses.replace(kinds.KINDS["lora"], name="mirror", display="Mirror", kohya_module="networks.mirror")
    monkeypatch.setitem(kinds.KINDS, "mirror", mirror)
    spec = NetworkSpec.from_config(NetworkConfig(module="mirror", dim=4, alpha=2.0))
    assert spec.entry is mirror
    assert file_family(create_network(spec, *parts).kohya_state_dict()) == "lora"
    assert "mirror" in kinds.kinds_of_family("lora") and "mirror" in kinds.fusable_kinds()
    # The enum of the already-built schema predates the entry: the subprocess test below
    # adds it before the config exists; here the composed config is taken as plain data.
    plain = OmegaConf.to_container(compose_config("network.train_unet_only=true"), enum_to_str=True)
    cfg = OmegaConf.create({**plain, "network": {**plain["network"], "module": "mirror"}})
    assert lane_problems(cfg) == []
    monkeypatch.setitem(kinds.KINDS, "mirror", dataclasses.replace(mirror, fusable=False))
    assert lane_problems(cfg) == ["network.module=mirror cannot be fused (only lora, locon)"]


# A user's own kind: one entry, added before the config is built, then the real train.py.
ADD_A_KIND = textwrap.dedent(
    """
    import dataclasses, sys
    from atelier.config import network_kinds as kinds
    kinds.KINDS["mirror"] = dataclasses.replace(
        kinds.KINDS["lora"], name="mirror", display="Mirror", kohya_module="networks.mirror")
    import runpy
    sys.argv = [{train!r}, *sys.argv[1:]]
    runpy.run_path({train!r}, run_name="__main__")
    """
)


def test_a_kind_added_as_one_entry_trains_and_saves_under_its_kohya_names(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", ADD_A_KIND.format(train=str(TRAIN)), "debug=smoke", "network.module=mirror",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Mirror" in proc.stdout + proc.stderr  # the network's log line names the kind
    state, metadata = load_lora(final_lora(run_dir))
    assert metadata["ss_network_module"] == "networks.mirror"
    assert file_family(state) == "lora"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert Path(run_dir / ".hydra" / "config.yaml").read_text().count("module: mirror") == 1
