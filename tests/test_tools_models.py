"""Base models from anywhere, safely: hashes, config skeletons, pickles, single-file detection."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atelier.cli import main
from atelier.models import hashes
from atelier.models.ldm_convert import diffusers_to_ldm
from atelier.models.loading import BaseModel, ModelLoadError, load_base_model
from atelier.models.skeleton import WEIGHT_SUFFIXES, write_skeleton
from atelier.models.sources import identify_single_file, inspect_single_file
from atelier.network.lora_file import load_lora
from atelier.loop.run import run_training
from tests.test_trainer import fresh_accelerate_state, make_cfg  # noqa: F401  (autouse fixture)
from tests.builders import save_single_file


def cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> BaseModel:
    return load_base_model(None, builtin="tiny-sd15")


@pytest.fixture(scope="module")
def single_file(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(path, base.unet, base.vae, base.text_encoder)
    return path


def assert_same_weights(a: BaseModel, b: BaseModel) -> None:
    for part in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert left.keys() == right.keys(), part
        assert all(torch.equal(left[k], right[k]) for k in left), part


# --- hashes ---------------------------------------------------------------------------


def test_model_hashes_match_a1111_and_sd_scripts(single_file: Path, tmp_path: Path) -> None:
    data = single_file.read_bytes()
    assert len(data) > 0x110000  # the legacy window lies inside the file
    result = hashes.model_hashes(single_file, cache_dir=tmp_path)
    assert result == {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }
    # a file smaller than 1 MiB: the legacy window is empty, as in A1111
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"x" * 1000)
    assert hashes.model_hashes(small, cache_dir=tmp_path)["ss_sd_model_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def test_model_hashes_are_cached_per_size_and_mtime(single_file: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(single_file.read_bytes())
    first = hashes.model_hashes(copy, cache_dir=tmp_path)
    cache = json.loads((tmp_path / hashes.CACHE_FILE).read_text())
    assert list(cache) == [str(copy.resolve())]

    calls = []
    real_full_hash = hashes.full_hash
    monkeypatch.setattr(hashes, "full_hash", lambda files: calls.append(files) or real_full_hash(files))
    assert hashes.model_hashes(copy, cache_dir=tmp_path) == first and calls == []  # from the cache

    copy.write_bytes(copy.read_bytes()[:-8] + b"\0" * 8)  # same size, new content and mtime
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    second = hashes.model_hashes(copy, cache_dir=tmp_path)
    assert len(calls) == 1 and second["ss_new_sd_model_hash"] != first["ss_new_sd_model_hash"]


def test_model_hashes_of_a_diffusers_folder_hash_the_unet(tiny_model_path: Path, tmp_path: Path) -> None:
    unet = tiny_model_path / "unet" / "diffusion_pytorch_model.safetensors"
    result = hashes.model_hashes(tiny_model_path, cache_dir=tmp_path)
    assert result["ss_new_sd_model_hash"] == hashlib.sha256(unet.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        hashes.model_hashes(tmp_path / "missing", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no UNet .safetensors"):
        hashes.model_hashes(tmp_path / "empty", cache_dir=tmp_path)


def test_model_hashes_default_cache_is_atelier_cache(single_file: Path, atelier_cache: Path) -> None:
    hashes.model_hashes(single_file)
    assert str(single_file.resolve()) in json.loads((atelier_cache / hashes.CACHE_FILE).read_text())


# --- skeleton -----------------------------------------------------------------------------


def test_skeleton_loads_a_single_file_offline(base: BaseModel, single_file: Path, tiny_model_path: Path, tmp_path: Path) -> None:
    skeleton = tmp_path / "tiny-configs"
    assert cli("skeleton", tiny_model_path, skeleton) == 0
    files = {str(p.relative_to(skeleton)) for p in skeleton.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"} <= files  # fmt: skip
    assert not any(name.endswith(WEIGHT_SUFFIXES) for name in files)
    assert sum(p.stat().st_size for p in skeleton.rglob("*") if p.is_file()) < 200_000

    model = load_base_model(single_file, config=skeleton)
    assert_same_weights(model, base)
    assert model.tokenizer("atelier cube").input_ids == base.tokenizer("atelier cube").input_ids


def test_skeleton_refuses_to_overwrite_and_bad_sources(tiny_model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "configs"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert cli("skeleton", tiny_model_path, out) == 2
    assert "--force" in capsys.readouterr().err and (out / "mine.txt").exists()
    assert cli("skeleton", tiny_model_path, out, "--force") == 0
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".configs.")]

    assert cli("skeleton", tiny_model_path / "unet", tmp_path / "x") == 2
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a folder"):
        write_skeleton(tmp_path / "missing", tmp_path / "y")


# --- pickles ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: what a malicious .ckpt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _LightningCallback:
    """Stands for the pytorch_lightning objects old .ckpt files carry."""

    def __init__(self):
        self.best_model_score = 0.5


@pytest.fixture
def evil_ckpt(base: BaseModel, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "model.ckpt"
    state = {k: v.clone() for k, v in diffusers_to_ldm(base.unet, base.vae, base.text_encoder).items()}
    torch.save({"state_dict": state, "global_step": 10, "callbacks": _LightningCallback(), "payload": _Payload(marker)}, ckpt)
    assert not marker.exists()
    return ckpt, marker


def test_pickle_is_refused_without_allow_pickle_and_never_opened(evil_ckpt, tiny_model_path: Path, monkeypatch) -> None:
    ckpt, marker = evil_ckpt
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    with pytest.raises(ModelLoadError) as info:
        load_base_model(ckpt, config=tiny_model_path)
    message = str(info.value)
    assert "arbitrary code" in message and "atelier convert-ckpt" in message and "model.allow_pickle" in message
    assert opened == [] and not marker.exists()


def test_allow_pickle_loads_ckpt_without_running_its_code(base: BaseModel, evil_ckpt, tiny_model_path: Path) -> None:
    ckpt, marker = evil_ckpt
    model = load_base_model(ckpt, config=tiny_model_path, allow_pickle=True)
    assert not marker.exists()
    assert_same_weights(model, base)


def test_training_on_a_ckpt_needs_model_allow_pickle_and_records_its_hashes(
    evil_ckpt, tiny_model_path: Path, tmp_path: Path
) -> None:
    ckpt, marker = evil_ckpt
    model = [f"model.path={ckpt}", f"model.config={tiny_model_path}", "model.builtin=null"]
    args = [*model, "training.max_train_steps=1"]
    (tmp_path / "refused").mkdir()
    with pytest.raises(ModelLoadError, match="model.allow_pickle=true"):
        run_training(make_cfg(*args), tmp_path / "refused")
    assert not marker.exists()

    run_dir = tmp_path / "allowed"
    run_dir.mkdir()
    summary = run_training(make_cfg(*args, "model.allow_pickle=true"), run_dir)
    assert summary["status"] == "completed" and not marker.exists()
    _, meta = load_lora(run_dir / summary["output_file"])
    data = ckpt.read_bytes()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_sd_model_name"] == "model"


def test_convert_ckpt_needs_allow_pickle_and_runs_no_code(base: BaseModel, evil_ckpt, tiny_model_path: Path, capsys) -> None:
    ckpt, marker = evil_ckpt
    out = ckpt.with_suffix(".safetensors")
    assert cli("convert-ckpt", ckpt, out) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists() and not marker.exists()

    assert cli("convert-ckpt", ckpt, out, "--allow-pickle") == 0
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert "SD 1.x" in printed and "io.open" in printed and "_LightningCallback" in printed
    assert load_file(str(out)).keys() == diffusers_to_ldm(base.unet, base.vae, base.text_encoder).keys()
    assert_same_weights(load_base_model(out, config=tiny_model_path), base)

    out.write_bytes(b"precious")
    assert cli("convert-ckpt", ckpt, out, "--allow-pickle") == 2 and out.read_bytes() == b"precious"
    assert cli("convert-ckpt", ckpt, out, "--allow-pickle", "--force", "--save-precision", "fp16") == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(out)).values() if v.is_floating_point())


# --- which model is a single file -------------------------------------------------------------

SD1_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "first_stage_model.encoder.conv_in.weight"]  # fmt: skip
SD2_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "first_stage_model.encoder.conv_in.weight"]  # fmt: skip
SDXL_KEYS = [
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.text_projection",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
    "first_stage_model.decoder.conv_out.weight",
]
SDXL_REFINER_KEYS = ["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
                     "model.diffusion_model.label_emb.0.0.weight"]  # fmt: skip


def header_only(path: Path, keys: list[str], metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file with the given keys and no data (empty tensors): only the header matters."""
    save_file({k: torch.zeros(0) for k in keys}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("keys", "metadata", "version", "v", "what"),
    [
        (SD1_KEYS, None, "sd1", False, "SD 1.x"),
        (SD2_KEYS, None, "sd2", None, "512 epsilon or 768-v"),
        (SD2_KEYS, {"modelspec.prediction_type": "v"}, "sd2", True, "768-v"),
        (SD2_KEYS, {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "sd2", True, "768-v"),
        (SD2_KEYS, {"modelspec.architecture": "stable-diffusion-v2-512"}, "sd2", False, "epsilon"),
        (SDXL_KEYS, None, "sdxl", False, "SDXL base"),
        (SDXL_REFINER_KEYS, None, "sdxl", False, "SDXL refiner"),
    ],
)
def test_identify_single_file(tmp_path: Path, keys, metadata, version, v, what) -> None:
    info = inspect_single_file(header_only(tmp_path / "m.safetensors", keys, metadata))
    assert (info.version, info.v_parameterization) == (version, v) and what in info.description


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], ["LoRA"]),
        (["double_blocks.0.img_attn.qkv.weight"], ["Flux"]),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], ["Stable Diffusion 3"]),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], ["diffusers UNet", "model_index.json"]),
        (["encoder.down.0.block.0.conv1.weight", "decoder.conv_out.weight"], ["a VAE", "model.vae"]),
        (["model.diffusion_model.input_blocks.0.0.weight"], ["without a text encoder"]),
        (["text_model.encoder.layers.0.mlp.fc1.weight"], ["no model.diffusion_model"]),
    ],
)
def test_identify_single_file_names_what_else_it_is(keys: list[str], words: list[str]) -> None:
    with pytest.raises(ModelLoadError) as info:
        identify_single_file(keys, file="x.safetensors")
    assert all(word in str(info.value) for word in words), str(info.value)


