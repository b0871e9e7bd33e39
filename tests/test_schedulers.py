"""Learning-rate schedules: each curve has the shape its name promises; the plot; bad keys."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from atelier.config.schema import SchedulerConfig
from atelier.optim.lr_plot import _render_png, plot_lr_schedule
from atelier.config.schema.scheduler import parse_step_rules
from atelier.optim.schedulers import ScheduleSteps, lr_curve, lr_scheduler_from_config

LR = 1e-3


def config(kind: str, **keys) -> SchedulerConfig:
    return OmegaConf.structured(SchedulerConfig(type=kind, **keys))


def curve(kind: str, total: int = 100, **keys) -> list[float]:
    return lr_curve(config(kind, **keys), [LR], ScheduleSteps.of(config(kind, **keys), total))[0]


def lr_after(kind: str, total: int, **keys) -> float:
    """The lr once all `total` steps are taken (the end point of the schedule)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = lr_scheduler_from_config(config(kind, **keys), optimizer, ScheduleSteps.of(config(kind, **keys), total))
    for _ in range(total):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def test_cosine_with_min_lr_falls_to_min_lr_ratio():
    lrs = curve("cosine_with_min_lr", min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(LR)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) > 0.1 * LR
    assert lr_after("cosine_with_min_lr", 100, min_lr_ratio=0.1) == pytest.approx(0.1 * LR)


def test_warmup_stable_decay_rises_stays_flat_then_decays():
    lrs = curve("warmup_stable_decay", warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.05)
    warmup, stable, decay = lrs[:10], lrs[10:80], lrs[80:]
    assert all(a < b for a, b in zip(warmup, warmup[1:])) and warmup[-1] < LR
    assert stable == [pytest.approx(LR)] * 70
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_after("warmup_stable_decay", 100, warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.05) == (
        pytest.approx(0.05 * LR)
    )


def test_piecewise_constant_steps_at_the_given_points():
    lrs = curve("piecewise_constant", total=40, step_rules="1:10,0.5:25,0.1")
    assert lrs[:10] == [LR] * 10
    assert lrs[10:25] == [pytest.approx(0.5 * LR)] * 15
    assert lrs[25:] == [pytest.approx(0.1 * LR)] * 15
    assert parse_step_rules("1:10,0.5:25,0.1") == ([(1.0, 10), (0.5, 25)], 0.1)


def test_inverse_sqrt_decays_as_one_over_root_step_after_warmup():
    warmup, timescale = 10, 40
    lrs = curve("inverse_sqrt", warmup_steps=warmup, timescale=timescale)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    # Step s (0-based) >= warmup: lr = LR / sqrt((s + timescale - warmup) / timescale).
    for s in range(warmup, 100):
        assert lrs[s] == pytest.approx(LR / math.sqrt((s + timescale - warmup) / timescale))


def test_existing_schedules_still_follow_diffusers():
    assert curve("constant") == [LR] * 100
    cosine = curve("cosine")
    assert cosine[0] == LR and cosine[50] == pytest.approx(LR / 2) and cosine[-1] < 0.01 * LR
    assert lr_curve(config("linear"), [LR, 2 * LR], ScheduleSteps.of(config("linear"), 10))[1][0] == 2 * LR  # one curve per param group


@pytest.mark.parametrize(
    "kind,keys,message",
    [
        ("cosine", {"min_lr_ratio": 0.1}, "scheduler.min_lr_ratio=0.1 is only read by cosine_with_min_lr"),
        ("linear", {"step_rules": "1:5,0.1"}, "scheduler.step_rules=1:5,0.1 is only read by piecewise_constant"),
        ("cosine_with_min_lr", {}, "needs scheduler.min_lr_ratio"),
        ("warmup_stable_decay", {}, "set scheduler.decay_ratio"),
        ("piecewise_constant", {}, "needs scheduler.step_rules"),
        ("piecewise_constant", {"step_rules": "1:5,0.1", "warmup_steps": 3}, "has no warmup"),
        ("piecewise_constant", {"step_rules": "1:20,0.5:10,0.1"}, "increasing"),
        ("piecewise_constant", {"step_rules": "half:10,0.1"}, "is not 'mult:step,...,mult'"),
    ],
)
def test_bad_scheduler_keys_are_named(kind, keys, message):
    with pytest.raises(ValueError, match=message):
        curve(kind, **keys)


def test_lr_schedule_plot_is_a_png(tmp_path):
    curves = {"unet": curve("warmup_stable_decay", decay_ratio=0.3), "text_encoder": curve("cosine")}
    path = plot_lr_schedule(curves, tmp_path / "lr_schedule.png", "warmup_stable_decay", note="a note")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 400)
    assert [p.name for p in tmp_path.iterdir()] == ["lr_schedule.png"]  # no temp file left


def test_a_schedule_planned_again_is_drawn_once(tmp_path):
    curves = {"unet": curve("cosine")}
    first = plot_lr_schedule(curves, tmp_path / "a.png", "cosine")
    drawn = _render_png.cache_info().misses
    second = plot_lr_schedule(curves, tmp_path / "b.png", "cosine")
    assert _render_png.cache_info().misses == drawn  # the next job of a sweep: the same PNG again
    assert second.read_bytes() == first.read_bytes()
    other = plot_lr_schedule({"unet": curve("linear")}, tmp_path / "c.png", "cosine")
    assert _render_png.cache_info().misses == drawn + 1 and other.read_bytes() != first.read_bytes()


def test_explicit_steps_win_over_a_presets_ratio():
    """[14]: the presets set a ratio, so `scheduler.warmup_steps=N` (sd-scripts' --lr_warmup_steps)
    used to fail with "set warmup_steps or warmup_ratio, not both"; the steps now win."""
    from atelier.optim.schedulers import decay_steps, warmup_steps

    assert warmup_steps(100, 7, 0.05) == 7
    assert decay_steps(100, 5, 0.2) == 5
    assert warmup_steps(100, 0, 0.05) == 5  # no steps given: the ratio
