"""Noise, timestep and loss options: each changes the noise or the loss as sd-scripts documents."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from atelier.config.schema.training import TrainingConfig, check_noise_options
from atelier.models.architectures import build_noise_scheduler
from atelier.objective.losses import (
    debiased_weight,
    diffusion_loss,
    elementwise_loss,
    huber_threshold,
    min_snr_weight,
    scale_v_pred_like_noise_pred_weight,
    snr,
    v_pred_like_loss_weight,
)
from atelier.objective.noise import (
    multires_noise,
    noisy_latents,
    random_strength,
    sample_noise,
    sample_timesteps,
    with_zero_terminal_snr,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return build_noise_scheduler()  # SD's scaled-linear 1000-step schedule


def neighbour_correlation(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


# ------------------------------------------------------------------------------ noise
def test_plain_noise_is_unchanged_by_the_new_options_when_off():
    latents = torch.zeros(2, 4, 8, 8)
    assert torch.equal(sample_noise(latents, gen()), torch.randn(latents.shape, generator=gen()))


def test_adaptive_noise_scale_raises_the_offset_by_the_latent_channel_mean():
    latents = torch.zeros(2, 4, 8, 8)
    latents[:, 1] = -2.0  # |channel mean| 2 in channel 1, 0 elsewhere
    offset, scale = 0.1, 0.5
    noise = sample_noise(latents, gen(), noise_offset=offset, adaptive_noise_scale=scale)
    g = gen()
    base = torch.randn(latents.shape, generator=g)
    shift = torch.randn((2, 4, 1, 1), generator=g)
    per_channel = torch.tensor([offset, offset + scale * 2.0, offset, offset]).view(1, 4, 1, 1)
    torch.testing.assert_close(noise, base + per_channel * shift)


def test_noise_offset_random_strength_draws_one_offset_per_batch_below_noise_offset():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, gen(), noise_offset=0.1, noise_offset_random_strength=True)
    g = gen()
    base = torch.randn(latents.shape, generator=g)
    strength = torch.rand((), generator=g).item() * 0.1  # drawn after the noise, as sd-scripts
    shift = torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(noise, base + strength * shift)
    assert 0 < strength < 0.1
    # Batches get other strengths; without the option the offset is always noise_offset.
    strengths = {round(random_strength(gen(seed), 0.1), 6) for seed in range(20)}
    assert len(strengths) == 20 and max(strengths) < 0.1
    fixed = sample_noise(latents, gen(), noise_offset=0.1)
    g = gen()
    torch.testing.assert_close(fixed, torch.randn(latents.shape, generator=g) + 0.1 * torch.randn((2, 4, 1, 1), generator=g))


def test_multires_noise_keeps_the_shape_has_unit_std_and_low_frequencies():
    latents = torch.zeros(4, 4, 32, 32)
    plain = sample_noise(latents, gen())
    pyramid = sample_noise(latents, gen(), multires_noise_iterations=6, multires_noise_discount=0.8)
    assert pyramid.shape == latents.shape
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(neighbour_correlation(plain)) < 0.05
    assert neighbour_correlation(pyramid) > 0.2  # the coarse levels are smooth across pixels
    # A smaller discount weights the coarse levels less.
    weak = multires_noise(plain, gen(1), 6, 0.1)
    assert neighbour_correlation(weak) < neighbour_correlation(multires_noise(plain, gen(1), 6, 0.8))


def test_ip_noise_gamma_perturbs_the_input_only(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    t = torch.tensor([100, 900])
    assert torch.equal(noisy_latents(scheduler, latents, noise, t, gen()), scheduler.add_noise(latents, noise, t))
    perturbed = noisy_latents(scheduler, latents, noise, t, gen(), ip_noise_gamma=0.1)
    extra = torch.randn(latents.shape, generator=gen())
    torch.testing.assert_close(perturbed, scheduler.add_noise(latents, noise + 0.1 * extra, t))


def test_ip_noise_gamma_random_strength_scales_the_perturbation(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    t = torch.tensor([100, 900])
    perturbed = noisy_latents(scheduler, latents, noise, t, gen(), 0.1, ip_noise_gamma_random_strength=True)
    g = gen()
    gamma = torch.rand((), generator=g).item() * 0.1  # drawn before the perturbation, as sd-scripts
    extra = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(perturbed, scheduler.add_noise(latents, noise + gamma * extra, t))
    assert not torch.allclose(perturbed, noisy_latents(scheduler, latents, noise, t, gen(), 0.1))


def test_min_and_max_timestep_bound_the_sampled_timesteps(scheduler):
    t = sample_timesteps(4000, scheduler, gen(), min_timestep=200, max_timestep=300)
    assert t.min().item() == 200 and t.max().item() == 299  # [min, max), as sd-scripts
    assert sample_timesteps(4000, scheduler, gen()).max().item() == 999
    assert sample_timesteps(3, scheduler, gen(), 500, 500).tolist() == [500] * 3
    with pytest.raises(ValueError, match="training.min_timestep=600 / training.max_timestep=500"):
        sample_timesteps(1, scheduler, gen(), 600, 500)
    with pytest.raises(ValueError, match="max_timestep <= 1000"):
        sample_timesteps(1, scheduler, gen(), None, 1001)


def test_zero_terminal_snr_rescales_to_snr_zero_at_the_last_step(scheduler):
    rescaled = with_zero_terminal_snr(scheduler)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert scheduler.alphas_cumprod[-1].item() > 0.004  # SD's schedule leaves some signal
    # First step kept, schedule still decreasing.
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(scheduler.alphas_cumprod[0].item(), rel=1e-5)
    assert bool((rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all())
    # At the last step the input is pure noise; min-SNR's eps weight takes its limit 1 there.
    last = torch.tensor([999])
    x, n = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2, generator=gen())
    torch.testing.assert_close(rescaled.add_noise(x, n, last), n)
    assert min_snr_weight(rescaled, last, 5.0).item() == 1.0


def test_option_combinations_that_cannot_work_are_named():
    base = dict(noise_offset=0.0, adaptive_noise_scale=None, multires_noise_iterations=None,
                zero_terminal_snr=False, debiased_estimation_loss=False, scale_v_pred_loss_like_noise_pred=False,
                v_pred_like_loss=None)  # fmt: skip
    with pytest.raises(ValueError, match="training.adaptive_noise_scale scales training.noise_offset"):
        check_noise_options(SimpleNamespace(**{**base, "adaptive_noise_scale": 0.1}), False)
    ztsnr = SimpleNamespace(**{**base, "zero_terminal_snr": True, "debiased_estimation_loss": True})
    with pytest.raises(ValueError, match="needs model.v_parameterization=true"):
        check_noise_options(ztsnr, False)
    check_noise_options(ztsnr, True)
    # sd-scripts' verify_training_args rules for the v-prediction loss scalings.
    scaled = SimpleNamespace(**{**base, "scale_v_pred_loss_like_noise_pred": True})
    with pytest.raises(ValueError, match="scale_v_pred_loss_like_noise_pred needs model.v_parameterization=true"):
        check_noise_options(scaled, False)
    check_noise_options(scaled, True)
    v_like = SimpleNamespace(**{**base, "v_pred_like_loss": 0.1})
    with pytest.raises(ValueError, match="with model.v_parameterization=true the loss already is one"):
        check_noise_options(v_like, True)
    check_noise_options(v_like, False)
    with pytest.raises(ValueError, match="training.v_pred_like_loss with training.zero_terminal_snr"):
        check_noise_options(SimpleNamespace(**{**base, "v_pred_like_loss": 0.1, "zero_terminal_snr": True}), False)


def test_random_strengths_need_their_value_and_v_pred_like_loss_a_positive_one():
    with pytest.raises(ValueError, match="training.noise_offset_random_strength .* set training.noise_offset"):
        TrainingConfig(noise_offset_random_strength=True)
    with pytest.raises(ValueError, match="training.ip_noise_gamma_random_strength .* set training.ip_noise_gamma"):
        TrainingConfig(ip_noise_gamma_random_strength=True)
    with pytest.raises(ValueError, match="training.v_pred_like_loss must not be negative"):
        TrainingConfig(v_pred_like_loss=-0.1)
    TrainingConfig(noise_offset=0.1, noise_offset_random_strength=True, ip_noise_gamma=0.1,
                   ip_noise_gamma_random_strength=True, v_pred_like_loss=0.1)  # fmt: skip


# ------------------------------------------------------------------------------- loss
def test_loss_types_on_known_errors():
    # float64: sqrt(d^2 + c^2) - c for tiny d is below float32's resolution.
    pred = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    target = torch.tensor([1e-4, 3.0, -100.0], dtype=torch.float64).view(3, 1, 1, 1)
    c = torch.full((3,), 0.1, dtype=torch.float64)
    d = (target - pred).flatten()
    assert torch.equal(elementwise_loss(pred, target, "l2").flatten(), d**2)
    assert torch.equal(elementwise_loss(pred, target, "l1").flatten(), d.abs())
    huber = elementwise_loss(pred, target, "huber", c).flatten()
    assert huber[0].item() == pytest.approx(d[0].item() ** 2, rel=1e-3)  # ~ l2 for |d| << c
    assert huber[2].item() == pytest.approx(2 * 0.1 * 100 - 2 * 0.1**2, rel=1e-4)  # ~ 2c|d| - 2c^2 beyond
    smooth = elementwise_loss(pred, target, "smooth_l1", c).flatten()
    assert smooth[0].item() == pytest.approx(d[0].item() ** 2 / 0.1, rel=1e-3)  # ~ d^2 / c
    assert smooth[2].item() == pytest.approx(2 * 100 - 2 * 0.1, rel=1e-4)  # ~ 2|d| - 2c
    torch.testing.assert_close(smooth * 0.1, huber)  # huber = c * smooth_l1


def test_huber_threshold_schedules(scheduler):
    t = torch.tensor([0, 500, 1000 - 1])
    torch.testing.assert_close(huber_threshold(scheduler, t, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    exponential = huber_threshold(scheduler, torch.tensor([0, 1000]), "exponential", 0.1, 2.0)
    torch.testing.assert_close(exponential, torch.tensor([2.0, 0.2]))
    abar = scheduler.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(huber_threshold(scheduler, t, "snr", 0.1), 0.9 / (1 + sigma) ** 2 + 0.1)


def test_debiased_estimation_weights_each_sample_by_snr(scheduler):
    t = torch.tensor([0, 10, 500, 999])
    s = snr(scheduler, t)
    assert s[0].item() > 1000  # capped: sd-scripts limits SNR to 1000 for this weight
    expected = 1 / torch.sqrt(torch.clamp(s, max=1000))
    torch.testing.assert_close(debiased_weight(scheduler, t), expected)
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    weighted = diffusion_loss(pred, target, scheduler, t, debiased_estimation=True)
    assert weighted.item() == pytest.approx(expected.mean().item())
    v_scheduler = build_noise_scheduler(v_parameterization=True)
    torch.testing.assert_close(debiased_weight(v_scheduler, t), 1 / (torch.clamp(s, max=1000) + 1))


def test_diffusion_loss_uses_the_loss_type_and_huber_schedule(scheduler):
    pred, target, t = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0), torch.tensor([5, 900])
    assert diffusion_loss(pred, target, scheduler, t).item() == pytest.approx(9.0)
    assert diffusion_loss(pred, target, scheduler, t, loss_type="l1").item() == pytest.approx(3.0)
    c = huber_threshold(scheduler, t, "snr", 0.1)
    expected = (2 * c * (torch.sqrt(9 + c**2) - c)).mean().item()
    assert diffusion_loss(pred, target, scheduler, t, loss_type="huber").item() == pytest.approx(expected)


def test_v_prediction_loss_scalings_weight_each_sample_as_sd_scripts(scheduler):
    t = torch.tensor([0, 10, 500, 999])
    s = torch.clamp(snr(scheduler, t), max=1000)  # sd-scripts' get_snr_scale caps SNR at 1000
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)  # per-sample loss 1
    scaled = diffusion_loss(pred, target, scheduler, t, scale_v_pred_loss_like_noise_pred=True)
    torch.testing.assert_close(scale_v_pred_like_noise_pred_weight(scheduler, t), s / (s + 1))
    assert scaled.item() == pytest.approx((s / (s + 1)).mean().item())
    # loss + loss / scale * v: large where SNR is small (late timesteps).
    weight = v_pred_like_loss_weight(scheduler, t, 0.2)
    torch.testing.assert_close(weight, 1 + 0.2 * (s + 1) / s)
    assert weight[3] > 10 * weight[1]
    added = diffusion_loss(pred, target, scheduler, t, v_pred_like_loss=0.2)
    assert added.item() == pytest.approx(weight.mean().item(), rel=1e-6)
    # Off (False / None / 0): the plain loss, bit for bit.
    plain = diffusion_loss(pred + 0.5, target, scheduler, t)
    assert torch.equal(plain, diffusion_loss(pred + 0.5, target, scheduler, t, v_pred_like_loss=0.0))


# ------------------------------------------------------------------ in training + metadata
def test_options_train_and_are_recorded_as_sd_scripts_does(tmp_path):
    from atelier.network.lora_file import load_lora
    from tests.test_trainer import train

    options = [
        "model.v_parameterization=true", "training.zero_terminal_snr=true", "training.debiased_estimation_loss=true",
        "training.noise_offset=0.05", "training.adaptive_noise_scale=0.01", "training.multires_noise_iterations=4",
        "training.multires_noise_discount=0.5", "training.ip_noise_gamma=0.1", "training.min_timestep=100",
        "training.max_timestep=900", "training.loss_type=huber", "training.huber_c=0.2",
        "training.noise_offset_random_strength=true", "training.ip_noise_gamma_random_strength=true",
        "training.scale_v_pred_loss_like_noise_pred=true",
    ]  # fmt: skip
    run_dir, summary = train(tmp_path, "training.max_train_steps=3", *options)
    assert summary["status"] == "completed" and math.isfinite(summary["final_loss"])
    _, meta = load_lora(run_dir / "demo.safetensors")
    assert {k: meta[k] for k in ("ss_zero_terminal_snr", "ss_debiased_estimation", "ss_adaptive_noise_scale",
                                 "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_ip_noise_gamma",
                                 "ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale",
                                 "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength",
                                 "modelspec.timestep_range")} == {  # fmt: skip
        "ss_zero_terminal_snr": "True", "ss_debiased_estimation": "True", "ss_adaptive_noise_scale": "0.01",
        "ss_multires_noise_iterations": "4", "ss_multires_noise_discount": "0.5", "ss_ip_noise_gamma": "0.1",
        "ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.2", "ss_huber_scale": "1.0",
        "ss_noise_offset_random_strength": "True", "ss_ip_noise_gamma_random_strength": "True",
        "modelspec.timestep_range": "100,900",
    }  # fmt: skip


def test_v_pred_like_loss_raises_the_loss_of_the_same_draws(tmp_path):
    from tests.test_trainer import steps_logged, train

    plain, _ = train(tmp_path, "training.max_train_steps=1", name="plain")
    added, summary = train(tmp_path, "training.max_train_steps=1", "training.v_pred_like_loss=0.1", name="added")
    # Same seed, same noise and timesteps: each sample's loss x (1 + 0.1 (SNR+1)/SNR) > 1.
    assert steps_logged(added)[0]["loss/step"] > steps_logged(plain)[0]["loss/step"] * 1.1
    from atelier.network.lora_file import load_lora

    _, meta = load_lora(added / "demo.safetensors")
    assert "ss_v_pred_like_loss" not in meta  # sd-scripts' train_network.py writes no key for it


def test_options_export_to_sd_scripts_flags(tmp_path):
    from atelier.tools.export_kohya import build_export
    from tests.test_tools_export import make_run

    run_dir = make_run(tmp_path, "training.multires_noise_iterations=6", "training.zero_terminal_snr=true",
                       "training.loss_type=smooth_l1", "training.min_timestep=50", "scheduler=warmup_stable_decay",
                       "training.debiased_estimation_loss=true")  # fmt: skip
    from omegaconf import OmegaConf

    export = build_export(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")), tmp_path)
    args = export.args
    assert args["multires_noise_iterations"] == 6 and args["multires_noise_discount"] == 0.3
    assert args["zero_terminal_snr"] is True and args["debiased_estimation_loss"] is True
    assert args["loss_type"] == "smooth_l1" and args["huber_schedule"] == "snr" and args["huber_c"] == 0.1
    assert args["min_timestep"] == 50 and "max_timestep" not in args and "huber_scale" not in args
    assert args["lr_scheduler"] == "warmup_stable_decay" and args["lr_decay_steps"] == 0.2
    assert args["lr_scheduler_min_lr_ratio"] == 0.0
