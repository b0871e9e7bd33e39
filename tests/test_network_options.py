"""Network options without a training run: config checks, dropouts, max norm, DyLoRA blocks,
starting from an existing file of each kind, sd-scripts names (metadata, export), tools."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from atelier.cli import main
from atelier.config.schema import NetworkConfig
from atelier.models.architectures import build_text_encoder, build_unet
from atelier.config import network_kinds
from atelier.network.factory import create_network, network_from_state
from atelier.network.lora import LoRAModule
from atelier.config.network_spec import NetworkSpec, kohya_module, kohya_network_args
from atelier.network.lora_file import save_lora
from atelier.tools.export_kohya import build_export
from tests.test_config import compose_config

KINDS = list(network_kinds.KINDS)  # a kind added to the registry is tested here too


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


def spec(**overrides) -> NetworkSpec:
    return NetworkSpec.from_config(OmegaConf.merge(OmegaConf.structured(NetworkConfig), overrides))


def perturb(network, std: float = 0.1) -> None:
    """Random weights everywhere, so a module that is not loaded shows up."""
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, std)


def outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample, ctx, ids = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), ctx).sample, text_encoder(ids).last_hidden_state


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"module": "loha", "dropout": 0.1}, "network.dropout=0.1 does not apply to network.module=loha"),
        ({"module": "lora", "factor": 4}, "network.factor=4 does not apply to network.module=lora"),
        ({"module": "lora", "unit": 2}, "network.unit=2 does not apply"),
        ({"module": "ia3", "conv_dim": 4}, "network.conv_dim=4 does not apply to network.module=ia3"),
        ({"module": "lora", "rank_dropout": 1.5}, r"network.rank_dropout=1.5 must be in \[0, 1\)"),
        ({"module": "dylora", "dim": 6, "unit": 4}, "network.dim=6 must be a multiple of network.unit=4"),
        ({"module": "dylora", "dim": 8, "conv_dim": 4}, "conv_dim equal to network.dim"),
    ],
)
def test_options_that_do_not_apply_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_composes_and_is_a_no_op_at_init(kind, parts):
    cfg = compose_config(f"network={kind}")
    assert cfg.network.module.value == kind
    unet, text_encoder = parts
    before = outputs(unet, text_encoder)
    network = create_network(NetworkSpec.from_config(cfg.network), unet, text_encoder)
    network.apply_to()
    try:
        after = outputs(unet, text_encoder)
    finally:
        network.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert network.count("lora_unet") and network.count("lora_te")


def test_conv_dim_adds_the_conv_blocks_with_their_own_rank_and_alpha(parts):
    unet, _ = parts
    plain = create_network(spec(), unet, None)
    conv = create_network(spec(conv_dim=2, conv_alpha=0.5), unet, None)
    added = set(conv.loras) - set(plain.loras)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in added and "lora_unet_up_blocks_0_upsamplers_0_conv" in added
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in added
    conv1 = conv.loras["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv1.rank, float(conv1.alpha)) == (2, 0.5)
    # Linear layers of the conv blocks take the linear dim, as in sd-scripts.
    emb = conv.loras["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]
    assert (emb.rank, float(emb.alpha)) == (8, 4.0)


def test_dropouts_act_only_in_training_steps(parts):
    _, text_encoder = parts
    layer = text_encoder.encoder.layers[0].self_attn.q_proj
    module = LoRAModule("m", layer, rank=4, alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.0)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(3, 5, layer.in_features)
    try:
        with torch.no_grad():
            plain = layer(x)
        torch.manual_seed(0)
        noisy = layer(x)  # grad enabled + train mode: a training step
        module.eval()
        assert torch.equal(layer(x), plain)
        module.train()
        module.module_dropout = 0.999
        skipped = layer(x)
    finally:
        module.restore()
    assert not torch.allclose(noisy, plain)
    # Module dropout leaves the whole update out: the base layer alone.
    assert torch.allclose(skipped, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dylora"])
def test_scale_weight_norms_caps_every_update(kind, parts):
    unet, text_encoder = parts
    network = create_network(spec(module=kind, dim=4, unit=2 if kind == "dylora" else None), unet, text_encoder)
    perturb(network, std=1.0)
    first = network.apply_max_norm(0.5)
    assert first["max_norm/keys_scaled"] > 0 and first["max_norm/max_key_norm"] <= 0.5 + 1e-5
    # A second pass finds nothing left to scale (beyond float rounding at the cap).
    again = network.apply_max_norm(0.5)
    assert again["max_norm/average_key_norm"] == pytest.approx(first["max_norm/average_key_norm"], rel=1e-4)


def test_dylora_trains_one_block_per_step_and_saves_plain_lora(parts):
    _, text_encoder = parts
    network = create_network(spec(module="dylora", dim=8, unit=2), None, text_encoder)
    module = network.loras["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    network.apply_to()
    try:
        out = text_encoder(torch.tensor([[1, 2, 3]])).last_hidden_state
        out.sum().backward()
    finally:
        network.restore()
    with_grad = [i for i, p in enumerate(module.down_blocks) if p.grad is not None]
    assert len(with_grad) == 1 and all(p.grad is None for i, p in enumerate(module.up_blocks) if i != with_grad[0])
    state = network.kohya_state_dict()
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (8, 32)
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].shape == (32, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_continuing_from_a_file_restores_every_module(kind, parts, tmp_path):
    unet, text_encoder = parts
    s = spec(module=kind, dim=4, conv_dim=4 if kind != "ia3" else None, unit=2 if kind == "dylora" else None)
    source = create_network(s, unet, text_encoder)
    perturb(source)
    state = {k: v.clone() for k, v in source.kohya_state_dict().items()}
    source.apply_to()
    expected = outputs(unet, text_encoder)
    source.restore()
    # Another dim / alpha in the config: the file's win.
    other = spec(module=kind, dim=8, alpha=1.0, unit=2 if kind == "dylora" else None)
    loaded = network_from_state(other, unet, text_encoder, state, "old.safetensors")
    assert set(loaded.loras) == set(source.loras)
    loaded.apply_to()
    try:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(unet, text_encoder), expected))
    finally:
        loaded.restore()


def test_continuing_refuses_another_kind_and_missing_parts(parts):
    unet, text_encoder = parts
    loha = create_network(spec(module="loha", dim=4), unet, text_encoder).kohya_state_dict()
    with pytest.raises(ValueError, match="holds loha modules, but network.module=lora; continue it with network=loha"):
        network_from_state(spec(), unet, text_encoder, loha, "old.safetensors")
    unet_only = create_network(spec(), unet, None).kohya_state_dict()
    with pytest.raises(ValueError, match="no lora_te_ modules.*network.train_unet_only=true"):
        network_from_state(spec(), unet, text_encoder, unet_only, "old.safetensors")


@pytest.mark.parametrize(
    "overrides,module,args",
    [
        ({}, "networks.lora", {}),
        ({"conv_dim": 4, "rank_dropout": 0.1, "module_dropout": 0.2}, "networks.lora",
         {"conv_dim": "4", "conv_alpha": "1.0", "rank_dropout": "0.1", "module_dropout": "0.2"}),
        ({"module": "locon", "conv_dim": 4, "conv_alpha": 2.0, "dropout": 0.1}, "lycoris.kohya",
         {"algo": "locon", "preset": "full", "conv_dim": "4", "conv_alpha": "2.0", "dropout": "0.1"}),
        ({"module": "loha"}, "lycoris.kohya", {"algo": "loha", "preset": "attn-mlp"}),
        ({"module": "lokr", "factor": 8}, "lycoris.kohya", {"algo": "lokr", "preset": "attn-mlp", "factor": "8"}),
        ({"module": "dylora", "unit": 4}, "networks.dylora", {"unit": "4"}),
    ],
)  # fmt: skip
def test_sd_scripts_module_and_network_args(overrides, module, args):
    net = OmegaConf.merge(OmegaConf.structured(NetworkConfig), overrides)
    assert kohya_module(net) == module and kohya_network_args(net) == args


def test_export_kohya_writes_network_args_and_dropout(tmp_path):
    for overrides, expected in [
        (["network=lora", "network.conv_dim=4", "network.dropout=0.1", "network.scale_weight_norms=1.0"],
         {"network_module": "networks.lora", "network_args": ["conv_dim=4", "conv_alpha=1.0"],
          "network_dropout": 0.1, "scale_weight_norms": 1.0}),
        (["network=loha", "network.rank_dropout=0.2"],
         {"network_module": "lycoris.kohya",
          "network_args": ["algo=loha", "preset=full", "conv_dim=4", "conv_alpha=1.0", "rank_dropout=0.2"]}),
    ]:  # fmt: skip
        cfg = OmegaConf.to_container(compose_config(*overrides), resolve=True)
        args = build_export(cfg, tmp_path).args
        assert {k: args.get(k) for k in expected} == expected


def test_tools_read_lycoris_files_and_lora_tools_refuse_them(parts, tmp_path, capsys):
    unet, text_encoder = parts
    network = create_network(spec(module="loha", dim=4), unet, text_encoder)
    path = save_lora(tmp_path / "loha.safetensors", network.kohya_state_dict(), {"ss_network_module": "lycoris.kohya"})
    assert main(["check", str(path)]) == 0
    assert "not LoRA (NaN/Inf checked only)" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0
    assert "lycoris.kohya" in capsys.readouterr().out
    assert main(["resize", str(path), str(tmp_path / "small.safetensors"), "--rank", "2"]) != 0
    assert "is a LyCORIS (LoHa/LoKr/...) module" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_training_state_round_trip(kind, parts):
    """The trainer saves network.state_dict() between epochs and loads it on resume."""
    unet, text_encoder = parts
    s = spec(module=kind, dim=4, unit=2 if kind == "dylora" else None)
    source = create_network(s, unet, text_encoder)
    perturb(source)
    resumed = create_network(s, unet, text_encoder)
    resumed.load_state_dict(source.state_dict())
    a, b = source.kohya_state_dict(), resumed.kohya_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
