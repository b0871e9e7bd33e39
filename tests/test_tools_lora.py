"""The LoRA tools on the tiny model: resize, merge (into a checkpoint / into one LoRA), check, info."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atelier.cli import main
from atelier.models.ldm_convert import unet_to_ldm
from atelier.models.loading import BaseModel, load_base_model
from atelier.network.lora import LoRANetwork
from atelier.network.lora_file import load_lora, save_lora
from atelier.tools.common import LoRAFactors, split_lora
from atelier.tools.merge import infer_unet_config, unet_module_keys
from atelier.tools.resize import choose_rank, resize_module
from tests.builders import ranks_and_alphas, save_single_file, set_multiplier

METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "8",
    "ss_network_alpha": "4.0",
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "tiny",
    "ss_network_args": json.dumps({"conv_dim": 4}),
    "ss_tag_frequency": json.dumps({"6_atelier cube": {"atelier cube": 6, "red": 2}}),
    "ss_dataset_dirs": json.dumps({"6_atelier cube": {"n_repeats": 6, "img_count": 6}}),
    "ss_bucket_info": json.dumps({"buckets": {"0": {"resolution": [64, 64], "count": 36}}}),
    "modelspec.architecture": "stable-diffusion-v1/lora",
}


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> BaseModel:
    model = load_base_model(None, builtin="tiny-sd15")
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False).eval()
    return model


def random_lora(base: BaseModel, rank: int, alpha: float, seed: int, unet_only: bool = False) -> dict[str, torch.Tensor]:
    """A kohya state dict with random (non-zero) up weights: a LoRA that changes outputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = LoRANetwork.create(base.unet, None if unet_only else base.text_encoder, rank, alpha)
        for module in network.loras.values():
            module.lora_up.weight.data.normal_(0, 0.2)
    return {k: v.clone() for k, v in network.kohya_state_dict().items()}


@pytest.fixture(scope="module")
def lora_file(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "tiny-lora.safetensors"
    save_lora(path, random_lora(base, 8, 4.0, seed=1), METADATA)
    return path


@pytest.fixture(scope="module")
def base_file(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny-base.safetensors"
    save_single_file(path, base.unet, base.vae, base.text_encoder, metadata={"note": "tiny base"})
    return path


def apply(base: BaseModel, state: dict[str, torch.Tensor], multiplier: float = 1.0) -> LoRANetwork:
    """Patch `state` into the base model (undo with .restore())."""
    ranks, alphas = ranks_and_alphas(state)
    has_te = any(k.startswith("lora_te_") for k in state)
    network = LoRANetwork.create(base.unet, base.text_encoder if has_te else None, 1, 1.0, ranks, alphas)
    network.load_kohya_state_dict(state, "test")
    set_multiplier(network, multiplier)
    network.apply_to()
    return network


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    latents, t, context = unet_inputs()
    return unet(latents, t, encoder_hidden_states=context).sample


@torch.no_grad()
def text_out(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[512, 40, 41, 42, 43, 513, 513]])
    return text_encoder(ids).last_hidden_state


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: m.delta() for name, m in split_lora(state, "test").items()}


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


# --- resize -------------------------------------------------------------------------


def test_resize_to_full_rank_reproduces_the_lora(base: BaseModel, lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r8.safetensors"
    assert cli("resize", lora_file, out, "--rank", "8") == 0
    assert "retained Frobenius norm overall 1.0000" in capsys.readouterr().out
    original, _ = load_lora(lora_file)
    resized, meta = load_lora(out)
    assert set(resized) == set(original)
    before, after = deltas(original), deltas(resized)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-5, rtol=1e-4), name
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["sshs_model_hash"] != load_lora(lora_file)[1]["sshs_model_hash"]
    assert "resized by atelier" in meta["ss_training_comment"]
    assert meta["ss_tag_frequency"] == METADATA["ss_tag_frequency"]

    plain = unet_out(base.unet)
    outputs = []
    for state in (original, resized):
        network = apply(base, state)
        outputs.append((unet_out(base.unet), text_out(base.text_encoder)))
        network.restore()
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-4)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-4)
    assert (outputs[0][0] - plain).abs().max() > 1e-3  # the LoRA does change the output


