"""[10]: the kohya FLUX.1 LoRA network (atelier.network.flux_lora) on tiny-flux's diffusers transformer.

A fused BFL layer (double-block qkv, single-block linear1) is one kohya module over several
diffusers Linears: one lora_down, a lora_up whose rows the Linears split in order. Checked here
against hand-computed BFL-style updates, through save_lora / load_lora, and against diffusers'
own reader of kohya FLUX LoRA files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model
from atelier.network.flux_lora import CLIP_PREFIX, FusedLoRAModule, build_flux_network, flux_network_from_state
from atelier.network.flux_names import flux_targets_of, fused_out_features
from atelier.network.lora import LoRAModule
from atelier.network.lora_file import load_lora, save_lora
from atelier.network.targets import iter_targets

RANK, ALPHA = 4, 2.0  # scale 0.5


@pytest.fixture(scope="module")
def tiny_flux_path(atelier_cache: Path) -> Path:
    return ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)


def load_pipeline(path: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path: Path):
    return load_pipeline(tiny_flux_path)


def transformer_inputs(transformer, seed: int = 0, tokens: int = 16, text: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    positions = torch.arange(tokens)
    return {
        "hidden_states": torch.randn(2, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(2, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.3, 0.7]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.stack([torch.zeros(tokens), positions // 4, positions % 4], dim=1).float(),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


@torch.no_grad()
def run(transformer, network=None, seed: int = 0) -> torch.Tensor:
    """The transformer's output on fixed inputs, `network` applied for this call only."""
    if network is not None:
        network.apply_to()
    try:
        return transformer(**transformer_inputs(transformer, seed))[0]
    finally:
        if network is not None:
            network.restore()


@torch.no_grad()
def perturb(network, seed: int = 1, std: float = 0.5) -> None:
    """Random up weights, so every module changes the output (a fresh network is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.loras.values():
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)


def test_names_and_shapes_are_the_kohya_modules_of_flux_targets(pipeline):
    transformer = pipeline.transformer
    for train_blocks in ("all", "double", "single"):
        network = build_flux_network(transformer, RANK, ALPHA, train_blocks)
        targets = flux_targets_of(transformer, train_blocks)
        assert list(network.loras) == [t.name for t in targets]  # sd-scripts' order
        state = network.kohya_state_dict()
        expected = {}
        for target in targets:
            in_features = transformer.get_submodule(target.modules[0]).in_features
            expected |= {f"{target.name}.lora_down.weight": (RANK, in_features),
                         f"{target.name}.lora_up.weight": (sum(fused_out_features(transformer, target)), RANK),
                         f"{target.name}.alpha": ()}  # fmt: skip
            module = network.loras[target.name]
            assert isinstance(module, FusedLoRAModule) == target.fused, target
        assert {key: tuple(value.shape) for key, value in state.items()} == expected
    linear1 = network.loras["lora_unet_single_blocks_0_linear1"]
    assert linear1.rows == [(0, 32), (32, 64), (64, 96), (96, 224)]  # q, k, v, MLP
    for name, value in state.items():  # sd-scripts' initialisation
        if name.endswith("lora_up.weight"):
            assert not value.any(), name
        elif name.endswith("lora_down.weight"):  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            assert value.std() > 0 and value.abs().max() <= value.shape[1] ** -0.5, name
        else:
            assert value.item() == ALPHA


def test_the_fresh_network_changes_no_output(pipeline):
    transformer = pipeline.transformer
    network = build_flux_network(transformer, RANK, ALPHA)
    assert torch.equal(run(transformer, network), run(transformer))


def bfl_fused_layer(module, x: torch.Tensor) -> torch.Tensor:
    """BFL's one Linear (the parts' weights and biases stacked) plus the kohya module's update."""
    parts = module.parts if isinstance(module, FusedLoRAModule) else [module.base]
    weight = torch.cat([part.weight for part in parts])
    bias = torch.cat([part.bias for part in parts])
    down, up = module.lora_down.weight, module.lora_up.weight
    return F.linear(x, weight, bias) + (x @ down.T @ up.T) * (float(module.alpha) / module.rank) * module.multiplier


