"""Optimizers: each type builds and steps; adaptive ones report d*lr; schedule-free modes; lr finder."""

from __future__ import annotations

import json

import pytest
import torch

from atelier.config.schema import OptimizerType
from atelier.config.schema.optimizer import check_can_suggest, check_schedule_fits
from atelier.loop.lr_find import (
    SUGGESTION_FILE,
    LrFindError,
    read_effective_lrs,
    suggest_and_report,
)
from atelier.optim.optimizers import (
    build_optimizer,
    effective_learning_rates,
    eval_weights,
    has_train_eval_modes,
)
from tests.test_trainer import make_cfg, steps_logged, train

# Arguments that make each optimizer take a plain step on a tiny problem.
STEP_ARGS = {
    OptimizerType.AdamW: (1e-2, {}),
    OptimizerType.AdamW8bit: (1e-2, {}),
    OptimizerType.Lion: (1e-3, {}),
    OptimizerType.Lion8bit: (1e-3, {}),
    OptimizerType.SGDNesterov: (1e-2, {}),
    OptimizerType.Prodigy: (1.0, {}),
    OptimizerType.DAdaptAdam: (1.0, {"decouple": True, "use_bias_correction": True}),
    OptimizerType.Adafactor: (1e-2, {"relative_step": False, "scale_parameter": False}),
    OptimizerType.AdamWScheduleFree: (1e-2, {}),
}


def groups(lr: float = 1e-3) -> list[dict]:
    torch.manual_seed(0)
    # 64x64 = 4096 elements: big enough for bitsandbytes' 8-bit state.
    return [{"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": lr},
            {"params": [torch.nn.Parameter(torch.randn(8))], "lr": lr}]  # fmt: skip


def take_step(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = p.detach().clone()  # gradient of 0.5 * |p|^2
    optimizer.step()


@pytest.mark.parametrize("kind", list(OptimizerType))
def test_every_optimizer_builds_and_takes_a_step(kind):
    assert set(STEP_ARGS) == set(OptimizerType)
    lr, args = STEP_ARGS[kind]
    optimizer = build_optimizer(kind, groups(lr), lr, args)
    if has_train_eval_modes(optimizer):
        optimizer.train()  # schedule-free refuses to step otherwise
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    take_step(optimizer)
    after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    assert all(torch.isfinite(a).all() for a in after)
    assert all(not torch.equal(b, a) for b, a in zip(before, after))


def test_sgd_nesterov_is_sgd_with_nesterov_momentum():
    optimizer = build_optimizer("SGDNesterov", groups(), 0.1, {})
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="SGDNesterov always uses nesterov=True"):
        build_optimizer("SGDNesterov", groups(), 0.1, {"nesterov": False})


def test_effective_lr_is_d_times_lr_for_prodigy_and_the_relative_step_for_adafactor():
    prodigy = build_optimizer("Prodigy", groups(1.0), 1.0, {})
    take_step(prodigy)
    assert effective_learning_rates(prodigy) == [g["d"] * g["lr"] for g in prodigy.param_groups]
    adafactor = build_optimizer("Adafactor", groups(), 1e-3, {"scale_parameter": False})  # relative_step
    assert effective_learning_rates(adafactor) is None  # no step taken yet
    take_step(adafactor)
    assert effective_learning_rates(adafactor) == [pytest.approx(1e-2)] * 2  # min(1e-2, 1/sqrt(1))
    assert effective_learning_rates(build_optimizer("AdamW", groups(), 1e-3, {})) is None


def test_schedule_free_eval_weights_differ_inside_the_block_only():
    optimizer = build_optimizer("AdamWScheduleFree", groups(1e-1), 1e-1, {})
    optimizer.train()
    for _ in range(3):
        take_step(optimizer)
    param = optimizer.param_groups[0]["params"][0]
    train_weights = param.detach().clone()
    with eval_weights(optimizer):
        assert not torch.allclose(param, train_weights, atol=1e-3)
    # Back to the training weights (eval()/train() interpolate, so up to rounding).
    assert torch.allclose(param, train_weights, atol=1e-6, rtol=0)
    assert optimizer.param_groups[0]["train_mode"]
    with pytest.raises(ValueError, match="scheduler=constant"):
        check_schedule_fits("AdamWScheduleFree", "cosine", 0)
    check_schedule_fits("AdamW", "cosine", 10)


