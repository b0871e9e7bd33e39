"""[10] training.blocks_to_swap (atelier.models.block_swap): FLUX's transformer blocks whose frozen
Linear weights stay in CPU memory and are copied to the training device at each use.

The machine has no GPU, so "the device" is the CPU here too: the tests check what does not
depend on it. Which blocks (sd-scripts' split, on FLUX.1's real architecture); that a streamed
layer computes exactly what the layer computes, forward and input gradient, with fp8 storage
too; that a run with swapping fetches each streamed weight once in the forward and once in the
backward of every step (again in the recompute with gradient checkpointing) and trains the LoRA
the same run without swapping trains; and the refusals, naming the key.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atelier.errors import ConfigError
from atelier.models import block_swap
from atelier.models.block_swap import StreamedLinear, blocks_to_swap, stream, streamed_layers
from atelier.models.fp8_storage import store_weights_in_fp8
from tests.helpers import final_lora
from tests.test_flux_training import train_flux
from tests.test_trainer import fresh_accelerate_state, make_cfg, steps_logged  # noqa: F401  (autouse fixture)


def test_the_blocks_are_sd_scripts_on_flux1_dev():
    """enable_block_swap(N): N // 2 double blocks and (N - N // 2) * 2 single blocks, the last ones."""
    from atelier.models.flux_architectures import build_flux_transformer

    with torch.device("meta"):
        transformer = build_flux_transformer("dev")  # 19 double, 38 single blocks
    blocks = blocks_to_swap(transformer, 18)  # sd-scripts' "safe for most cases" value
    double, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    assert blocks == double[10:] + single[20:]  # 9 double, 18 single
    assert blocks_to_swap(transformer, 1) == single[36:]  # 0 double, 2 single
    assert blocks_to_swap(transformer, 38) == double[:] + single[:]
    with pytest.raises(ConfigError, match=r"training.blocks_to_swap=39: swaps 19 double and 40 single blocks, but "
                                          r"this transformer has 19 and 38; use at most 38"):
        blocks_to_swap(transformer, 39)
    # Every Linear of the chosen blocks is streamed, each once.
    layers = streamed_layers(blocks)
    assert len(layers) == len({id(layer) for layer in layers}) == sum(
        isinstance(m, nn.Linear) for block in blocks for m in block.modules())


