"""network.dim above a layer's width ([14] point 5): refused at once, naming the layer,
before any module is allocated (dim=100000 used to hang)."""

from __future__ import annotations

import json

import pytest
from torch import nn

from atelier.config.schema import NetworkConfig
from atelier.config.validate import ConfigError
from atelier.network.factory import check_ranks_fit, layer_width
from atelier.config.network_spec import NetworkSpec
from atelier.network.targets import TargetLayer
from tests.helpers import run_train


def spec(kind: str = "lora", dim: int = 4, conv_dim: int | None = None) -> NetworkSpec:
    return NetworkSpec.from_config(NetworkConfig(module=kind, dim=dim, alpha=1.0, conv_dim=conv_dim))


def test_layer_width_is_the_smaller_side_a_kxk_conv_counting_its_kernel():
    assert layer_width(nn.Linear(320, 40)) == 40
    assert layer_width(nn.Conv2d(4, 320, 3)) == 36
    assert layer_width(nn.Conv2d(320, 64, 1)) == 64


def test_a_rank_wider_than_a_layer_names_the_layer_and_the_largest_that_fits():
    targets = [TargetLayer("lora_unet_wide", nn.Linear(64, 64)), TargetLayer("lora_unet_thin", nn.Linear(64, 8))]
    check_ranks_fit(spec(dim=8), targets)  # equal to the width: allowed
    with pytest.raises(ConfigError, match=r"network.dim=9 is more than the width of layer lora_unet_thin \(8\).*network.dim to 8 or less"):
        check_ranks_fit(spec(dim=9), targets)


def test_conv_dim_is_checked_against_the_kxk_convs():
    targets = [TargetLayer("lora_unet_conv", nn.Conv2d(2, 64, 3)), TargetLayer("lora_unet_lin", nn.Linear(64, 64))]
    check_ranks_fit(spec(dim=32, conv_dim=18), targets)
    with pytest.raises(ConfigError, match=r"network.conv_dim=19 .*lora_unet_conv \(18\)"):
        check_ranks_fit(spec(dim=32, conv_dim=19), targets)
    with pytest.raises(ConfigError, match=r"network.dim=19 .*lora_unet_conv"):  # no conv_dim: dim applies
        check_ranks_fit(spec(dim=19), targets)


def test_a_run_with_dim_100000_fails_fast_naming_the_layer(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train("debug=smoke", "network.dim=100000", f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wall_seconds"] < 30  # refused before any module is allocated (it used to hang)
    reason = summary["reason"]
    assert "network.dim=100000" in reason and "lora_" in reason and "or less" in reason
    assert "network.dim=100000 is more than the width of layer lora_" in proc.stderr
    assert not list(run_dir.glob("*.safetensors"))