@torch.no_grad()
def test_each_module_adds_the_bfl_fused_update_to_its_diffusers_rows(pipeline):
    transformer = pipeline.transformer
    network = build_flux_network(transformer, RANK, ALPHA)
    perturb(network)
    network.loras["lora_unet_double_blocks_1_txt_attn_qkv"].multiplier = 0.7
    network.apply_to()
    try:
        for name in ("lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
                     "lora_unet_single_blocks_2_linear1", "lora_unet_single_blocks_2_linear2",
                     "lora_unet_double_blocks_0_img_mod_lin"):  # fmt: skip
            module = network.loras[name]
            x = torch.randn(2, 5, module.lora_down.weight.shape[1], generator=torch.Generator().manual_seed(2))
            expected = bfl_fused_layer(module, x)
            if isinstance(module, FusedLoRAModule):
                torch.testing.assert_close(module(x), expected)  # the fused layer itself
                for part, (start, end) in zip(module.parts, module.rows):  # each patched diffusers Linear
                    torch.testing.assert_close(part(x), expected[..., start:end])
            else:
                torch.testing.assert_close(module.base(x), expected)
    finally:
        network.restore()


@torch.no_grad()
def test_the_patched_transformer_equals_the_base_with_the_fused_updates_merged(pipeline):
    transformer = pipeline.transformer
    network = build_flux_network(transformer, RANK, ALPHA)
    perturb(network)
    merged = copy.deepcopy(transformer)
    for target in flux_targets_of(transformer):
        module = network.loras[target.name]
        delta = module.lora_up.weight @ module.lora_down.weight * (ALPHA / RANK)  # BFL's [sum of rows, in]
        for path, rows in zip(target.modules, delta.split(fused_out_features(transformer, target))):
            merged.get_submodule(path).weight += rows
    patched = run(transformer, network)
    assert (patched - run(transformer)).abs().max() > 0.1  # every module's update reaches the output
    # float32, one product summed in two orders: equal to rounding.
    torch.testing.assert_close(patched, run(merged), rtol=1e-4, atol=1e-5)