@pytest.mark.parametrize("fp8", [False, True])
def test_a_streamed_layer_computes_what_the_layer_computes(fp8):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if fp8 else torch.float32
    plain, streamed = nn.Linear(16, 24).to(dtype), nn.Linear(16, 24).to(dtype)
    streamed.load_state_dict(plain.state_dict())
    for layer in (plain, streamed):
        layer.requires_grad_(False)
        if fp8:
            store_weights_in_fp8(layer, dtype)
    assert stream([streamed], torch.device("cpu")) == 16 * 24 * (1 if fp8 else 4)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    out_plain = plain(x)
    grad = torch.randn_like(out_plain)
    (dx_plain,) = torch.autograd.grad(out_plain, x, grad)
    out = streamed(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    # The same F.linear forward; the backward is grad @ W as autograd's linear backward computes it.
    assert torch.equal(out, out_plain)
    torch.testing.assert_close(dx, dx_plain, rtol=0, atol=1e-6 if not fp8 else 1e-2)
    with torch.no_grad():  # sampling and validation: no graph
        assert torch.equal(streamed(x), out_plain)


def test_a_trained_layer_is_not_streamed():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="must be frozen"):
        stream([layer], torch.device("cpu"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_run_streams_each_weight_per_pass_and_trains_the_same_lora(tmp_path, monkeypatch, checkpointing):
    fetched: list[tuple[int, str]] = []  # (layer, "forward" / "backward")
    fetch, forward, backward = block_swap.fetch_weight, StreamedLinear.forward, StreamedLinear.backward
    phase = ["none"]

    def counting_fetch(layer, device):
        fetched.append((id(layer), phase[0]))
        return fetch(layer, device)

    def in_phase(name, method):
        def run(*args):
            phase[0] = name
            try:
                return method(*args)
            finally:
                phase[0] = "none"

        return staticmethod(run)

    monkeypatch.setattr(block_swap, "fetch_weight", counting_fetch)
    monkeypatch.setattr(StreamedLinear, "forward", in_phase("forward", forward))
    monkeypatch.setattr(StreamedLinear, "backward", in_phase("backward", backward))
    memory = ("training.gradient_checkpointing=true",) if checkpointing else ()
    # SGD: updates proportional to the gradients, so a difference would show in the weights.
    steps = 2
    sgd = ("optimizer=sgd_nesterov", "optimizer.learning_rate=0.1", f"training.max_train_steps={steps}",
           "network.train_unet_only=true", *memory)  # fmt: skip
    swapped = train_flux(tmp_path, *sgd, "training.blocks_to_swap=2", name="swapped")
    transformer = swapped.base.unet
    blocks = [transformer.transformer_blocks[1], *transformer.single_transformer_blocks[1:]]
    layers = streamed_layers(blocks_to_swap(transformer, 2))
    assert layers == streamed_layers(blocks)  # tiny-flux: the last double block, the last two single ones
    assert {layer for layer, _ in fetched} == {id(layer) for layer in layers}  # no other layer is streamed
    assert {name for _, name in fetched} == {"forward", "backward"}  # always through StreamedLinear
    forwards = {id(layer): fetched.count((id(layer), "forward")) for layer in layers}
    backwards = {id(layer): fetched.count((id(layer), "backward")) for layer in layers}
    # Every step fetches each weight for its forward (again for the recompute with checkpointing),
    # and for its backward when its input needs a gradient: all but the norms' modulation Linears,
    # which read the timestep embedding.
    assert set(forwards.values()) == {steps * (2 if checkpointing else 1)}
    assert set(backwards.values()) == {0, steps}
    needs_grad = [layer for block in blocks for name, layer in block.named_modules()
                  if isinstance(layer, nn.Linear) and not name.startswith("norm")]  # fmt: skip
    assert needs_grad and all(backwards[id(layer)] == steps for layer in needs_grad)

    monkeypatch.undo()
    plain = train_flux(tmp_path, *sgd, name="plain")
    assert [r["loss/step"] for r in steps_logged(tmp_path / "swapped")] == \
        pytest.approx([r["loss/step"] for r in steps_logged(tmp_path / "plain")], rel=1e-6)
    a, b = swapped.network.state_dict(), plain.network.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # the same weights, to float32 rounding of the input gradients' sums
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert final_lora(tmp_path / "swapped").is_file()


def test_blocks_to_swap_is_refused_where_it_does_not_apply(tmp_path):
    with pytest.raises(ConfigError, match=r"training.blocks_to_swap=4: a FLUX.1 option \(flux_train_network.py's\); SD1"):
        make_cfg("training.blocks_to_swap=4")
    with pytest.raises(ConfigError, match=r"'training.blocks_to_swap' must be at least 1, got 0"):
        make_cfg("model=tiny_flux", "training.blocks_to_swap=0")
    # tiny-flux has 2 double and 3 single blocks: 3 would need 4 single blocks.
    with pytest.raises(ConfigError, match=r"training.blocks_to_swap=3: swaps 1 double and 4 single blocks.*at most 2"):
        train_flux(tmp_path, "training.max_train_steps=1", "training.blocks_to_swap=3")


def test_fp8_storage_streams_the_fp8_bytes(tmp_path):
    trainer = train_flux(tmp_path, "training.max_train_steps=2", "training.mixed_precision=bf16", "training.fp8_base=true",
                         "training.blocks_to_swap=1", "network.train_unet_only=true")  # fmt: skip
    layers = streamed_layers(blocks_to_swap(trainer.base.unet, 1))
    assert {layer.parametrizations.weight.original0.dtype for layer in layers} == {torch.float8_e4m3fn}
    assert {block_swap.fetch_weight(layer, torch.device("cpu")).dtype for layer in layers} == {torch.bfloat16}
    losses = [row["loss/step"] for row in steps_logged(tmp_path / "run")]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
