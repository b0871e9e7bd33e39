"""[10] point 3: `atelier info / check / resize / merge` on kohya FLUX.1 LoRAs (networks.lora_flux), tiny-flux.

A fused BFL layer (double-block qkv, single-block linear1) is one kohya module: one lora_down, one
lora_up over several diffusers Linears. The tools treat it as one matrix up @ down, as sd-scripts'
resize_lora.py / flux_merge_lora.py do; merging into the diffusers folder splits its rows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atelier.cli import main
from atelier.models.flux_files import COMFY_PREFIX, flux_transformer_to_bfl, flux_transformer_to_diffusers
from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model
from atelier.network.flux_lora import CLIP_PREFIX, build_flux_network, flux_network_from_state
from atelier.network.flux_names import flux_targets_of
from atelier.network.lora_file import load_lora, save_lora
from atelier.tools.common import split_lora
from tests.builders import set_multiplier
from tests.test_flux_lora import perturb, run

RANK, ALPHA = 4, 2.0
FUSED = "lora_unet_double_blocks_0_img_attn_qkv"
LINEAR1 = "lora_unet_single_blocks_1_linear1"
# What a tiny-flux run writes (train.py model=tiny_flux) of the keys the tools read.
METADATA = {
    "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK),
    "ss_network_alpha": str(ALPHA), "ss_output_name": "demo", "modelspec.architecture": "flux-1-dev/lora",
    "modelspec.implementation": "https://github.com/black-forest-labs/flux", "ss_model_type": "flux",
    "ss_timestep_sampling": "sigma", "ss_discrete_flow_shift": "3.0", "ss_model_prediction_type": "sigma_scaled",
    "ss_guidance_scale": "3.5", "ss_weighting_scheme": "uniform", "ss_network_args": "{}",
}  # fmt: skip


def cli(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_flux_path(atelier_cache: Path) -> Path:
    return ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)


@pytest.fixture(scope="module")
def models(tiny_flux_path: Path):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer").eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_flux_path / "text_encoder").eval()
    return transformer, text_encoder


def lora_state(models, seed: int) -> dict[str, torch.Tensor]:
    transformer, text_encoder = models
    network = build_flux_network(transformer, RANK, ALPHA, text_encoder=text_encoder)
    perturb(network, seed=seed, std=0.2)
    return {key: value.clone() for key, value in network.kohya_state_dict().items()}


@pytest.fixture(scope="module")
def lora_file(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux-lora") / "flux-lora.safetensors"
    save_lora(path, lora_state(models, seed=1), METADATA)
    return path


@pytest.fixture(scope="module")
def bfl_file(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-flux's transformer as a BFL single file (float32, so merges compare to float32 rounding)."""
    path = tmp_path_factory.mktemp("flux-base") / "flux1-dev.safetensors"
    save_file(flux_transformer_to_bfl(models[0].state_dict()), str(path), metadata={"note": "tiny base"})
    return path


@pytest.fixture(scope="module")
def comfy_file(bfl_file: Path) -> Path:
    """The same transformer with ComfyUI's model.diffusion_model. prefix on every key."""
    path = bfl_file.with_name("flux1-dev-comfy.safetensors")
    save_file({COMFY_PREFIX + key: value for key, value in load_file(str(bfl_file)).items()}, str(path))
    return path


def network_of(models, state: dict[str, torch.Tensor], multiplier: float = 1.0):
    network = flux_network_from_state(models[0], state, text_encoder=models[1])
    set_multiplier(network, multiplier)
    return network


def test_info_shows_flux_base_parts_and_flow_matching_options(models, lora_file: Path, capsys) -> None:
    targets = flux_targets_of(models[0])
    double = sum("_double_blocks_" in t.name for t in targets)
    single = len(targets) - double
    assert cli("info", lora_file) == 0
    out = capsys.readouterr().out
    assert f"{double} double blocks, {single} single blocks, 12 CLIP-L; {sum(t.fused for t in targets)} fused" in out
    assert "base model FLUX.1 (flux1), network networks.lora_flux" in out
    assert "flow matching: timesteps sigma (discrete_flow_shift 3.0), model prediction sigma_scaled" in out
    section = out.split("flow matching (FLUX.1):")[1].split("\n\n")[0]
    assert "ss_timestep_sampling" in section and "ss_guidance_scale" in section
    assert cli("info", lora_file, "--json") == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["flux_parts"] == {"double blocks": double, "single blocks": single, "CLIP-L": 12}
    assert summary["base_model"] == {"family": "FLUX.1", "version": "flux1"}


