"""network.dora_wd ([13] point 2): DoRA as LyCORIS' LoConModule does it (weight_decompose=True) on
our lora / locon modules, LyCORIS' own for loha / lokr; files with <module>.dora_scale and LyCORIS'
metadata, that LyCORIS loads back to the training-time output, that a run continues from, and that
the LoRA-only tools refuse by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lycoris.modules.locon import LoConModule
from torch import nn

from atelier.config.network_spec import NetworkSpec, kohya_module, kohya_network_args
from atelier.config.schema import NetworkConfig
from atelier.errors import ConfigError
from atelier.fused.grouping import lane_problems
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.network.dora import DoRAModule
from atelier.network.factory import create_network, network_from_state
from atelier.network.targets import TargetLayer
from atelier.tools.check import check_modules
from atelier.tools.common import ToolError, split_lora
from atelier.tools.info import format_info, read_info
from tests.test_config import compose_config
from tests.test_network_types import fresh_pipeline, lycoris_apply, render, reproduces, train
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)


def twins(base: nn.Module, **ours) -> tuple[DoRAModule, LoConModule, nn.Module, nn.Module]:
    """Our DoRA module and LyCORIS' on two copies of `base`, holding the same trained-looking weights."""
    torch.manual_seed(0)
    mine_base, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    mine = DoRAModule("m", mine_base, 4, 2.0, **ours)
    theirs = LoConModule("m", theirs_base, 1.0, 4, 2.0, weight_decompose=True, **ours)
    with torch.no_grad():
        assert torch.equal(mine.dora_scale, theirs.dora_scale)  # both start at ||W|| per output channel
        mine.lora_up.weight.normal_(std=0.5)
        mine.dora_scale.mul_(torch.rand_like(mine.dora_scale) + 0.5)
        theirs.lora_down.weight.copy_(mine.lora_down.weight)
        theirs.lora_up.weight.copy_(mine.lora_up.weight)
        theirs.dora_scale.copy_(mine.dora_scale)
    mine.apply_to()
    theirs.apply_to()
    return mine, theirs, mine_base, theirs_base