def test_the_parts_share_one_dropout_draw_as_the_fused_layer(pipeline):
    network = build_flux_network(pipeline.transformer, RANK, ALPHA, dropout=0.3, rank_dropout=0.25)
    perturb(network)
    module = network.loras["lora_unet_single_blocks_1_linear1"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    network.apply_to()
    try:
        torch.manual_seed(7)
        with torch.enable_grad():  # dropouts act only where autograd records (GradGatedTraining)
            got = torch.cat([part(x) for part in module.parts], dim=-1).detach()
        torch.manual_seed(7)  # BFL's one Linear: one dropout and one rank mask for all its rows
        h = F.dropout(x @ module.lora_down.weight.T.detach(), p=0.3)
        h = h * (torch.rand(2, RANK) > 0.25).float()[:, None, :]
        with torch.no_grad():
            weight = torch.cat([part.weight for part in module.parts])
            bias = torch.cat([part.bias for part in module.parts])
            expected = F.linear(x, weight, bias) + h @ module.lora_up.weight.T * (ALPHA / RANK / 0.75)
        torch.testing.assert_close(got, expected)
        assert module._shared is None  # let go once every part has read it
    finally:
        network.restore()

    network = build_flux_network(pipeline.transformer, RANK, ALPHA, module_dropout=0.5)
    perturb(network)
    module = network.loras["lora_unet_double_blocks_0_img_attn_qkv"]
    x = torch.randn(2, 5, 32)
    network.apply_to()
    try:
        kept = set()
        with torch.enable_grad():
            for _ in range(16):
                out = module(x).detach()
                updated = [not torch.equal(out[..., a:b], module._part_forwards[i](x))
                           for i, (a, b) in enumerate(module.rows)]  # fmt: skip
                assert len(set(updated)) == 1, updated  # all the fused layer's rows, or none
                kept.add(updated[0])
        assert kept == {True, False}
    finally:
        network.restore()


def test_a_saved_network_loads_back_with_identical_outputs(pipeline, tmp_path):
    transformer, text_encoder = pipeline.transformer, pipeline.text_encoder
    network = build_flux_network(transformer, RANK, ALPHA, text_encoder=text_encoder)
    perturb(network)
    path = save_lora(tmp_path / "flux.safetensors", network.kohya_state_dict(), {"ss_network_dim": str(RANK)})
    state, _ = load_lora(path)
    loaded = flux_network_from_state(transformer, state, text_encoder, source=str(path))
    assert list(loaded.loras) == list(network.loras)
    assert all(torch.equal(a, b) for a, b in zip(loaded.kohya_state_dict().values(), network.kohya_state_dict().values()))
    assert torch.equal(run(transformer, loaded), run(transformer, network))
    ids = torch.tensor([[0, 5, 9, 1]])
    outputs = []
    for net in (network, loaded):
        net.apply_to()
        with torch.no_grad():
            outputs.append(text_encoder(ids).last_hidden_state)
        net.restore()
    assert torch.equal(*outputs)

    # A file of some modules (train_blocks=single, another rank) gives those modules only.
    single = build_flux_network(transformer, 2, 1.0, "single")
    perturb(single)
    loaded = flux_network_from_state(transformer, single.kohya_state_dict())
    assert list(loaded.loras) == list(single.loras) and loaded.loras["lora_unet_single_blocks_0_linear1"].rank == 2
    assert torch.equal(run(transformer, loaded), run(transformer, single))
    with pytest.raises(ValueError, match="holds CLIP-L modules"):
        flux_network_from_state(transformer, state)
    with pytest.raises(ValueError, match="unexpected keys"):
        flux_network_from_state(transformer, {**state, "lora_unet_img_in.lora_down.weight": torch.zeros(4, 64)},
                                text_encoder)  # fmt: skip


def test_clip_l_modules_are_named_as_sd_scripts_names_text_encoder_1(pipeline):
    text_encoder = pipeline.text_encoder
    network = build_flux_network(pipeline.transformer, RANK, ALPHA, "single", text_encoder=text_encoder)
    clip = [name for name in network.loras if name.startswith(f"{CLIP_PREFIX}_")]
    # sd-scripts names CLIP-L's layers as lora.py names SD's text encoder, with lora_te1 for lora_te:
    # the names SDXL's first text encoder gets here too (atelier.network.targets).
    sd = [t.lora_name.replace("lora_te_", "lora_te1_", 1) for t in iter_targets(None, text_encoder)]
    sdxl = [t.lora_name for t in iter_targets(None, [text_encoder, text_encoder]) if t.lora_name.startswith("lora_te1_")]
    assert clip == sd == sdxl
    layers = text_encoder.config.num_hidden_layers
    assert len(clip) == 6 * layers  # q, k, v, out_proj, fc1, fc2 per layer
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in clip
    assert all(isinstance(network.loras[name], LoRAModule) for name in clip)
    assert list(network.loras)[: len(clip)] == clip  # text encoder first, as sd-scripts


def test_diffusers_loads_our_file_into_the_same_transformer_and_text_encoder(tiny_flux_path, tmp_path):
    """diffusers' FluxPipeline.load_lora_weights, on our saved file, gives the outputs of our patched model.

    train_blocks="double": diffusers' kohya FLUX reader (_convert_kohya_flux_lora_to_diffusers)
    hard-codes FLUX.1's single-block linear1 split (3072 x 3 + 12288), so it cannot read a tiny
    model's linear1 (checked below); every double-block module, fused qkv included, and CLIP-L's
    lora_te1 modules it reads.
    """
    pipeline = load_pipeline(tiny_flux_path)
    transformer, text_encoder = pipeline.transformer, pipeline.text_encoder
    # alpha / rank = 0.75: not a power of two, so diffusers' scaled A and our scaled output round
    # differently (at 0.5 both are exact and the outputs are bitwise equal).
    network = build_flux_network(transformer, RANK, 3.0, "double", text_encoder=text_encoder)
    perturb(network)
    ids = torch.tensor([[0, 5, 9, 1, 2]])
    base, base_te = run(transformer), text_encoder(ids).last_hidden_state.detach()
    ours = run(transformer, network)
    network.apply_to()
    with torch.no_grad():
        ours_te = text_encoder(ids).last_hidden_state
    network.restore()
    path = save_lora(tmp_path / "double.safetensors", network.kohya_state_dict(), {})

    pipeline.load_lora_weights(str(path))
    theirs = run(transformer)
    with torch.no_grad():
        theirs_te = text_encoder(ids).last_hidden_state
    assert (ours - base).abs().max() > 0.1 and (ours_te - base_te).abs().max() > 0.1  # the LoRA is not a no-op
    # diffusers folds alpha / rank into its A (down) and computes B(A x) per Linear; we compute
    # up[rows](down x) * alpha / rank: the same products in float32 with the scale applied at
    # another point, so equal to rounding: measured max |difference| 4.8e-7 (transformer) and
    # 9.0e-7 (CLIP-L); the tolerance leaves 10x room above that.
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, rtol=1e-4, atol=1e-5)

    pipeline.unload_lora_weights()
    everything = build_flux_network(transformer, RANK, ALPHA)
    perturb(everything)
    path = save_lora(tmp_path / "all.safetensors", everything.kohya_state_dict(), {})
    with pytest.raises(AssertionError):  # sum(dims) == up_weight.shape[0]: FLUX.1's 21504 rows, not 224
        pipeline.load_lora_weights(str(path))


