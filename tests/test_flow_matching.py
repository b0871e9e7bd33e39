"""FLUX.1's flow-matching objective (atelier.objective.flow_matching): the sampled sigmas follow
the closed-form distribution of each timestep_sampling, the formulas give hand-computed values,
and (when sd-scripts' library is extracted to /tmp/sdscripts) every function agrees with
sd-scripts' own under the same seed."""

from __future__ import annotations

import __future__
import ast
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from atelier.objective import flow_matching as fm


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


def max_cdf_gap(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples and a closed-form CDF on a grid."""
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    empirical = (samples.double()[None, :] <= grid[:, None]).double().mean(dim=1)
    return (empirical - cdf(grid)).abs().max().item()


N = 100_000
KS_TOL = 0.01  # the KS 1% critical value at n=1e5 is 0.0052; a broken formula is off by >0.05


# ------------------------------------------------------------------------------ shifts, schedule
def test_shift_formulas_by_hand():
    half = torch.tensor([0.5])
    assert fm.shift_sigmas(half, 3.0).item() == pytest.approx(0.75)  # 1.5 / (1 + 2 * 0.5)
    assert fm.shift_sigmas(torch.tensor([0.25]), 3.0).item() == pytest.approx(0.75 / 1.5)
    assert fm.time_shift(math.log(3.0), 1.0, half).item() == pytest.approx(0.75)
    t = torch.linspace(0.01, 0.99, 50)
    # with sigma=1, BFL's time_shift is SD3's shift with shift = e^mu
    torch.testing.assert_close(fm.time_shift(0.63, 1.0, t), fm.shift_sigmas(t, math.exp(0.63)))
    assert fm.time_shift(1.15, 1.0, torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]
    assert fm.time_shift(0.7, 2.0, half).item() == pytest.approx(math.exp(0.7) / (math.exp(0.7) + 1.0))


def test_flux_shift_mu_depends_on_the_latent_size():
    line = fm.lin_function()
    assert line(256) == pytest.approx(0.5) and line(4096) == pytest.approx(1.15)
    assert fm.flux_shift_mu(128, 128) == pytest.approx(1.15)  # 1024x1024 px: 64*64 = 4096 tokens
    assert fm.flux_shift_mu(64, 64) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)  # 0.63
    assert fm.flux_shift_mu(64, 64) == pytest.approx(0.63)
    assert fm.flux_shift_mu(96, 160) == pytest.approx(0.5 + 0.65 * (48 * 80 - 256) / 3840)
    assert fm.flux_shift_mu(65, 65) == fm.flux_shift_mu(64, 64)  # (h // 2) * (w // 2) tokens


def test_flow_match_schedule_table():
    timesteps, sigmas = fm.flow_match_schedule(shift=1.0)
    assert timesteps.shape == sigmas.shape == (1000,)
    torch.testing.assert_close(sigmas, torch.arange(1000, 0, -1, dtype=torch.float32) / 1000)
    timesteps, sigmas = fm.flow_match_schedule(shift=3.0)
    assert sigmas[0].item() == 1.0 and timesteps[0].item() == 1000.0
    assert sigmas[-1].item() == pytest.approx(0.003 / 1.002)  # s = 1/1000 shifted by 3
    assert sigmas[500].item() == pytest.approx(1.5 / 2.0)  # s = 0.5
    torch.testing.assert_close(timesteps, sigmas * 1000)
    assert (sigmas[1:] < sigmas[:-1]).all()


# ------------------------------------------------------------------------------ sampling
def test_uniform_sigmas_are_uniform():
    sigmas, timesteps = fm.sample_sigmas("uniform", N, gen(1))
    assert 0 <= sigmas.min() and sigmas.max() < 1
    assert max_cdf_gap(sigmas, lambda x: x) < KS_TOL
    torch.testing.assert_close(timesteps, sigmas * 1000)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_sigmas_are_logit_normal(scale):
    sigmas, _ = fm.sample_sigmas("sigmoid", N, gen(2), sigmoid_scale=scale)
    # P(sigmoid(s Z) <= x) = Phi(logit(x) / s)
    assert max_cdf_gap(sigmas, lambda x: torch.special.ndtr(logit(x) / scale)) < KS_TOL
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.005)


def test_shift_sigmas_follow_the_shifted_distribution():
    shift, scale = 3.0, 1.0
    sigmas, timesteps = fm.sample_sigmas("shift", N, gen(3), sigmoid_scale=scale, discrete_flow_shift=shift)
    # sigma = f(sigmoid(sZ)), f(s) = shift*s/(1+(shift-1)s), f^-1(y) = y / (shift - (shift-1) y)
    inverse = lambda y: y / (shift - (shift - 1) * y)  # noqa: E731
    assert max_cdf_gap(sigmas, lambda y: torch.special.ndtr(logit(inverse(y)) / scale)) < KS_TOL
    assert sigmas.mean().item() > 0.6  # shift 3 moves the mass towards noise
    torch.testing.assert_close(timesteps, sigmas * 1000)


def test_flux_shift_sigmas_follow_the_resolution_shift():
    for size in [(64, 64), (128, 128)]:
        mu = fm.flux_shift_mu(*size)
        sigmas, _ = fm.sample_sigmas("flux_shift", N, gen(4), latent_size=size)
        inverse = lambda y: y / (math.exp(mu) - (math.exp(mu) - 1) * y)  # noqa: E731
        assert max_cdf_gap(sigmas, lambda y: torch.special.ndtr(logit(inverse(y)))) < KS_TOL
    small, _ = fm.sample_sigmas("flux_shift", 1000, gen(4), latent_size=(64, 64))
    large, _ = fm.sample_sigmas("flux_shift", 1000, gen(4), latent_size=(128, 128))
    assert (large > small).all()  # same draws, the larger image shifted further
    with pytest.raises(ValueError, match="latent_size"):
        fm.sample_sigmas("flux_shift", 2, gen())


def test_sigma_sampling_indexes_the_shifted_table():
    timesteps_table, sigmas_table = fm.flow_match_schedule(3.0)
    sigmas, timesteps = fm.sample_sigmas("sigma", 5000, gen(5), discrete_flow_shift=3.0)
    u = torch.rand((5000,), generator=gen(5))  # weighting_scheme uniform: one U(0, 1) per sample
    torch.testing.assert_close(sigmas, sigmas_table[(u * 1000).long()])
    torch.testing.assert_close(timesteps, timesteps_table[(u * 1000).long()])
    sigmas, _ = fm.sample_sigmas("sigma", N, gen(6), discrete_flow_shift=3.0)
    assert sigmas.mean().item() == pytest.approx(sigmas_table.mean().item(), abs=0.003)


def test_timestep_density_schemes():
    u = fm.timestep_density("logit_normal", N, gen(7), logit_mean=0.5, logit_std=1.5)
    assert max_cdf_gap(u, lambda x: torch.special.ndtr((logit(x) - 0.5) / 1.5)) < KS_TOL
    for scheme in ("uniform", "none", "sigma_sqrt", "cosmap"):
        u = fm.timestep_density(scheme, N, gen(8))
        assert max_cdf_gap(u, lambda x: x) < KS_TOL
    u = fm.timestep_density("mode", 1000, gen(9), mode_scale=1.29)
    v = torch.rand((1000,), generator=gen(9))
    torch.testing.assert_close(u, 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v))
    assert fm.timestep_density("mode", 1, gen(), mode_scale=0.0).item() == pytest.approx(
        1 - torch.rand((1,), generator=gen()).item()
    )  # scale 0: u -> 1 - u, still uniform


def test_sigma_sampling_never_indexes_past_the_table(monkeypatch):
    # "mode" maps a U(0, 1) draw of 0 to u = 1: sd-scripts' index 1000 would be out of range
    monkeypatch.setattr(fm, "timestep_density", lambda *a, **k: torch.tensor([1.0, 0.0, 0.5]))
    _, table = fm.flow_match_schedule(3.0)
    sigmas, _ = fm.sample_sigmas("sigma", 3, gen(), weighting_scheme="mode")
    torch.testing.assert_close(sigmas, table[[999, 0, 500]])


def test_the_draws_depend_only_on_the_generator():
    for mode in fm.TIMESTEP_SAMPLINGS:
        torch.manual_seed(0)
        a = fm.sample_sigmas(mode, 8, gen(11), latent_size=(64, 64), weighting_scheme="logit_normal")
        torch.manual_seed(1)  # the global RNG plays no part
        b = fm.sample_sigmas(mode, 8, gen(11), latent_size=(64, 64), weighting_scheme="logit_normal")
        c = fm.sample_sigmas(mode, 8, gen(12), latent_size=(64, 64), weighting_scheme="logit_normal")
        torch.testing.assert_close(a, b)
        assert not torch.equal(a[0], c[0]), mode


def test_unknown_modes_are_refused_naming_the_option_and_the_choices():
    with pytest.raises(ValueError, match=r"timestep_sampling='logit'.*sigma, uniform, sigmoid, shift, flux_shift"):
        fm.sample_sigmas("logit", 2, gen())
    with pytest.raises(ValueError, match=r"weighting_scheme='cos'.*cosmap"):
        fm.loss_weighting("cos", torch.ones(2))
    with pytest.raises(ValueError, match=r"weighting_scheme='x'"):
        fm.sample_sigmas("uniform", 2, gen(), weighting_scheme="x")
    with pytest.raises(ValueError, match=r"model_prediction_type='eps'.*raw, additive, sigma_scaled"):
        fm.apply_model_prediction_type(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.ones(1), "eps")


# ------------------------------------------------------------------------------ input and target
def test_noisy_input_and_target_identities():
    latents = torch.randn(3, 4, 8, 8, generator=gen(20))
    noise = fm.flow_noise(latents, gen(21))
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = fm.noisy_model_input(latents, noise, sigmas)
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    target = fm.flow_target(latents, noise)
    torch.testing.assert_close(target, noise - latents)
    # x_sigma = x_0 + sigma * v, and x_sigma - sigma * v recovers x_0
    torch.testing.assert_close(noisy, latents + sigmas.view(-1, 1, 1, 1) * target)


def test_ip_noise_gamma_perturbs_the_input_only():
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen(22)), torch.randn(2, 4, 8, 8, generator=gen(23))
    sigmas = torch.tensor([0.5, 0.8])
    clean = fm.noisy_model_input(latents, noise, sigmas)
    perturbed = fm.noisy_model_input(latents, noise, sigmas, gen(24), ip_noise_gamma=0.1)
    xi = torch.randn(latents.shape, generator=gen(24))
    torch.testing.assert_close(perturbed - clean, sigmas.view(-1, 1, 1, 1) * 0.1 * xi)
    g = gen(24)
    torch.randn(latents.shape, generator=g)  # xi first, then the strength (sd-scripts' FLUX order)
    strength = torch.rand((), generator=g).item() * 0.1
    random = fm.noisy_model_input(latents, noise, sigmas, gen(24), 0.1, ip_noise_gamma_random_strength=True)
    torch.testing.assert_close(random - clean, sigmas.view(-1, 1, 1, 1) * strength * xi)
    with pytest.raises(ValueError, match="generator"):
        fm.noisy_model_input(latents, noise, sigmas, ip_noise_gamma=0.1)


def test_noisy_input_and_timesteps_draws_in_sd_scripts_order():
    latents = torch.randn(2, 16, 64, 64, generator=gen(25))
    noise = fm.flow_noise(latents, gen(26))
    noisy, timesteps, sigmas = fm.noisy_input_and_timesteps(latents, noise, gen(27), "flux_shift")
    expected, _ = fm.sample_sigmas("flux_shift", 2, gen(27), latent_size=(64, 64))
    assert sigmas.shape == (2, 1, 1, 1) and timesteps.shape == (2,)
    torch.testing.assert_close(sigmas.flatten(), expected)
    torch.testing.assert_close(timesteps, expected * 1000)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)


def test_bf16_latents_keep_their_dtype():
    latents = torch.randn(1, 4, 4, 4, generator=gen()).bfloat16()
    noisy = fm.noisy_model_input(latents, fm.flow_noise(latents, gen(1)), torch.tensor([0.3]))
    assert noisy.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ prediction, weights
def test_model_prediction_types():
    latents, noise = torch.randn(2, 4, 4, 4, generator=gen(30)), torch.randn(2, 4, 4, 4, generator=gen(31))
    sigmas = torch.tensor([0.2, 0.9])
    noisy = fm.noisy_model_input(latents, noise, sigmas)
    velocity = fm.flow_target(latents, noise)
    pred, weighting = fm.apply_model_prediction_type(velocity, noisy, sigmas, "raw")
    assert pred is velocity and weighting is None
    pred, weighting = fm.apply_model_prediction_type(velocity, noisy, sigmas, "additive")
    torch.testing.assert_close(pred, velocity + noisy)
    assert weighting is None
    # sigma_scaled: an exact velocity becomes the clean latents, x_sigma - sigma * v = x_0
    pred, weighting = fm.apply_model_prediction_type(velocity, noisy, sigmas, "sigma_scaled", "cosmap")
    torch.testing.assert_close(pred, latents)
    assert weighting.shape == (2, 1, 1, 1)
    torch.testing.assert_close(weighting.flatten(), fm.loss_weighting("cosmap", sigmas))
    _, weighting = fm.apply_model_prediction_type(velocity, noisy, sigmas)  # defaults: sigma_scaled, uniform
    torch.testing.assert_close(weighting, torch.ones(2, 1, 1, 1))


def test_loss_weighting_values():
    sigmas = torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(fm.loss_weighting("sigma_sqrt", sigmas), torch.tensor([16.0, 4.0, 1.0]))
    cosmap = fm.loss_weighting("cosmap", torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(cosmap, torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi]))
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        torch.testing.assert_close(fm.loss_weighting(scheme, sigmas), torch.ones(3))


# ------------------------------------------------------------------------------ FLUX token layout
def test_pack_unpack_round_trip_and_patch_order():
    latents = torch.randn(2, 16, 6, 10, generator=gen(40))
    tokens = fm.pack_latents(latents)
    assert tokens.shape == (2, 3 * 5, 64)
    torch.testing.assert_close(fm.unpack_latents(tokens, 3, 5), latents)
    # token (i, j) = patch rows 2i..2i+1, cols 2j..2j+1, features ordered (channel, py, px)
    i, j = 1, 3
    torch.testing.assert_close(tokens[:, i * 5 + j], latents[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 64))
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="3x4"):
        fm.unpack_latents(tokens, 3, 4)


def test_position_ids_match_the_packing():
    ids = fm.img_ids(2, 3, 5)
    assert ids.shape == (2, 15, 3) and ids.dtype == torch.float32
    assert ids[1, 1 * 5 + 3].tolist() == [0.0, 1.0, 3.0]
    # pack a latent whose channels hold each pixel's patch row and column: ids follow the tokens
    rows = torch.arange(6).view(6, 1).expand(6, 10) // 2
    cols = torch.arange(10).view(1, 10).expand(6, 10) // 2
    tokens = fm.pack_latents(torch.stack([rows, cols]).float()[None])
    torch.testing.assert_close(ids[0, :, 1:], tokens[0, :, [0, 4]])
    assert torch.equal(fm.txt_ids(2, 7), torch.zeros(2, 7, 3))


def test_guidance_vector():
    vec = fm.guidance_vector(3)
    assert vec.tolist() == [3.5, 3.5, 3.5] and vec.dtype == torch.float32
    assert fm.guidance_vector(2, 1).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------ sd-scripts itself
SDSCRIPTS = Path(os.environ.get("ATELIER_SDSCRIPTS", "/tmp/sdscripts")) / "library"


def sd_scripts(module: str, *names: str) -> SimpleNamespace:
    """sd-scripts' functions and classes named, compiled from its source file alone (its modules
    import what this environment lacks, e.g. torchvision)."""
    path = SDSCRIPTS / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"sd-scripts' library is not extracted at {SDSCRIPTS.parent}")
    import typing

    einops = pytest.importorskip("einops")  # sd-scripts' flux_utils needs it
    import numpy as np
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    assert {n.name for n in body} == set(names)
    space = {"torch": torch, "math": math, "np": np, "einops": einops, **vars(typing), "ConfigMixin": ConfigMixin,
             "register_to_config": register_to_config, "SchedulerMixin": SchedulerMixin}  # fmt: skip
    flags = __future__.annotations.compiler_flag  # its annotations name classes left out
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec", flags=flags), space)
    return SimpleNamespace(**{name: space[name] for name in names})


def sd_args(**kw) -> SimpleNamespace:
    defaults = dict(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, weighting_scheme="uniform",
                    logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None,
                    ip_noise_gamma_random_strength=False, model_prediction_type="sigma_scaled")  # fmt: skip
    return SimpleNamespace(**{**defaults, **kw})


@pytest.mark.parametrize(
    "options",
    [dict(timestep_sampling=m) for m in ("uniform", "sigmoid", "shift", "flux_shift")]
    + [dict(timestep_sampling="sigmoid", sigmoid_scale=2.0), dict(timestep_sampling="shift", discrete_flow_shift=1.5)]
    + [dict(timestep_sampling="sigma", weighting_scheme=w) for w in ("uniform", "logit_normal", "mode")]
    + [dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.4, logit_std=0.7)]
    + [dict(timestep_sampling="flux_shift", ip_noise_gamma=0.1), dict(timestep_sampling="shift", ip_noise_gamma=0.1,
                                                                      ip_noise_gamma_random_strength=True)],
)  # fmt: skip
def test_same_draws_as_sd_scripts(options):
    sd = sd_scripts("flux_train_utils", "get_noisy_model_input_and_timesteps", "get_sigmas", "time_shift",
                    "get_lin_function", "compute_density_for_timestep_sampling")  # fmt: skip
    scheduler_class = sd_scripts("sd3_train_utils", "FlowMatchEulerDiscreteScheduler").FlowMatchEulerDiscreteScheduler
    args = sd_args(**options)
    scheduler = scheduler_class(num_train_timesteps=1000, shift=args.discrete_flow_shift)
    for size in [(64, 64), (48, 80)]:
        latents = torch.randn(6, 16, *size, generator=gen(50))
        noise = torch.randn(6, 16, *size, generator=gen(51))
        torch.manual_seed(52)  # sd-scripts draws from the global RNG, on the CPU here
        expected = sd.get_noisy_model_input_and_timesteps(args, scheduler, latents, noise, "cpu", torch.float32)
        ours = fm.noisy_input_and_timesteps(latents, noise, gen(52), **{k: v for k, v in vars(args).items()
                                                                        if k != "model_prediction_type"})  # fmt: skip
        for got, want in zip(ours, expected):
            torch.testing.assert_close(got, want)


def test_schedule_weighting_and_prediction_match_sd_scripts():
    sd = sd_scripts("flux_train_utils", "compute_loss_weighting_for_sd3", "apply_model_prediction_type")
    scheduler_class = sd_scripts("sd3_train_utils", "FlowMatchEulerDiscreteScheduler").FlowMatchEulerDiscreteScheduler
    for shift in (1.0, 3.0, 3.1582):
        scheduler = scheduler_class(num_train_timesteps=1000, shift=shift)
        timesteps, sigmas = fm.flow_match_schedule(shift)
        assert torch.equal(timesteps, scheduler.timesteps) and torch.equal(sigmas, scheduler.sigmas)
    sigmas = torch.rand(5, generator=gen(60)).view(-1, 1, 1, 1)
    pred, noisy = torch.randn(5, 16, 8, 8, generator=gen(61)), torch.randn(5, 16, 8, 8, generator=gen(62))
    for scheme in fm.WEIGHTING_SCHEMES:
        torch.testing.assert_close(fm.loss_weighting(scheme, sigmas), sd.compute_loss_weighting_for_sd3(scheme, sigmas))
        for kind in fm.MODEL_PREDICTION_TYPES:
            want = sd.apply_model_prediction_type(sd_args(model_prediction_type=kind, weighting_scheme=scheme),
                                                  pred, noisy, sigmas)  # fmt: skip
            got = fm.apply_model_prediction_type(pred, noisy, sigmas.flatten(), kind, scheme)
            torch.testing.assert_close(got[0], want[0])
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1])


def test_layout_matches_sd_scripts():
    sd = sd_scripts("flux_utils", "pack_latents", "unpack_latents", "prepare_img_ids")
    latents = torch.randn(2, 16, 6, 10, generator=gen(70))
    assert torch.equal(fm.pack_latents(latents), sd.pack_latents(latents))
    tokens = fm.pack_latents(latents)
    assert torch.equal(fm.unpack_latents(tokens, 3, 5), sd.unpack_latents(tokens, 3, 5))
    assert torch.equal(fm.img_ids(2, 3, 5), sd.prepare_img_ids(2, 3, 5))