LAYERS = {"linear": (nn.Linear(16, 24), (3, 5, 16)), "conv3x3": (nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
          "conv1x1": (nn.Conv2d(8, 12, 1), (2, 8, 5, 5)), "strided": (nn.Conv2d(8, 12, 3, 2, 1), (2, 8, 6, 6))}  # fmt: skip


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_the_dora_module_computes_what_lycoris_locon_computes(layer, multiplier):
    base, shape = LAYERS[layer]
    mine, theirs, mine_base, theirs_base = twins(base)
    mine.multiplier = theirs.multiplier = multiplier
    x = torch.randn(shape)
    expected = theirs_base(x)
    assert torch.allclose(mine_base(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, base(x), atol=1e-3)  # the update does something
    # The gradients reach the same tensors, of the same size.
    mine_base(x).square().sum().backward()
    theirs_base(x).square().sum().backward()
    for name in ("lora_down.weight", "lora_up.weight", "dora_scale"):
        ours, lyco = mine.get_parameter(name).grad, theirs.get_parameter(name).grad
        assert torch.allclose(ours, lyco, atol=1e-4, rtol=1e-4), name
    assert set(mine.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}


def test_rank_and_module_dropout_draw_as_lycoris_does():
    base, shape = LAYERS["linear"]
    mine, theirs, mine_base, theirs_base = twins(base, rank_dropout=0.5, module_dropout=0.3)
    x = torch.randn(shape)
    for seed in range(6):  # some steps drop the module, the others rows of the update
        torch.manual_seed(seed)
        expected = theirs_base(x)
        torch.manual_seed(seed)
        assert torch.allclose(mine_base(x), expected, atol=1e-5, rtol=1e-5)


def test_an_untrained_dora_module_changes_nothing():
    base, shape = copy.deepcopy(LAYERS["conv3x3"][0]), LAYERS["conv3x3"][1]
    module = DoRAModule("m", base, 4, 2.0)
    x = torch.randn(shape)
    expected = base(x)
    module.apply_to()
    assert torch.allclose(base(x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr"])
def test_every_dora_kind_writes_dora_scale_for_each_module(kind, parts):
    spec = NetworkSpec.from_config(NetworkConfig(module=kind, dim=4, alpha=2.0, conv_dim=4, dora_wd=True))
    state = create_network(spec, *parts).kohya_state_dict()
    names = {key.split(".", 1)[0] for key in state}
    assert {name for name in names if f"{name}.dora_scale" in state} == names
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (32, 1, 1, 1)


def test_metadata_and_network_args_are_lycoris_ones():
    lora = compose_config("network=lora", "network.dora_wd=true").network
    # sd-scripts' networks.lora has no DoRA: the file is what LyCORIS' algo=lora writes.
    assert kohya_module(lora) == "lycoris.kohya"
    assert kohya_network_args(lora) == {"algo": "lora", "preset": "attn-mlp", "dora_wd": "True"}
    locon = compose_config("network=locon", "network.conv_dim=4", "network.dora_wd=true").network
    assert kohya_network_args(locon) == {"algo": "locon", "preset": "full", "conv_dim": "4", "conv_alpha": "1.0",
                                         "dora_wd": "True"}  # fmt: skip
    plain = compose_config("network=lora").network
    assert kohya_module(plain) == "networks.lora" and "dora_wd" not in kohya_network_args(plain)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["network=dylora", "network.dora_wd=true"], "network.dora_wd=True does not apply to network.module=dylora"),
        (["network=ia3", "network.dora_wd=true"], "network.dora_wd=True does not apply to network.module=ia3"),
        (["network.dora_wd=true", "network.dropout=0.1"], "network.dropout=0.1 does nothing with network.dora_wd=true"),
    ],
)
def test_dora_where_it_cannot_be_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def test_a_dora_run_is_not_a_fused_lane():
    cfg = compose_config("network.dora_wd=true", "network.train_unet_only=true")
    assert lane_problems(cfg) == ["network.dora_wd (DoRA) is not fused"]


def test_a_dora_run_trains_saves_reloads_in_lycoris_and_continues(tmp_path, tiny_model_path, parts):
    path, trained, state, meta = train(tmp_path, "lora", "network.dora_wd=true", "network.conv_dim=4")
    names = {key.split(".", 1)[0] for key in state}
    assert {key.split(".", 1)[1] for key in state} == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    assert all(f"{name}.dora_scale" in state for name in names)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "preset": "full", "conv_dim": "4",
                                                   "conv_alpha": "1.0", "dora_wd": "True"}  # fmt: skip
    # LyCORIS' own loader (LoConModule with dora_scale) gives the image the trained model gave.
    pipe = fresh_pipeline(tiny_model_path)
    untouched = render(pipe)
    lyco = lycoris_apply(path, pipe)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(names)
    assert all(module.wd for module in lyco.unet_loras)
    reproduces(trained, render(pipe), untouched)

    # network.weights: the file continues as DoRA, and only as DoRA.
    dora = NetworkSpec.from_config(NetworkConfig(module="locon", dim=4, conv_dim=4, dora_wd=True))
    network = network_from_state(dora, *parts, state, str(path))
    assert all(torch.equal(value, state[key]) for key, value in network.kohya_state_dict().items())
    plain = NetworkSpec.from_config(NetworkConfig(module="locon", dim=4, conv_dim=4))
    with pytest.raises(ValueError, match=r"holds dora_scale tensors, but network.dora_wd=false; continue it with "
                                         r"network.dora_wd=true"):  # fmt: skip
        network_from_state(plain, *parts, state, str(path))
    undecomposed = create_network(plain, *parts).kohya_state_dict()
    with pytest.raises(ValueError, match="has no dora_scale tensors, but network.dora_wd=true"):
        network_from_state(dora, *parts, undecomposed, "plain.safetensors")

    # The LoRA tools: resize / merge refuse (up @ down alone is not a DoRA update); check looks for NaN / Inf.
    with pytest.raises(ToolError, match=r"holds dora_scale \(a LyCORIS LoRA trained with network.dora_wd\)"):
        split_lora(state, str(path))
    assert {check.kind for check in check_modules(state)} == {"other"}
    info = read_info(path)
    assert info["summary"]["variants"] == {"dora_wd": len(names)}
    assert f"{len(names)} modules trained with network.dora_wd (dora_scale)" in format_info(info)


def test_base_weights_refuse_a_dora_file(tmp_path, parts):
    from safetensors.torch import save_file

    from atelier.network.base_merge import merge_base_weights

    spec = NetworkSpec.from_config(NetworkConfig(module="lora", dim=4, dora_wd=True))
    path = tmp_path / "dora.safetensors"
    save_file({k: v.contiguous() for k, v in create_network(spec, *parts).kohya_state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="was trained with network.dora_wd"):
        merge_base_weights(*parts, [str(path)], [1.0])


def test_a_target_gets_dora_through_the_kind_builder(parts):
    from atelier.network.factory import make_module

    layer = TargetLayer("lora_unet_x", nn.Linear(8, 8))
    spec = NetworkSpec.from_config(NetworkConfig(module="locon", dim=2, dora_wd=True))
    assert isinstance(make_module(spec, layer), DoRAModule)