def lora_grads(transformer, network, checkpointing: bool) -> dict[str, torch.Tensor]:
    """The gradients of the network's weights for one training-like step (dropouts drawn from seed 5)."""
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    network.zero_grad(set_to_none=True)
    network.apply_to()
    try:
        torch.manual_seed(5)
        out = transformer(**transformer_inputs(transformer))[0]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    finally:
        network.restore()
        transformer.disable_gradient_checkpointing()
    return {name: p.grad.clone() for name, p in network.named_parameters()}


def test_training_gradients_are_the_fused_layers_with_and_without_checkpointing(pipeline):
    """A fused module's down gets the gradient of BFL's one Linear (its parts' contributions summed),
    and gradient checkpointing (which runs each block's forward again) changes no gradient: the
    parts of the recomputed forward share that forward's own dropout draws."""
    transformer = pipeline.transformer
    network = build_flux_network(transformer, RANK, ALPHA, dropout=0.1, rank_dropout=0.25)
    perturb(network)
    module = network.loras["lora_unet_single_blocks_0_linear1"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 5, sum(b - a for a, b in module.rows), generator=torch.Generator().manual_seed(6))
    network.apply_to()
    try:
        torch.manual_seed(9)
        (torch.cat([part(x) for part in module.parts], dim=-1) * weights).sum().backward()
    finally:
        network.restore()
    got = module.lora_down.weight.grad.clone(), module.lora_up.weight.grad.clone()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(9)  # the fused layer by hand, with the draws in kohya's order
    h = F.dropout(F.linear(x, module.lora_down.weight), p=0.1)
    h = h * (torch.rand(2, RANK) > 0.25).float()[:, None, :]
    ((h @ module.lora_up.weight.T * (ALPHA / RANK / 0.75)) * weights).sum().backward()
    # down's gradient sums the parts' contributions, ours part by part, by hand in one matmul: equal to rounding.
    torch.testing.assert_close(got, (module.lora_down.weight.grad, module.lora_up.weight.grad), rtol=1e-4, atol=1e-5)

    plain = lora_grads(transformer, network, checkpointing=False)
    assert all(grad.abs().max() > 0 for grad in plain.values())
    checkpointed = lora_grads(transformer, network, checkpointing=True)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