def test_resize_lower_rank_keeps_alpha_ratio_and_best_approximation(lora_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r3.safetensors"
    assert cli("resize", lora_file, out, "--rank", "3") == 0
    original, resized = load_lora(lora_file)[0], load_lora(out)[0]
    ranks, alphas = ranks_and_alphas(resized)
    assert set(ranks.values()) == {3} and all(a == pytest.approx(4.0 * 3 / 8) for a in alphas.values())
    for name, delta in deltas(original).items():
        flat = delta.reshape(delta.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = deltas(resized)[name].reshape(flat.shape).double()
        assert torch.allclose(got, best, atol=1e-5), name


def test_dynamic_sv_fro_keeps_the_stated_fraction(lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dyn.safetensors"
    assert cli("resize", lora_file, out, "--dynamic", "sv_fro", "--param", "0.9") == 0
    printed = capsys.readouterr().out
    original, resized = load_lora(lora_file)[0], load_lora(out)
    before, after = deltas(original), deltas(resized[0])
    ranks, _ = ranks_and_alphas(resized[0])
    for name in before:
        kept = after[name].norm() / before[name].norm()
        assert kept >= 0.9 - 1e-5, (name, float(kept))
        assert name in printed
    assert min(ranks.values()) < 8  # it did drop ranks
    assert resized[1]["ss_network_dim"] == "Dynamic" and resized[1]["ss_network_alpha"] == "Dynamic"
    # the cap
    capped = tmp_path / "dyn4.safetensors"
    assert cli("resize", lora_file, capped, "--dynamic", "sv_fro", "--param", "0.999", "--rank", "4") == 0
    assert max(ranks_and_alphas(load_lora(capped)[0])[0].values()) == 4


def test_choose_rank_methods() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    assert choose_rank(s, 2, None, None) == 2
    assert choose_rank(s, None, "sv_ratio", 5.0) == 3  # > 8/5
    assert choose_rank(s, None, "sv_cumulative", 12 / 15) == 2  # (8+4)/15 reaches 0.8
    assert choose_rank(s, None, "sv_fro", math.sqrt(80 / 85)) == 2
    assert choose_rank(s, None, "sv_fro", 1.0) == 4  # zeros add nothing
    assert choose_rank(torch.zeros(3), None, "sv_fro", 0.9) == 1  # a zero module keeps rank 1


def test_resize_conv_kxk_module() -> None:
    g = torch.Generator().manual_seed(3)
    module = LoRAFactors("lora_unet_x_conv1", torch.randn(4, 8, 3, 3, generator=g), torch.randn(16, 4, 1, 1, generator=g), 2.0)
    full, info = resize_module(module, 4, None, None)
    assert full.down.shape == (4, 8, 3, 3) and full.up.shape == (16, 4, 1, 1) and info.retained == pytest.approx(1.0)
    assert torch.allclose(full.delta(), module.delta(), atol=1e-5)
    low, info = resize_module(module, 2, None, None)
    assert low.down.shape == (2, 8, 3, 3) and low.alpha == pytest.approx(2.0 * 2 / 4)
    s = torch.linalg.svdvals(module.delta2d().double())
    assert info.retained == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-6)


def test_resize_errors(lora_file: Path, tmp_path: Path, capsys) -> None:
    assert cli("resize", lora_file, tmp_path / "x.safetensors") == 2
    assert "--rank" in capsys.readouterr().err
    assert cli("resize", lora_file, tmp_path / "x.safetensors", "--dynamic", "sv_fro", "--param", "1.5") == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert cli("resize", tmp_path / "missing.safetensors", tmp_path / "x.safetensors", "--rank", "2") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# --- merge into a checkpoint ------------------------------------------------------------


@pytest.mark.parametrize("with_config", [False, True])
def test_merge_into_checkpoint_equals_base_plus_lora(
    base: BaseModel, base_file: Path, lora_file: Path, tiny_model_path: Path, tmp_path: Path, with_config: bool
) -> None:
    out = tmp_path / "merged.safetensors"
    config = ["--config", tiny_model_path] if with_config else []
    assert cli("merge", base_file, lora_file, "--ratios", "0.7", "-o", out, *config) == 0

    original, merged = load_file(str(base_file)), load_file(str(out))
    assert original.keys() == merged.keys()
    assert all(original[k].dtype == merged[k].dtype and original[k].shape == merged[k].shape for k in original)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["note"] == "tiny base" and "tiny-lora.safetensors" in meta["atelier.merged_loras"]
    changed = [k for k in original if not torch.equal(original[k], merged[k])]
    assert len(changed) == len(split_lora(load_lora(lora_file)[0], "x"))

    model = load_base_model(out, config=tiny_model_path)
    network = apply(base, load_lora(lora_file)[0], multiplier=0.7)
    try:
        expected_unet, expected_text = unet_out(base.unet), text_out(base.text_encoder)
    finally:
        network.restore()
    assert torch.allclose(unet_out(model.unet), expected_unet, atol=1e-4)
    assert torch.allclose(text_out(model.text_encoder), expected_text, atol=1e-4)


def test_merge_into_checkpoint_keeps_fp16(base: BaseModel, lora_file: Path, tmp_path: Path) -> None:
    half = tmp_path / "base-fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(str(_single(base, tmp_path))).items()}, str(half))
    out = tmp_path / "merged-fp16.safetensors"
    assert cli("merge", half, lora_file, "-o", out) == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(out)).values())