def test_inpainting_checkpoint_is_refused() -> None:
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    with pytest.raises(ModelLoadError, match="inpainting"):
        identify_single_file(SD1_KEYS, shapes=shapes)


def test_load_base_model_on_detected_files(tmp_path: Path) -> None:
    sdxl = header_only(tmp_path / "sdxl.safetensors", SDXL_KEYS)
    with pytest.raises(ModelLoadError, match="SDXL checkpoint; SDXL single-file checkpoints cannot be loaded yet"):
        load_base_model(sdxl)
    refiner = header_only(tmp_path / "refiner.safetensors", SDXL_REFINER_KEYS)
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_base_model(refiner)
    sd2 = header_only(tmp_path / "sd2.safetensors", SD2_KEYS)
    with pytest.raises(ModelLoadError, match="model.version=sd1, .*is an sd2 checkpoint.*set model.version=sd2"):
        load_base_model(sd2, version="sd1")
    flux = header_only(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight"])
    with pytest.raises(ModelLoadError, match="model.path: .* is a Flux checkpoint.*Train it with model=flux1"):
        load_base_model(flux)


def test_sd2_prediction_type_mismatch_warns(tmp_path: Path, caplog) -> None:
    from atelier.models.sources import check_single_file

    sd2_v = header_only(tmp_path / "sd2v.safetensors", SD2_KEYS, {"modelspec.prediction_type": "v"})
    check_single_file(sd2_v, "model.path", "sd2", v_parameterization=True)
    assert "ruins" not in caplog.text
    check_single_file(sd2_v, "model.path", "sd2", v_parameterization=False)
    assert "model.v_parameterization=False" in caplog.text and "768-v" in caplog.text