def test_prodigy_logs_d_lr_and_lr_find_suggests_the_settled_value(tmp_path, capsys):
    run_dir, summary = train(tmp_path, "optimizer=prodigy", "training.max_train_steps=8", "training.suggest_lr=true")
    steps = steps_logged(run_dir)
    assert all("lr/d*lr/unet" in s and "lr/d*lr/text_encoder" in s for s in steps)
    unet = [s["lr/d*lr/unet"] for s in steps]
    assert all(v > 0 for v in unet)
    suggestion = json.loads((run_dir / SUGGESTION_FILE).read_text())
    # Median of the last quarter (2 of 8 steps) of the logged d*lr.
    assert suggestion["unet_lr"] == pytest.approx(sum(unet[-2:]) / 2)
    assert suggestion["learning_rate"] == suggestion["unet_lr"] == summary["lr_suggestion"]
    assert suggestion["source_optimizer"] == "Prodigy"
    assert f"optimizer.learning_rate={suggestion['learning_rate']:.3g}" in suggestion["overrides"]
    assert "lr finder: suggested AdamW learning rate" in capsys.readouterr().out
    assert (run_dir / "lr_schedule.png").stat().st_size > 0  # drawn at the start of training


def test_lr_find_reads_the_tail_of_the_metrics(tmp_path):
    values = [1e-6, 1e-5, 1e-4, 2e-4, 3e-4, 3e-4, 3.1e-4, 3e-4]
    lines = [json.dumps({"step": i + 1, "loss/step": 0.1, "lr/d*lr/unet": v}) for i, v in enumerate(values)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"step": 8, "loss/epoch": 0.1})]) + "\n")
    assert read_effective_lrs(tmp_path)["unet"][-1] == (8, 3e-4)
    suggestion = suggest_and_report(tmp_path, "Prodigy")
    assert suggestion["learning_rate"] == pytest.approx(3.05e-4)  # median of the last 2 values
    assert suggestion["settled"] and suggestion["text_encoder_lr"] is None
    growing = [json.dumps({"step": i + 1, "lr/d*lr/unet": 1e-5 * 2**i}) for i in range(8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(growing) + "\n")
    assert not suggest_and_report(tmp_path)["settled"]


def test_lr_find_needs_an_adaptive_optimizer(tmp_path):
    with pytest.raises(LrFindError, match="optimizer=prodigy"):
        check_can_suggest(OptimizerType.AdamW, {})
    check_can_suggest("Adafactor", {"relative_step": True})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "lr/unet": 1e-4}) + "\n")
    with pytest.raises(LrFindError, match="no lr/d\\*lr/"):
        suggest_and_report(tmp_path)


def test_schedule_free_run_saves_the_eval_weights(tmp_path):
    from atelier.loop.trainer import Trainer
    from atelier.network.lora_file import load_lora

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(make_cfg("optimizer=adamw_schedulefree", "optimizer.args.warmup_steps=0",
                               "training.max_train_steps=3"), run_dir)  # fmt: skip
    trainer.train()
    saved, _ = load_lora(run_dir / "demo.safetensors")
    assert trainer.optimizer.param_groups[0]["train_mode"]  # back in train mode after saving
    train_mode = {k: v.clone() for k, v in trainer.network.kohya_state_dict().items()}
    trainer.optimizer.eval()
    eval_mode = {k: v.clone() for k, v in trainer.network.kohya_state_dict().items()}
    ups = [k for k in saved if k.endswith("lora_up.weight")]
    to_eval = max((saved[k] - eval_mode[k]).abs().max().item() for k in ups)
    to_train = max((saved[k] - train_mode[k]).abs().max().item() for k in ups)
    # Equal up to the rounding of eval()/train() switches; far from the train-mode weights.
    assert to_eval < 1e-7 and to_train > 1e-6


def test_schedule_free_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from atelier.network.lora_file import load_lora
    from atelier.loop.run import run_training
    from tests.test_trainer import interrupt_after_epoch

    args = ["optimizer=adamw_schedulefree", "training.max_train_epochs=2", "training.train_batch_size=8",
            "output.save_every_n_epochs=null"]  # fmt: skip
    full, _ = train(tmp_path, *args, name="full")
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, *args, name="interrupted")
    monkeypatch.undo()
    run_dir = tmp_path / "interrupted"
    run_training(make_cfg(*args), run_dir)  # the saved state holds the train-mode weights
    a, b = load_lora(full / "demo.safetensors")[0], load_lora(run_dir / "demo.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