def _single(base: BaseModel, tmp_path: Path) -> Path:
    path = tmp_path / "single.safetensors"
    save_single_file(path, base.unet, base.vae, base.text_encoder)
    return path


def test_unet_layout_inferred_from_an_sd15_checkpoint() -> None:
    from atelier.models.architectures import build_unet, unet_config

    with torch.device("meta"):
        unet = build_unet("sd15")
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet_to_ldm(unet).items()}
    inferred = unet_module_keys(infer_unet_config(shapes), shapes)
    assert inferred == unet_module_keys(unet_config("sd15"), shapes)
    assert inferred["lora_unet_down_blocks_1_attentions_1_proj_in"] == "model.diffusion_model.input_blocks.5.1.proj_in.weight"
    assert inferred["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"] == (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"
    )


def test_merge_errors(base: BaseModel, base_file: Path, lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    assert cli("merge", lora_file, base_file, "-o", out) == 2
    assert "first argument is the base checkpoint" in capsys.readouterr().err
    assert cli("merge", base_file, lora_file, "--ratios", "1", "2", "-o", out) == 2
    assert "one ratio per LoRA" in capsys.readouterr().err
    foreign = tmp_path / "foreign.safetensors"
    save_lora(foreign, {"lora_unet_nowhere_proj.lora_down.weight": torch.ones(2, 4), "lora_unet_nowhere_proj.lora_up.weight": torch.ones(4, 2)}, {})
    assert cli("merge", base_file, foreign, "-o", out) == 2
    assert "another base model" in capsys.readouterr().err
    assert not out.exists()


# --- LoRAs into one ---------------------------------------------------------------------------


def test_merge_loras_into_one_is_exact(base: BaseModel, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    state_a, state_b = random_lora(base, 4, 1.0, seed=2), random_lora(base, 8, 16.0, seed=3, unet_only=True)
    save_lora(a, state_a, METADATA, "fp16")
    save_lora(b, state_b, {**METADATA, "ss_network_dim": "8"})
    out = tmp_path / "ab.safetensors"
    assert cli("merge", "--loras", a, b, "--ratios", "0.7", "0.3", "-o", out) == 0
    merged, meta = load_lora(out)
    assert all(v.dtype == torch.float16 for v in merged.values())  # the first file's precision
    ranks, alphas = ranks_and_alphas(merged)
    assert all(alphas[n] == ranks[n] for n in ranks)
    assert meta["ss_network_dim"] == "Dynamic" and json.loads(meta["ss_merged_from"])[1]["ratio"] == 0.3
    da, db = deltas(load_lora(a)[0]), deltas(load_lora(b)[0])
    got = deltas(merged)
    assert set(got) == set(da) | set(db)
    for name in got:
        expected = 0.7 * da[name] + (0.3 * db[name] if name in db else 0)
        assert torch.allclose(got[name], expected, atol=2e-3, rtol=1e-2), name

    # applying the merged LoRA = applying both
    both = [apply(base, load_lora(a)[0], 0.7), apply(base, load_lora(b)[0], 0.3)]
    expected = unet_out(base.unet)
    for network in reversed(both):
        network.restore()
    one = apply(base, merged)
    actual = unet_out(base.unet)
    one.restore()
    assert torch.allclose(actual, expected, atol=2e-3)


# --- check / info -----------------------------------------------------------------------------


def test_check_flags_nan_and_zero_modules(base: BaseModel, lora_file: Path, tmp_path: Path, capsys) -> None:
    assert cli("check", lora_file) == 0
    out = capsys.readouterr().out
    assert "0 ZERO, 0 NaN/Inf: ok" in out and "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in out

    state, meta = load_lora(lora_file)
    names = sorted({k.split(".")[0] for k in state})
    nan_name, zero_name = names[0], names[1]
    state[f"{nan_name}.lora_up.weight"][0, 0] = float("nan")
    state[f"{zero_name}.lora_up.weight"].zero_()
    bad = tmp_path / "bad.safetensors"
    save_lora(bad, state, meta)
    assert cli("check", bad, "--flagged-only") == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(rows) == {nan_name, zero_name}
    assert "NaN/Inf" in rows[nan_name] and rows[zero_name].endswith("ZERO")
    assert "1 ZERO, 1 NaN/Inf: FAIL" in out

    assert cli("check", bad, "--json") == 1
    report = {m["name"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    assert report[zero_name]["flags"] == ["ZERO"] and report[zero_name]["norm"] == 0
    assert report[nan_name]["flags"] == ["NaN/Inf"]
    ok = report[names[2]]
    assert ok["rank"] == 8 and ok["alpha"] == 4.0 and ok["norm"] == pytest.approx(float(deltas(state)[names[2]].norm()), rel=1e-4)


def test_info_decodes_json_fields(lora_file: Path, capsys) -> None:
    assert cli("info", lora_file, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    meta = info["metadata"]
    assert meta["ss_tag_frequency"] == {"6_atelier cube": {"atelier cube": 6, "red": 2}}
    assert meta["ss_dataset_dirs"]["6_atelier cube"]["n_repeats"] == 6
    assert meta["ss_bucket_info"]["buckets"]["0"]["resolution"] == [64, 64]
    assert meta["ss_network_args"] == {"conv_dim": 4}
    assert meta["ss_network_dim"] == "8"  # plain strings stay strings
    assert info["summary"]["modules"] == 60 and info["summary"]["ranks"] == {"8": 60}

    assert cli("info", lora_file) == 0
    text = capsys.readouterr().out
    assert '"atelier cube": 6' in text and "sshs_model_hash" in text
    assert re.search(r"^  ss_network_dim +8$", text, re.MULTILINE)


def test_tools_refuse_to_overwrite_without_force(base_file: Path, lora_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exists.safetensors"
    commands = [
        ("resize", lora_file, out, "--rank", "2"),
        ("merge", base_file, lora_file, "-o", out),
        ("merge", "--loras", lora_file, lora_file, "-o", out),
    ]
    for command in commands:
        out.write_bytes(b"precious")
        assert cli(*command) == 2, command
        assert "--force" in capsys.readouterr().err
        assert out.read_bytes() == b"precious"
        assert cli(*command, "--force") == 0, command
        assert out.read_bytes() != b"precious"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert cli("resize", lora_file, lora_file, "--rank", "2", "--force") == 2
    assert "also an input" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["resize", "merge", "check", "info", "export-kohya", "skeleton", "convert-ckpt"])
def test_every_tool_has_help_with_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(command, "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"atelier {command}" in text


def test_merge_refuses_nan_input_naming_file_and_module(lora_file: Path, tmp_path: Path, capsys) -> None:
    """[14]: `atelier merge` wrote NaN tensors from a NaN LoRA with rc 0; it now refuses, as resize does."""
    state, meta = load_lora(lora_file)
    name = sorted({k.split(".")[0] for k in state})[0]
    state[f"{name}.lora_down.weight"][0, 0] = float("inf")
    bad = tmp_path / "nan.safetensors"
    save_lora(bad, state, meta)
    out = tmp_path / "merged.safetensors"
    assert cli("merge", "--loras", lora_file, bad, "-o", out) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and name in err and "NaN or Inf" in err
    assert not out.exists()


def test_mismatched_ranks_get_a_message_naming_the_module(lora_file: Path, tmp_path: Path, capsys) -> None:
    state, meta = load_lora(lora_file)
    name = sorted({k.split(".")[0] for k in state})[0]
    state[f"{name}.lora_up.weight"] = state[f"{name}.lora_up.weight"][:, :3].clone()  # rank 3 against 8
    bad = tmp_path / "ranks.safetensors"
    save_lora(bad, state, meta)
    for command in (("check", bad), ("resize", bad, tmp_path / "r.safetensors", "--rank", "2"),
                    ("merge", "--loras", bad, lora_file, "-o", tmp_path / "m.safetensors")):  # fmt: skip
        assert cli(*command) != 0, command
        err = capsys.readouterr().err
        assert name in err and "ranks" in err and "disagree" in err and "Traceback" not in err, (command, err)
