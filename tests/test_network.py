"""LoRA network: kohya names and module sets, exact no-op at init, file round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from atelier.models.architectures import build_text_encoder, build_unet
from atelier.network.lora import LoRANetwork
from atelier.network.lora_file import addnet_model_hash, load_lora, save_lora
from tests.builders import ranks_and_alphas


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    return build_unet("tiny-sd15"), build_text_encoder("tiny-sd15")


def test_full_size_sd15_has_kohya_module_set():
    """kohya's networks.lora creates 192 UNet and 72 text-encoder modules for SD1.5."""
    with torch.device("meta"):
        unet, text_encoder = build_unet("sd15"), build_text_encoder("sd15")
        network = LoRANetwork.create(unet, text_encoder, rank=4, alpha=2)
    assert network.count("lora_unet") == 192
    assert network.count("lora_te") == 72
    names = set(network.loras)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
    # proj_in/proj_out are 1x1 convs in SD1.5: their LoRA weights are 4-D.
    proj = network.loras["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert proj.lora_down.weight.shape == (4, 320, 1, 1)
    assert proj.lora_up.weight.shape == (320, 4, 1, 1)


def test_untrained_network_is_a_no_op_and_restore_detaches(tiny_parts):
    unet, _ = tiny_parts
    sample, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(sample, t, ctx).sample
        network = LoRANetwork.create(unet, None, rank=4, alpha=1)
        network.apply_to()
        assert torch.equal(unet(sample, t, ctx).sample, before)
        for module in network.loras.values():
            module.lora_up.weight.normal_()
        changed = unet(sample, t, ctx).sample
        network.restore()
        restored = unet(sample, t, ctx).sample
    assert not torch.allclose(changed, before)
    assert torch.equal(restored, before)


def test_update_is_up_down_times_alpha_over_rank(tiny_parts):
    _, text_encoder = tiny_parts
    network = LoRANetwork.create(None, text_encoder, rank=4, alpha=2)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    module = network.loras[name]
    base = text_encoder.encoder.layers[0].self_attn.q_proj
    torch.nn.init.normal_(module.lora_up.weight)
    network.apply_to()
    x = torch.randn(3, base.in_features)
    expected = base.weight @ x.T + base.bias[:, None]
    expected = expected + (module.lora_up.weight @ module.lora_down.weight @ x.T) * (2 / 4)
    with torch.no_grad():
        assert torch.allclose(base(x), expected.T, atol=1e-5)
    network.restore()


def test_kohya_file_round_trip(tiny_parts, tmp_path):
    unet, text_encoder = tiny_parts
    network = LoRANetwork.create(unet, text_encoder, rank=4, alpha=3)
    state = network.kohya_state_dict()
    path = save_lora(tmp_path / "x.safetensors", state, {"ss_network_dim": "4", "user": "kept"}, "fp16")
    loaded, meta = load_lora(path)
    assert set(loaded) == set(state)
    # A real alpha tensor holding the configured alpha, not the rank.
    alphas = [v for k, v in loaded.items() if k.endswith(".alpha")]
    assert alphas and all(a.ndim == 0 and float(a) == 3.0 for a in alphas)
    assert all(v.dtype == torch.float16 for v in loaded.values())
    assert meta["user"] == "kept" and len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    # sshs_model_hash is the hash of the tensor bytes after the header.
    assert meta["sshs_model_hash"] == addnet_model_hash(path.read_bytes())
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "4"
    ranks, alpha_map = ranks_and_alphas(loaded)
    assert set(ranks.values()) == {4} and set(alpha_map.values()) == {3.0}


def test_loading_mismatched_file_names_the_file(tiny_parts):
    unet, text_encoder = tiny_parts
    full = LoRANetwork.create(unet, text_encoder, rank=4, alpha=1)
    unet_only = LoRANetwork.create(unet, None, rank=4, alpha=1)
    with pytest.raises(ValueError, match="network.weights=old.safetensors does not fit"):
        unet_only.load_kohya_state_dict(full.kohya_state_dict(), "old.safetensors")


def test_scale_is_a_python_float_that_follows_a_loaded_alpha():
    from atelier.network.dylora import DyLoRAModule
    from atelier.network.lora import LoRAModule

    for module in (LoRAModule("lora_unet_x", torch.nn.Linear(8, 8), rank=4, alpha=2.0),
                   DyLoRAModule("lora_unet_x", torch.nn.Linear(8, 8), rank=4, alpha=2.0, unit=2)):
        assert type(module.scale) is float and module.scale == 0.5
        state = {**module.state_dict(), "alpha": torch.tensor(8.0)}
        module.load_state_dict(state)
        assert module.scale == 2.0  # the float follows the buffer a state dict brings


def test_network_forward_and_backward_read_no_tensor_back_to_the_host():
    """`float(self.alpha)` in the forward copied the buffer to the host at every patched layer
    of every step: a GPU sync each time (hundreds a step), and a torch.compile graph break.
    Every tensor-to-Python read goes through aten._local_scalar_dense; none may read the
    module's own tensors, which live on the GPU in training. (DyLoRA's block draw reads a
    CPU random number: no sync.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from atelier.network.dylora import DyLoRAModule
    from atelier.network.lora import LoRAModule

    class HostReads(TorchDispatchMode):
        def __init__(self, module):
            super().__init__()
            self.own = {t.data_ptr() for t in (*module.parameters(), *module.buffers())}
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.count += args[0].data_ptr() in self.own
            return func(*args, **(kwargs or {}))

    for make in (lambda layer: LoRAModule("lora_unet_x", layer, rank=4, alpha=2.0),
                 lambda layer: DyLoRAModule("lora_unet_x", layer, rank=4, alpha=2.0, unit=4)):
        layer = torch.nn.Linear(8, 8).requires_grad_(False)
        module = make(layer)
        module.apply_to()
        x = torch.randn(3, 8)
        with HostReads(module) as reads:
            layer(x).square().mean().backward()
        module.restore()
        assert reads.count == 0, type(module).__name__