def test_check_finds_zero_and_nan_fused_modules(lora_file: Path, tmp_path: Path, capsys) -> None:
    state, metadata = load_lora(lora_file)
    assert cli("check", lora_file, "--json") == 0
    modules = {m["name"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    up, down = state[f"{FUSED}.lora_up.weight"], state[f"{FUSED}.lora_down.weight"]
    expected = float(torch.linalg.matrix_norm((up.double() @ down.double()) * ALPHA / RANK))
    assert modules[FUSED]["norm"] == pytest.approx(expected, rel=1e-9) and modules[FUSED]["flags"] == []
    state[f"{FUSED}.lora_up.weight"] = torch.zeros_like(up)
    state[f"{LINEAR1}.lora_down.weight"][0, 0] = float("nan")
    broken = save_lora(tmp_path / "broken.safetensors", state, metadata)
    assert cli("check", broken, "--flagged-only") == 1
    out = capsys.readouterr().out
    assert f"{FUSED} " in out and "ZERO" in out.split(FUSED)[1].splitlines()[0]
    assert "NaN/Inf" in out.split(LINEAR1)[1].splitlines()[0]
    assert "1 ZERO, 1 NaN/Inf: FAIL" in out


def test_resize_reduces_fused_modules_as_one_matrix(lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r2.safetensors"
    assert cli("resize", lora_file, out, "--rank", 2) == 0
    capsys.readouterr()
    state, metadata = load_lora(out)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "1.0")  # alpha / rank kept: 2/4 * 2
    for key in ("ss_base_model_version", "ss_network_module", "modelspec.architecture", "ss_timestep_sampling"):
        assert metadata[key] == METADATA[key]
    old, new = split_lora(load_lora(lora_file)[0], "old"), split_lora(state, "new")
    assert set(old) == set(new)
    for name in (FUSED, LINEAR1):
        assert new[name].up.shape == (old[name].up.shape[0], 2)  # still one kohya module over the fused rows
        u, s, vh = torch.linalg.svd(old[name].delta2d(torch.float64))
        best = (u[:, :2] * s[:2]) @ vh[:2]  # the best rank-2 approximation of the fused update
        torch.testing.assert_close(new[name].delta2d(torch.float64), best, rtol=1e-5, atol=1e-6)


def test_resize_to_full_rank_gives_the_same_transformer_output(models, lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r4.safetensors"
    assert cli("resize", lora_file, out, "--rank", RANK) == 0
    assert "retained Frobenius norm overall 1.0000" in capsys.readouterr().out
    before = run(models[0], network_of(models, load_lora(lora_file)[0]))
    after = run(models[0], network_of(models, load_lora(out)[0]))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_merge_loras_into_one_flux_lora(models, lora_file: Path, tmp_path: Path, capsys) -> None:
    second = save_lora(tmp_path / "second.safetensors", lora_state(models, seed=2), METADATA)
    out = tmp_path / "merged.safetensors"
    assert cli("merge", "--loras", lora_file, second, "--ratios", 1.0, 0.5, "-o", out) == 0
    assert "rank 8" in capsys.readouterr().out
    state, metadata = load_lora(out)
    assert (metadata["ss_base_model_version"], metadata["ss_network_module"]) == ("flux1", "networks.lora_flux")
    a, b, merged = (split_lora(load_lora(p)[0], str(p)) for p in (lora_file, second, out))
    for name in (FUSED, LINEAR1, f"{CLIP_PREFIX}_text_model_encoder_layers_0_mlp_fc1"):
        torch.testing.assert_close(merged[name].delta2d(torch.float64),
                                   a[name].delta2d(torch.float64) + 0.5 * b[name].delta2d(torch.float64))  # fmt: skip
    both = run(models[0], network_of(models, state))
    network_a, network_b = network_of(models, load_lora(lora_file)[0]), network_of(models, load_lora(second)[0], 0.5)
    network_a.apply_to()
    try:
        expected = run(models[0], network_b)
    finally:
        network_a.restore()
    torch.testing.assert_close(both, expected, rtol=1e-4, atol=1e-5)


def merged_transformer(models, path: Path):
    transformer = copy.deepcopy(models[0])
    bfl = {key.removeprefix(COMFY_PREFIX): value for key, value in load_file(str(path)).items()}
    transformer.load_state_dict(flux_transformer_to_diffusers(bfl), strict=True)
    return transformer


@pytest.mark.parametrize("base_kind", ["bfl_file", "comfy_file", "diffusers_folder"])
def test_merge_into_flux_base_matches_the_lora_applied(
    base_kind: str, models, lora_file: Path, bfl_file: Path, comfy_file: Path, tiny_flux_path: Path, tmp_path: Path,
    capsys,
) -> None:
    """The merged BFL file, loaded, computes what the base with the LoRA applied does, to float32
    rounding: W + dW is rounded once to float32 and the sums run in another order than the LoRA
    branch's up(down(x)), so outputs of size ~1 differ by ~1e-6 (tolerance rtol 1e-4, atol 1e-5; the
    LoRA itself moves them by > 1e-2)."""
    base = {"bfl_file": bfl_file, "comfy_file": comfy_file, "diffusers_folder": tiny_flux_path}[base_kind]
    out = tmp_path / "merged-base.safetensors"
    assert cli("merge", base, lora_file, "--ratios", 0.8, "-o", out) == 0
    printed = capsys.readouterr().out
    assert "12 text-encoder modules (lora_te...) not merged" in printed and f"wrote {out}" in printed
    merged = run(merged_transformer(models, out))
    expected = run(models[0], network_of(models, load_lora(lora_file)[0], 0.8))
    assert (expected - run(models[0])).abs().max() > 1e-2
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        prefix = COMFY_PREFIX if base_kind == "comfy_file" else ""  # the base's keys are kept
        assert any(key.startswith(prefix + "double_blocks.") for key in handle.keys())
    assert json.loads(metadata["atelier.merged_loras"]) == [{"file": lora_file.name, "ratio": 0.8}]
    if base_kind == "bfl_file":
        assert metadata["note"] == "tiny base"  # the base's own metadata is kept


def test_merge_writes_the_clip_l_modules_into_a_clip_l_file(models, lora_file: Path, bfl_file: Path, tmp_path: Path,
                                                            capsys) -> None:
    """--clip-l / --clip-l-output (sd-scripts' --clip_l / --clip_l_save_to): the LoRA's CLIP-L modules
    merged into a clip_l file compute what CLIP-L with the LoRA applied does (tolerance as above)."""
    from atelier.models.ldm_convert import text_encoder_to_ldm

    clip_file, clip_out, out = tmp_path / "clip_l.safetensors", tmp_path / "clip_l-merged.safetensors", tmp_path / "t.st"
    save_file({k: v.contiguous() for k, v in text_encoder_to_ldm(models[1]).items()}, str(clip_file),
              metadata={"note": "tiny clip"})  # fmt: skip
    assert cli("merge", bfl_file, lora_file, "--ratios", 0.8, "-o", out, "--clip-l", clip_file,
               "--clip-l-output", clip_out) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "12 CLIP-L modules into 'clip_l.safetensors'" in printed and "not merged" not in printed
    assert f"wrote {out}" in printed and f"wrote {clip_out}" in printed

    ids = torch.tensor([[0, 5, 9, 1, 2]])
    text_encoder = copy.deepcopy(models[1])
    merged = load_file(str(clip_out))
    assert set(merged) == set(load_file(str(clip_file)))  # the file's keys and layout are kept
    text_encoder.load_state_dict({key.removeprefix("text_model."): value for key, value in merged.items()}, strict=False)
    network = network_of(models, load_lora(lora_file)[0], 0.8)
    network.apply_to()
    try:
        with torch.no_grad():
            expected = models[1](ids).pooler_output
    finally:
        network.restore()
    with torch.no_grad():
        assert (expected - models[1](ids).pooler_output).abs().max() > 1e-3
        torch.testing.assert_close(text_encoder(ids).pooler_output, expected, rtol=1e-4, atol=1e-5)
    with safe_open(str(clip_out), framework="pt") as handle:
        assert handle.metadata()["note"] == "tiny clip"

    # Refused, nothing written: one option without the other, a file that is no CLIP-L, one file for both.
    for args, message in [
        (("--clip-l", clip_file), "--clip-l and --clip-l-output go together"),
        (("--clip-l", bfl_file, "--clip-l-output", tmp_path / "x.st"), "is not a CLIP-L text encoder file"),
        (("--clip-l", clip_file, "--clip-l-output", tmp_path / "t3.st"), "are the same file"),
    ]:
        assert cli("merge", bfl_file, lora_file, "-o", tmp_path / "t3.st", *args) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "t3.st").exists() and not (tmp_path / "x.st").exists()


def test_folder_and_bfl_merges_agree(lora_file: Path, bfl_file: Path, tiny_flux_path: Path, tmp_path: Path) -> None:
    """Row blocks on the diffusers Linears (folder) and the whole fused update on BFL's qkv / linear1 (file)."""
    assert cli("merge", bfl_file, lora_file, "-o", tmp_path / "a.safetensors") == 0
    assert cli("merge", tiny_flux_path, lora_file, "-o", tmp_path / "b.safetensors") == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_merge_refuses_other_families(models, lora_file: Path, bfl_file: Path, tmp_path: Path, capsys) -> None:
    sd = save_lora(tmp_path / "sd.safetensors", load_lora(lora_file)[0], {**METADATA, "ss_base_model_version": "sd_v1"})
    assert cli("merge", bfl_file, sd, "-o", tmp_path / "x.safetensors") == 2
    assert "sd.safetensors is a SD1 LoRA (ss_base_model_version sd_v1)" in capsys.readouterr().err
    assert cli("merge", "--loras", lora_file, sd, "-o", tmp_path / "y.safetensors") == 2
    err = capsys.readouterr().err
    assert "different module names" in err and "flux-lora.safetensors (FLUX.1)" in err
    state = load_lora(lora_file)[0]
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):  # a block tiny-flux does not have
        state[f"lora_unet_double_blocks_7_img_mlp_0{suffix}"] = state[f"{FUSED}{suffix}"].clone()
    other = save_lora(tmp_path / "other.safetensors", state, METADATA)
    assert cli("merge", bfl_file, other, "-o", tmp_path / "z.safetensors") == 2
    assert "lora_unet_double_blocks_7_img_mlp_0" in capsys.readouterr().err
