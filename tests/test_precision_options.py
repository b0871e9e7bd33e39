"""sd-scripts' precision and memory options: full_bf16 / full_fp16 (the network itself in the
autocast dtype), fp16 loss scaling around our optimizer step, and vae_batch_size."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from atelier.errors import UserError
from atelier.fused.grouping import lane_problems
from atelier.loop.adapter import Adapter
from atelier.optim.loss_scaling import FullFp16GradScaler, optimizer_step, unscale_gradients
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)

SHORT = ["training.max_train_steps=2", "network.train_unet_only=true"]


# --- full_bf16 / full_fp16 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.full_bf16=true"], r"training.full_bf16 keeps the network in bf16: it needs "
                                      r"training.mixed_precision=bf16 \(got no\)"),
        (["training.full_fp16=true", "training.mixed_precision=bf16"],
         r"training.full_fp16 .* needs training.mixed_precision=fp16 \(got bf16\)"),
    ],
)  # fmt: skip
def test_full_precision_needs_its_mixed_precision(overrides, message):
    with pytest.raises(UserError, match=message):
        make_cfg(*overrides)


def test_full_bf16_trains_the_network_in_bf16_and_saves_float32(tmp_path):
    cfg = make_cfg(*SHORT, "training.mixed_precision=bf16", "training.full_bf16=true")
    adapter = Adapter(cfg, tmp_path / "probe")
    adapter.setup()
    params = list(adapter.network.parameters())
    assert params and {p.dtype for p in params} == {torch.bfloat16}
    # The optimizer holds the same (bf16) tensors, so its state is bf16 too.
    assert {id(p) for group in adapter.optimizer.param_groups for p in group["params"]} == {id(p) for p in params}

    full, _ = train(tmp_path, *SHORT, "training.mixed_precision=bf16", "training.full_bf16=true", name="full")
    mixed, _ = train(tmp_path, *SHORT, "training.mixed_precision=bf16", name="mixed")
    with safe_open(str(full / "demo.safetensors"), "pt") as f, safe_open(str(mixed / "demo.safetensors"), "pt") as g:
        ups = [k for k in f.keys() if k.endswith("lora_up.weight")]
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # output.save_precision=float
        full_up, mixed_up = (torch.cat([h.get_tensor(k).flatten() for k in ups]) for h in (f, g))
        assert "ss_full_fp16" not in f.metadata()  # sd-scripts writes no ss_full_bf16; full_fp16 only when on
    assert full_up.abs().sum() > 0  # it learned
    # bf16 weights: every value is a bf16 number; the mixed-precision run's float32 ones are not.
    assert torch.equal(full_up, full_up.bfloat16().float())
    assert not torch.equal(mixed_up, mixed_up.bfloat16().float())


def test_full_bf16_runs_are_not_fused_lanes():
    cfg = make_cfg("training.mixed_precision=bf16", "training.full_bf16=true")
    assert "training.full_bf16 is not fused (lanes keep float32 weights)" in lane_problems(cfg)


# --- fp16 loss scaling around our optimizer step ------------------------------------------


def scaled_gradients(dtype: torch.dtype, scaler: torch.amp.GradScaler, inf: bool = False):
    """A parameter whose loss went through scaler.scale(...).backward(), and its SGD optimizer."""
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=dtype))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    loss = (weight.float() * torch.tensor([3.0, float("inf") if inf else 4.0])).sum()
    scaler.scale(loss).backward()
    return weight, optimizer


def test_the_step_unscales_before_clipping_and_updates_with_the_true_gradient():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weight, optimizer = scaled_gradients(torch.float32, scaler)
    assert weight.grad.tolist() == [3.0 * 2**10, 4.0 * 2**10]  # what accelerator.backward leaves
    unscale_gradients(scaler, optimizer)
    assert weight.grad.tolist() == [3.0, 4.0]  # clipping now sees the true norm (5)
    optimizer_step(scaler, optimizer)
    assert weight.tolist() == [1.0 - 0.5 * 3.0, -2.0 - 0.5 * 4.0]
    assert scaler.get_scale() == 2.0**10  # no overflow: the scale stays (it grows after 2000 good steps)


def test_an_overflowing_step_is_skipped_and_the_scale_drops():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weight, optimizer = scaled_gradients(torch.float32, scaler, inf=True)
    unscale_gradients(scaler, optimizer)
    optimizer_step(scaler, optimizer)
    assert weight.tolist() == [1.0, -2.0] and scaler.get_scale() == 2.0**9


def test_full_fp16_gradients_are_unscaled_where_torch_refuses_them():
    weight, optimizer = scaled_gradients(torch.float16, plain := torch.amp.GradScaler("cpu", init_scale=2.0**4))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        plain.unscale_(optimizer)  # why full_fp16 needs its own scaler (sd-scripts patches accelerate's)
    scaler = FullFp16GradScaler("cpu", init_scale=2.0**4)
    weight, optimizer = scaled_gradients(torch.float16, scaler)
    unscale_gradients(scaler, optimizer)
    assert weight.grad.dtype == torch.float16 and weight.grad.tolist() == [3.0, 4.0]
    optimizer_step(scaler, optimizer)
    assert weight.tolist() == [-0.5, -4.0]


def test_without_a_scaler_the_step_is_the_plain_one():
    weight = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    (weight * 2).sum().backward()
    unscale_gradients(None, optimizer)
    optimizer_step(None, optimizer)
    assert weight.tolist() == [0.0]


# --- dataset.vae_batch_size ---------------------------------------------------------------


def test_vae_batch_size_sets_the_images_per_vae_call(tmp_path, monkeypatch):
    from atelier.data.latents import PixelJob, StepEncoder
    from tests.test_dataset_pipeline import make_images

    cfg = make_cfg(*SHORT, "dataset.vae_batch_size=3")
    adapter = Adapter(cfg, tmp_path / "probe")
    adapter.setup()
    assert adapter.data.latent_cache.batch_size == 3  # the cache encodes 3 images per call
    vae = adapter.base.vae

    root = make_images(tmp_path, "1_x", [(64, 64)] * 5)
    paths = [root / "1_x" / f"img{i}.png" for i in range(5)]
    calls: list[int] = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: calls.append(len(pixels)) or encode(pixels))
    job = PixelJob(tuple(paths), ((64, 64),) * 5, (False,) * 5, tuple(range(5)))
    latents = {}
    for size in (2, 5):
        encoder = StepEncoder(vae, paths, torch.device("cpu"), random_crop=False, color_aug=False,
                              vae_batch_size=size)  # fmt: skip
        calls.clear()
        (latents[size],) = encoder.encode([job], [list(range(5))])
        assert calls == ([2, 2, 1] if size == 2 else [5])
    # The same latents however they are split (each image keeps its own posterior noise).
    torch.testing.assert_close(latents[2], latents[5], rtol=1e-5, atol=1e-5)


def test_vae_batch_size_below_one_is_refused():
    with pytest.raises(UserError, match="dataset.vae_batch_size must be at least 1, got 0"):
        make_cfg("dataset.vae_batch_size=0")


# --- fp8_base / fp8_base_unet ----------------------------------------------------------


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers as stored (fp8 originals counted as such)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_fp8_base_stores_the_frozen_weights_in_fp8_and_trains(tmp_path):
    from torch import nn

    from atelier.models.fp8_storage import FP8

    plain = Adapter(make_cfg(*SHORT, "training.mixed_precision=bf16"), tmp_path / "plain")
    plain.setup()
    cfg = make_cfg(*SHORT, "training.mixed_precision=bf16", "training.fp8_base=true")
    adapter = Adapter(cfg, tmp_path / "probe")
    adapter.setup()
    unet, encoder = adapter.base.unet, adapter.base.text_encoder
    for model in (unet, encoder):  # fp8_base: the UNet and the text encoder
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers and all(m.parametrizations.weight.original0.dtype == FP8 for m in layers)
        assert all(m.weight.dtype == torch.bfloat16 for m in layers)  # used in the autocast dtype
    # The LoRA wraps fp8-stored layers and trains in float32 as usual.
    assert {p.dtype for p in adapter.network.parameters()} == {torch.float32}
    assert stored_bytes(unet) < 0.6 * stored_bytes(plain.base.unet)  # most of a UNet is Linear/Conv weights

    run_dir, summary = train(tmp_path, *SHORT, "training.mixed_precision=bf16", "training.fp8_base=true", name="fp8")
    with safe_open(str(run_dir / "demo.safetensors"), "pt") as f:
        up = torch.cat([f.get_tensor(k).flatten() for k in f.keys() if k.endswith("lora_up.weight")])
        assert f.metadata()["ss_fp8_base"] == "True" and "ss_fp8_base_unet" not in f.metadata()
    assert up.abs().sum() > 0 and torch.isfinite(up).all()


def test_fp8_base_unet_leaves_the_text_encoder_alone(tmp_path):
    from torch import nn

    cfg = make_cfg(*SHORT, "training.mixed_precision=bf16", "training.fp8_base=true", "training.fp8_base_unet=true")
    adapter = Adapter(cfg, tmp_path / "probe")
    adapter.setup()
    assert any(isinstance(m, nn.Linear) and hasattr(m, "parametrizations") for m in adapter.base.unet.modules())
    assert not any(hasattr(m, "parametrizations") for m in adapter.base.text_encoder.modules())


def test_fp8_base_without_mixed_precision_is_refused():
    with pytest.raises(UserError, match=r"training.fp8_base stores the base weights in fp8 .* set "
                                        r"training.mixed_precision=bf16"):  # fmt: skip
        make_cfg("training.fp8_base=true")
