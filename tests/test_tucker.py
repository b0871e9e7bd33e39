"""network.use_tucker ([13] point 2): LyCORIS' Tucker decomposition of the 3x3 convs, on our LoCon
modules (lora_mid.weight, as LyCORIS' LoConModule with use_tucker) and LyCORIS' own LoHa / LoKr
(hada_t1 / hada_t2, lokr_t2): files LyCORIS loads back to the training-time output, that a run
continues from, and that the LoRA-only tools refuse by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lycoris.modules.locon import LoConModule
from torch import nn

from atelier.config.network_spec import NetworkSpec, kohya_network_args
from atelier.config.schema import NetworkConfig
from atelier.errors import ConfigError
from atelier.fused.grouping import lane_problems
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.network.dora import DoRAModule
from atelier.network.factory import create_network, network_from_state
from atelier.network.lora import LoRAModule
from atelier.tools.common import ToolError, split_lora
from tests.test_config import compose_config
from tests.test_network_types import CONV_BLOCK, fresh_pipeline, lycoris_apply, render, reproduces, train
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("dora", [False, True], ids=["locon", "dora"])
@pytest.mark.parametrize("conv", [nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(8, 12, 3, 2, 1)], ids=["3x3", "strided"])
def test_the_tucker_module_computes_what_lycoris_locon_computes(conv, dora):
    torch.manual_seed(0)
    mine_base, theirs_base = copy.deepcopy(conv), copy.deepcopy(conv)
    mine = (DoRAModule if dora else LoRAModule)("m", mine_base, 4, 2.0, tucker=True)
    theirs = LoConModule("m", theirs_base, 1.0, 4, 2.0, use_tucker=True, weight_decompose=dora)
    assert mine.lora_down.weight.shape == theirs.lora_down.weight.shape == (4, 8, 1, 1)
    assert mine.lora_mid.weight.shape == theirs.lora_mid.weight.shape == (4, 4, 3, 3)
    with torch.no_grad():
        mine.lora_up.weight.normal_(std=0.5)
        for name in ("lora_down", "lora_mid", "lora_up"):
            getattr(theirs, name).weight.copy_(getattr(mine, name).weight)
    mine.apply_to()
    theirs.apply_to()
    x = torch.randn(2, 8, 6, 6)
    expected = theirs_base(x)
    assert torch.allclose(mine_base(x), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, conv(x), atol=1e-3)
    # The update as a matrix (scale_weight_norms, the tools) is LyCORIS' rebuilt weight.
    assert torch.allclose(mine.weight_delta().reshape(conv.weight.shape), theirs.get_diff_weight()[0], atol=1e-6)
    assert set(mine.state_dict()) >= {"lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"}


def test_only_kxk_convs_get_a_core():
    linear = LoRAModule("m", nn.Linear(8, 8), 2, 1.0, tucker=True)
    one = LoRAModule("m", nn.Conv2d(8, 8, 1), 2, 1.0, tucker=True)
    assert linear.lora_mid is None and one.lora_mid is None
    assert "lora_mid.weight" not in linear.state_dict()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


@pytest.mark.parametrize(
    "kind,extra,core",
    [("locon", {}, ("lora_mid.weight",)), ("loha", {}, ("hada_t1", "hada_t2")), ("lokr", {"factor": 4}, ("lokr_t2",))],
)
def test_each_tucker_kind_writes_its_cores_and_continues_from_them(kind, extra, core, parts):
    spec = NetworkSpec.from_config(NetworkConfig(module=kind, dim=2, alpha=1.0, conv_dim=2, use_tucker=True, **extra))
    state = create_network(spec, *parts).kohya_state_dict()
    for tensor in core:
        assert state[f"{CONV_BLOCK}.{tensor}"].shape[:2] == (2, 2)
    assert not any(key.endswith(core) for key in state if "_attn" in key)  # linear layers: no core
    again = network_from_state(spec, *parts, state, "tucker.safetensors")
    assert all(torch.equal(value, state[key]) for key, value in again.kohya_state_dict().items())
    plain = NetworkSpec.from_config(NetworkConfig(module=kind, dim=2, alpha=1.0, conv_dim=2, **extra))
    with pytest.raises(ValueError, match=r"holds .* tensors, but network.use_tucker=false; continue it with "
                                         r"network.use_tucker=true"):  # fmt: skip
        network_from_state(plain, *parts, state, "tucker.safetensors")


def test_network_args_say_use_tucker():
    net = compose_config("network=locon", "network.conv_dim=4", "network.use_tucker=true").network
    assert kohya_network_args(net) == {"algo": "locon", "preset": "full", "conv_dim": "4", "conv_alpha": "1.0",
                                       "use_tucker": "True"}  # fmt: skip
    assert "use_tucker" not in kohya_network_args(compose_config("network=locon", "network.conv_dim=4").network)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["network=locon", "network.conv_dim=null", "network.use_tucker=true"],
         "network.use_tucker=true decomposes only the 3x3 convs"),
        (["network=lora", "network.conv_dim=4", "network.use_tucker=true"],
         "network.use_tucker=True does not apply to network.module=lora"),
        (["network=dylora", "network.conv_dim=8", "network.use_tucker=true"],
         "network.use_tucker=True does not apply to network.module=dylora"),
    ],
)  # fmt: skip
def test_tucker_where_it_does_nothing_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def test_a_tucker_run_is_not_a_fused_lane():
    cfg = compose_config("network=locon", "network.use_tucker=true", "network.train_unet_only=true")
    assert lane_problems(cfg) == ["network.use_tucker is not fused"]


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_a_tucker_run_trains_and_reloads_in_lycoris(tmp_path, tiny_model_path, kind):
    path, trained, state, meta = train(tmp_path, kind, "network.conv_dim=4", "network.use_tucker=true")
    core = "lora_mid.weight" if kind == "locon" else "hada_t1"
    assert state[f"{CONV_BLOCK}.{core}"].shape == (4, 4, 3, 3)
    assert json.loads(meta["ss_network_args"])["use_tucker"] == "True"
    pipe = fresh_pipeline(tiny_model_path)
    untouched = render(pipe)
    lyco = lycoris_apply(path, pipe)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len({k.split(".", 1)[0] for k in state})
    reproduces(trained, render(pipe), untouched)
    if kind == "locon":
        with pytest.raises(ToolError, match=r"holds lora_mid.weight \(a LyCORIS LoRA trained with network.use_tucker"):
            split_lora(state, str(path))
