"""LoRA+ ([13] point 2, network args): network.loraplus_lr_ratio / loraplus_unet_lr_ratio /
loraplus_text_encoder_lr_ratio give each part's up matrices their own learning rate, as sd-scripts'
networks.lora and networks.dylora group them (prepare_optimizer_params)."""

from __future__ import annotations

import json

import pytest
import torch

from atelier.errors import ConfigError
from atelier.loop.build import param_groups
from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged, train  # noqa: F401  (fixture)


def test_the_up_matrices_get_the_ratio_and_each_part_its_own():
    cfg = make_cfg("network.loraplus_lr_ratio=16", "network.loraplus_unet_lr_ratio=4", "optimizer.learning_rate=1e-4",
                   "optimizer.text_encoder_lr=5e-5")  # fmt: skip
    got = [(name, up, pytest.approx(lr)) for name, _, up, lr in param_groups(cfg)]
    assert got == [("unet", False, 1e-4), ("unet_plus", True, 4e-4),  # the UNet's own ratio wins
                   ("text_encoder", False, 5e-5), ("text_encoder_plus", True, 16 * 5e-5)]  # fmt: skip
    assert [name for name, _, up, _ in param_groups(make_cfg())] == ["unet", "text_encoder"]


def test_a_run_with_lora_plus_trains_otherwise_and_says_so(tmp_path):
    common = ["training.max_train_steps=3", "optimizer.learning_rate=1e-3"]
    plain, _ = train(tmp_path, *common, name="plain")
    plus, _ = train(tmp_path, *common, "network.loraplus_lr_ratio=16", name="plus")
    a, _ = load_lora(plain / "demo.safetensors")
    b, meta = load_lora(plus / "demo.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))
    assert json.loads(meta["ss_network_args"])["loraplus_lr_ratio"] == "16.0"
    logged = steps_logged(plus)[0]
    assert logged["lr/unet_plus"] == pytest.approx(16 * logged["lr/unet"])
    assert logged["lr/text_encoder_plus"] == pytest.approx(16 * logged["lr/text_encoder"])


def test_dylora_takes_it_and_the_lycoris_kinds_do_not():
    groups = param_groups(make_cfg("network=dylora", "network.unit=2", "network.loraplus_lr_ratio=8"))
    assert [name for name, *_ in groups] == ["unet", "unet_plus", "text_encoder", "text_encoder_plus"]
    with pytest.raises(ConfigError, match="network.loraplus_lr_ratio=16.0 does not apply to network.module=loha"):
        make_cfg("network=loha", "network.loraplus_lr_ratio=16")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_ratio_must_be_above_zero(value):
    with pytest.raises(ConfigError, match=f"network.loraplus_unet_lr_ratio={float(value)} must be above 0"):
        make_cfg(f"network.loraplus_unet_lr_ratio={value}")


def test_the_up_and_down_parameters_split_the_network_exactly(tmp_path):
    """Every parameter is in exactly one group: LoRA+ moves parameters between groups, it never
    loses one (for LoRA's lora_up and DyLoRA's up_blocks alike)."""
    from atelier.config.network_spec import NetworkSpec
    from atelier.models.architectures import build_text_encoder, build_unet
    from atelier.network.factory import create_network
    from atelier.network.targets import UNET_PREFIX

    torch.manual_seed(0)
    unet, te = build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")
    for module in ("network=lora", "network=dylora"):
        cfg = make_cfg(module, "network.dim=4", "network.unit=2" if module.endswith("dylora") else "network.conv_dim=2")
        network = create_network(NetworkSpec.from_config(cfg.network), unet, te)
        up, rest = network.parameters_of(UNET_PREFIX, True), network.parameters_of(UNET_PREFIX, False)
        assert up and rest and not {id(p) for p in up} & {id(p) for p in rest}
        assert len(up) + len(rest) == len(network.parameters_of(UNET_PREFIX))
        modules = [m for name, m in network.loras.items() if name.startswith(UNET_PREFIX)]
        blocks = 4 // 2 if module.endswith("dylora") else 1  # DyLoRA: one up block per unit of rank
        assert len(up) == len(modules) * blocks
