"""Fused training (atelier.fused): K LoRA configs in one pass equal the same configs trained alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.fused.grouping import FusedGroupError, check_group
from atelier.fused.slots import BatchedLoRA, LaneRouter, Slot
from atelier.fused.trainer import FusedTrainer, run_fused
from atelier.loop.loop import TrainingLoop
from atelier.network.lora import LoRAModule
from atelier.network.lora_file import load_lora
from tests.test_trainer import fresh_accelerate_state, make_cfg, train  # noqa: F401  (fixture)

# Float tolerance: a fused base layer multiplies a 3x taller matrix than a solo run's, so
# BLAS may block / accumulate the dot products in another order (fp32 rounding, ~1e-7
# relative per op), and the gradients differ by that much. Adam divides by sqrt(v): in
# its first steps a weight moves by ~lr * g / |g|, so for components with |g| near eps a
# rounding-sized gradient change can move the weight by a visible fraction of lr. Measured
# after 3 steps: largest gap 2.4e-6 (AdamW, lr 1e-3), 1.2e-6 (AdamW, lr 5e-4);
# atol 1e-5 = 1% of the largest lr keeps a 4x margin and still catches any real mixing
# of lanes (a wrong slice or a shared gradient moves weights by ~lr per step). That the
# gap is rounding and not mixing: a fused K=1 run is bitwise equal to its solo run, and an
# SGD lane (step linear in the gradient) is equal to ~2e-10 (test below, on SDXL).
# No Lion lane: its step is sign(interpolated gradient), so a rounding-sized gradient
# near zero can flip a sign and move a weight by 2 x lr (seen with 2 BLAS threads).
ATOL, RTOL = 1e-5, 1e-4

COMMON = ["network.train_unet_only=true", "training.max_train_steps=3", "sampling.limit=1"]
LANES = [
    ["optimizer=adamw", "network.dim=4", "network.alpha=2", "optimizer.learning_rate=1e-3"],
    ["optimizer=sgd_nesterov", "network.dim=8", "network.alpha=4", "optimizer.learning_rate=1e-2", "training.seed=7",
     "training.max_grad_norm=0"],
    ["optimizer=adamw", "network.dim=2", "network.alpha=1", "optimizer.learning_rate=5e-4", "training.seed=3"],
]


def solo(tmp_path, overrides, name):
    run_dir, summary = train(tmp_path, *COMMON, *overrides, name=name)
    return load_lora(run_dir / "demo.safetensors")[0], summary


def fused(tmp_path, lanes, name="fused"):
    cfgs = [make_cfg(*COMMON, *o) for o in lanes]
    dirs = [tmp_path / name / f"lane{i}" for i in range(len(lanes))]
    return cfgs, dirs


def assert_same_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    gap = 0.0
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], atol=ATOL, rtol=RTOL), (key, (a[key] - b[key]).abs().max())
        gap = max(gap, float((a[key] - b[key]).abs().max()))
    return gap


def test_dropout_is_off_in_these_configs():
    for overrides in LANES:
        net = make_cfg(*COMMON, *overrides).network
        assert not net.dropout and not net.rank_dropout and not net.module_dropout


def test_three_lanes_equal_their_solo_runs(tmp_path):
    cfgs, dirs = fused(tmp_path, LANES)
    summaries = run_fused(cfgs, dirs)
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for i, overrides in enumerate(LANES):
        expected, solo_summary = solo(tmp_path, overrides, f"solo{i}")
        got, meta = load_lora(dirs[i] / "demo.safetensors")
        gap = assert_same_weights(got, expected)
        print(f"lane {i}: largest weight gap vs solo {gap:.3g}")
        # The dims really differ, and training moved the up weights.
        dim = int(overrides[1].split("=")[1])
        assert all(v.shape[0] == dim for k, v in got.items() if k.endswith("lora_down.weight"))
        assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith("lora_up.weight"))
        # Same file format and metadata as a solo run.
        _, solo_meta = load_lora(tmp_path / f"solo{i}" / "demo.safetensors")
        for key in ("ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_seed", "ss_steps", "ss_optimizer"):
            assert meta[key] == solo_meta[key], key
        assert summaries[i]["steps"] == solo_summary["steps"] == 3
        assert summaries[i]["final_loss"] == pytest.approx(solo_summary["final_loss"], rel=1e-4)
        # Samples are drawn with this lane's LoRA alone (router.only): the solo run's images.
        fused_pngs = sorted((dirs[i] / "samples").glob("*.png"))
        solo_pngs = sorted((tmp_path / f"solo{i}" / "samples").glob("*.png"))
        assert fused_pngs and len(fused_pngs) == len(solo_pngs)  # names carry a timestamp
        for a, b in zip(fused_pngs, solo_pngs):
            pa, pb = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
            assert np.abs(pa - pb).max() <= 1, a.name  # 8-bit rounding of equal-to-rounding weights
        on_disk = json.loads((dirs[i] / "summary.json").read_text())
        assert on_disk["status"] == "completed" and on_disk["fused"] == {"lane": i, "lanes": 3, "runs": ["lane0", "lane1", "lane2"]}
        assert len([line for line in (dirs[i] / "metrics.jsonl").read_text().splitlines() if "loss/step" in line]) == 3


def test_nan_in_one_lane_stops_only_that_lane(tmp_path):
    cfgs, dirs = fused(tmp_path, LANES)
    trainer = FusedTrainer(cfgs, dirs)
    original = TrainingLoop.after_backward

    def poison_lane_1(self, lane, loss):
        original(self, lane, loss)
        if lane.index == 1 and lane.result.steps == 1:
            # A NaN weight: lane 1's rows of every later forward are NaN (in the shared UNet call).
            module = next(iter(lane.network.loras.values()))
            with torch.no_grad():
                module.lora_up.weight.fill_(float("nan"))

    trainer.loop.after_backward = poison_lane_1.__get__(trainer.loop)
    summaries = trainer.train()
    assert [s["status"] for s in summaries] == ["completed", "failed", "completed"]
    failed = json.loads((dirs[1] / "summary.json").read_text())
    assert failed["status"] == "failed" and "NonFiniteLossError" in failed["reason"] and "step 2" in failed["reason"]
    assert failed["steps"] == 1 and not (dirs[1] / "demo.safetensors").exists()
    for i in (0, 2):
        expected, _ = solo(tmp_path, LANES[i], f"solo{i}")
        assert_same_weights(load_lora(dirs[i] / "demo.safetensors")[0], expected)


def test_short_lane_leaves_and_others_still_match(tmp_path):
    lanes = [LANES[0], [*LANES[1], "training.max_train_steps=1"], LANES[2]]
    cfgs, dirs = fused(tmp_path, lanes)
    trainer = FusedTrainer(cfgs, dirs)
    summaries = trainer.train()
    assert [s["status"] for s in summaries] == ["completed"] * 3
    assert [s["steps"] for s in summaries] == [3, 1, 3]
    assert trainer.fused_steps == 3
    for i in range(3):
        expected, _ = solo(tmp_path, lanes[i], f"solo{i}")
        assert_same_weights(load_lora(dirs[i] / "demo.safetensors")[0], expected)


def test_group_rule_rejects_what_cannot_share_a_batch():
    base = make_cfg(*COMMON)
    with pytest.raises(FusedGroupError, match="train_batch_size differs"):
        check_group([base, make_cfg(*COMMON, "training.train_batch_size=4")])
    with pytest.raises(FusedGroupError, match="train_unet_only must be true"):
        check_group([make_cfg("training.max_train_steps=3")])
    with pytest.raises(FusedGroupError, match="dropouts"):
        check_group([make_cfg(*COMMON, "network.dropout=0.1")])
    check_group([base, make_cfg(*COMMON, *LANES[1])])  # lr / optimizer / dim / seed may differ


BUCKETS = ["dataset.enable_bucket=true", "dataset.min_bucket_reso=32", "dataset.max_bucket_reso=128",
           "dataset.bucket_reso_steps=16", "training.max_train_steps=8"]  # fmt: skip


# SGD's step is linear in the gradient (no Adam normalisation to amplify rounding): its
# fused weights must equal its solo run's to rounding, here < 1e-8 (measured ~2e-10).
SGD = ["optimizer=sgd_nesterov", "network.dim=4", "optimizer.learning_rate=1e-2", "training.max_grad_norm=0"]


CHECKPOINTING = "training.gradient_checkpointing=true"


@pytest.mark.parametrize(
    "lanes",
    [[[*LANES[0], *BUCKETS], [*LANES[1], *BUCKETS]], [[*SGD, "model=tiny_sdxl"], [*LANES[1], "model=tiny_sdxl"]],
     [[*SGD, CHECKPOINTING], [*LANES[1], CHECKPOINTING]],
     [[*SGD, "model=tiny_flux"], [*LANES[1], "model=tiny_flux"]]],
    ids=["buckets", "sdxl", "gradient_checkpointing", "flux"],
)
def test_bucketed_and_sdxl_lanes_equal_their_solo_runs(tmp_path, lanes):
    # SDXL with AdamW: 3 steps move 30 of 576 tensors by up to 4e-5 (Adam amplifying
    # rounding, see ATOL); two SGD lanes check the SDXL path (pooled text, time ids) tightly.
    # Gradient checkpointing recomputes the forward in the backward: the rows must be
    # routed as in the forward (the backward runs inside the router's fused context).
    # FLUX: a fused BFL layer's module is routed part by part (slots.FusedPart), the T5 and
    # CLIP-L conditioning (FluxText) concatenated, one transformer call for both lanes.
    bucketed = "dataset.enable_bucket=true" in lanes[0]
    cfgs, dirs = fused(tmp_path, lanes)
    trainer = FusedTrainer(cfgs, dirs)
    groups = []
    forward_backward = trainer.loop.forward_backward
    trainer.loop.forward_backward = lambda group: groups.append(len(group)) or forward_backward(group)
    assert [s["status"] for s in trainer.train()] == ["completed"] * 2
    if bucketed:  # lanes drew batches of other buckets: run as separate UNet calls
        assert 1 in groups
    else:
        assert groups == [2, 2, 2]  # SDXL: text + pooled + time ids concatenated; FLUX: FluxText
    for i in range(2):
        expected, _ = solo(tmp_path, lanes[i], f"solo{i}")
        got = load_lora(dirs[i] / "demo.safetensors")[0]
        gap = assert_same_weights(got, expected)
        if lanes[i][0] == "optimizer=sgd_nesterov":
            assert gap < 1e-8, gap


# ----------------------------------------------------------------- batched lanes
def _lanes_on(base: torch.nn.Module, rank: int, alphas: list[float], **options) -> list[LoRAModule]:
    torch.manual_seed(0)
    modules = []
    for i, alpha in enumerate(alphas):
        module = LoRAModule(f"lane{i}", base, rank, alpha, **options)
        torch.nn.init.normal_(module.lora_up.weight)  # a trained-looking (non-zero) update
        module.multiplier = 1.0 - 0.25 * i
        modules.append(module)
    return modules


@pytest.mark.parametrize("layer", ["linear", "conv1x1"])
def test_lanes_of_one_rank_run_batched_and_equal_each_module_alone(layer, monkeypatch):
    """One base layer, three lanes of one rank: BatchedLoRA's output and gradients equal
    each lane's own module run on its rows. Float32 rounding only (bmm may sum in another
    order than the solo matmul): measured gap ~1e-7 on O(1) values, tolerance 1e-5."""
    base = torch.nn.Linear(12, 10) if layer == "linear" else torch.nn.Conv2d(12, 10, 1)
    base.requires_grad_(False)
    x = torch.randn(3, 5, 12) if layer == "linear" else torch.randn(3, 12, 4, 4)
    lanes = _lanes_on(base, rank=4, alphas=[1.0, 2.0, 4.0])
    calls = []
    batched_forward = BatchedLoRA.forward
    monkeypatch.setattr(BatchedLoRA, "forward", lambda self, *a: calls.append(len(a[0])) or batched_forward(self, *a))

    router = LaneRouter()
    slot = Slot(base, router, num_lanes=3)
    slot.lanes[:] = lanes
    slot.apply_to()
    with router.fused([(0, 1), (1, 1), (2, 1)]):
        fused_out = base(x)
    fused_out.square().sum().backward()
    fused_grads = [(m.lora_down.weight.grad.clone(), m.lora_up.weight.grad.clone()) for m in lanes]
    slot.restore()
    assert calls == [3]

    for i, module in enumerate(lanes):
        module.zero_grad()
        module.apply_to()
        alone = base(x[i : i + 1])
        alone.square().sum().backward()
        module.restore()
        assert torch.allclose(fused_out[i : i + 1], alone, atol=1e-5), (i, (fused_out[i : i + 1] - alone).abs().max())
        assert torch.allclose(fused_grads[i][0], module.lora_down.weight.grad, atol=1e-5, rtol=1e-5)
        assert torch.allclose(fused_grads[i][1], module.lora_up.weight.grad, atol=1e-5, rtol=1e-5)


def test_lanes_that_differ_or_draw_at_random_run_one_by_one():
    linear, conv3 = torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 8, 3, padding=1)
    (a,) = _lanes_on(linear, 4, [1.0])
    (b,) = _lanes_on(linear, 2, [1.0])
    (dropping,) = _lanes_on(linear, 4, [1.0], dropout=0.1)
    (c3,) = _lanes_on(conv3, 4, [1.0])
    (c1,) = _lanes_on(torch.nn.Conv2d(8, 8, 1), 4, [1.0])
    assert BatchedLoRA.key(a, 1) is not None
    assert BatchedLoRA.key(a, 1) != BatchedLoRA.key(b, 1)  # another rank
    assert BatchedLoRA.key(a, 1) != BatchedLoRA.key(a, 2)  # another share of rows
    assert BatchedLoRA.key(dropping, 1) is None  # a random draw per lane
    with torch.no_grad():  # outside a training step the dropout does not act
        assert BatchedLoRA.key(dropping, 1) is not None
    assert BatchedLoRA.key(c3, 1) is None and BatchedLoRA.key(c1, 1) is not None and BatchedLoRA.key(c1, 2) is None
    assert BatchedLoRA.key(None, 1) is None


ONE_RANK = [["optimizer=sgd_nesterov", "network.dim=4", f"optimizer.learning_rate={lr}", f"training.seed={seed}",
             "training.max_grad_norm=0"] for lr, seed in ((1e-2, 1), (3e-2, 2), (5e-3, 3))]  # fmt: skip


def test_lanes_of_one_rank_train_batched_to_their_solo_weights(tmp_path, monkeypatch):
    """The batched path in a real fused run: SGD lanes (step linear in the gradient, see SGD
    above) equal their solo runs to rounding."""
    calls = []
    batched_forward = BatchedLoRA.forward
    monkeypatch.setattr(BatchedLoRA, "forward", lambda self, *a: calls.append(len(a[0])) or batched_forward(self, *a))
    cfgs, dirs = fused(tmp_path, ONE_RANK)
    assert [s["status"] for s in run_fused(cfgs, dirs)] == ["completed"] * 3
    assert calls and set(calls) == {3}
    for i, overrides in enumerate(ONE_RANK):
        expected, _ = solo(tmp_path, overrides, f"solo{i}")
        gap = assert_same_weights(load_lora(dirs[i] / "demo.safetensors")[0], expected)
        print(f"lane {i}: largest weight gap vs solo {gap:.3g}")
        assert gap < 1e-8, gap
