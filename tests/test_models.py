"""The base-model layer: the tiny model, loading, single-file conversion, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atelier.models import architectures, loading, sources, tiny
from atelier.models.ldm_convert import diffusers_to_ldm, vae_to_ldm
from atelier.models.loading import ModelLoadError, load_base_model
from atelier.models.tiny import TINY_MODEL_DIRNAME, ensure_tiny_model
from tests.builders import save_single_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("unet", "vae", "text_encoder")


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _assert_same_weights(a, b) -> None:
    for part in PARTS:
        expected, actual = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert expected.keys() == actual.keys(), part
        for key in expected:
            assert actual[key].dtype == torch.float32, f"{part}.{key}"
            assert torch.equal(expected[key], actual[key]), f"{part}.{key}"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path: Path) -> loading.BaseModel:
    return load_base_model(None, builtin="tiny-sd15")


@pytest.fixture(scope="module")
def tiny_single_file(tiny_model: loading.BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    save_single_file(path, tiny_model.unet, tiny_model.vae, tiny_model.text_encoder)
    return path


# --- the tiny model -----------------------------------------------------------------


def test_tiny_model_folder_is_a_standard_pipeline(tiny_model_path: Path) -> None:
    assert tiny_model_path.name == TINY_MODEL_DIRNAME
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_path / part).is_dir()
    assert not list(tiny_model_path.parent.glob(f".{TINY_MODEL_DIRNAME}.*")), "staging folder left behind"


def test_tiny_model_build_is_deterministic(tiny_model_path: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    other = ensure_tiny_model(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the build must not touch the global RNG"
    assert other != tiny_model_path
    assert _file_hashes(other) == _file_hashes(tiny_model_path)


def test_second_call_does_not_rebuild(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in tiny_model_path.rglob("*")}
    monkeypatch.setattr(tiny, "build_tiny_model", lambda folder: pytest.fail("rebuilt an existing model"))
    start = time.perf_counter()
    assert ensure_tiny_model(tiny_model_path.parent) == tiny_model_path
    assert time.perf_counter() - start < 0.05
    assert {p: p.stat().st_mtime_ns for p in tiny_model_path.rglob("*")} == mtimes


def test_second_call_imports_no_torch(tiny_model_path: Path) -> None:
    code = (
        "import sys; from atelier.models.tiny import ensure_tiny_model; "
        f"print(ensure_tiny_model({str(tiny_model_path.parent)!r})); "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tiny_model_path)


def _fake_build(marker: str):
    def build(folder: Path) -> None:
        (Path(folder) / "model_index.json").write_text(marker)

    return build


def test_race_loser_uses_the_winners_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / TINY_MODEL_DIRNAME

    def build_while_another_process_wins(folder: Path) -> None:
        _fake_build("loser")(folder)
        target.mkdir()
        _fake_build("winner")(target)

    monkeypatch.setattr(tiny, "build_tiny_model", build_while_another_process_wins)
    assert ensure_tiny_model(tmp_path) == target
    assert (target / "model_index.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_DIRNAME]


def test_incomplete_folder_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / TINY_MODEL_DIRNAME / "unet").mkdir(parents=True)
    monkeypatch.setattr(tiny, "build_tiny_model", _fake_build("fresh"))
    target = ensure_tiny_model(tmp_path)
    assert (target / "model_index.json").read_text() == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_DIRNAME]


def test_a_cached_model_whose_component_lost_its_weights_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    # A damaged cache (here: text_encoder/ emptied) would fail every run with "no .safetensors weights".
    damaged = tmp_path / TINY_MODEL_DIRNAME
    (damaged / "text_encoder").mkdir(parents=True)
    (damaged / "model_index.json").write_text("damaged")
    monkeypatch.setattr(tiny, "build_tiny_model", _fake_build("fresh"))
    assert (ensure_tiny_model(tmp_path) / "model_index.json").read_text() == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_DIRNAME]


def test_cache_dir_defaults_to_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path
    monkeypatch.delenv("ATELIER_CACHE")
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "kohya-atelier"


def test_tokenizer_matches_text_encoder(tiny_model: loading.BaseModel) -> None:
    tokenizer, config = tiny_model.tokenizer, tiny_model.text_encoder.config
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    ids = tokenizer("A photo of a cat, 4K!", padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, tokenizer.model_max_length) == (1, 77)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.eos_token_id
    unpadded = tokenizer("A photo of a cat, 4K!").input_ids
    assert tokenizer.unk_token_id not in unpadded[1:-1]  # every character has a token
    # Lowercased; CLIP decoding puts a space after every pre-token ("cat ,").
    assert tokenizer.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "aphotoofacat,4k!"


def test_pipeline_runs_inference(tiny_model_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipeline(
        "a cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert images.min() >= 0 and images.max() <= 1


# --- loading ------------------------------------------------------------------------


def test_load_builtin(tiny_model: loading.BaseModel, tiny_model_path: Path) -> None:
    # Hydra configs may leave unset keys as empty strings.
    assert load_base_model("", builtin="tiny-sd15", config="", vae="").path == tiny_model.path
    assert tiny_model.name == "tiny-sd15"
    assert tiny_model.path == str(tiny_model_path.resolve())
    assert (tiny_model.version, tiny_model.v_parameterization) == ("sd1", False)
    assert tiny_model.noise_scheduler.config.prediction_type == "epsilon"
    assert tiny_model.noise_scheduler.config.num_train_timesteps == 1000
    for part in PARTS:
        params = list(getattr(tiny_model, part).parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad for p in params)
    assert tiny_model.unet.config.cross_attention_dim == tiny_model.text_encoder.config.hidden_size


def test_load_diffusers_folder_is_the_builtin_path(tiny_model: loading.BaseModel, tiny_model_path: Path) -> None:
    model = load_base_model(str(tiny_model_path), v_parameterization=True)
    assert model.name == TINY_MODEL_DIRNAME
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_same_weights(tiny_model, model)


def test_single_file_round_trip(tiny_model: loading.BaseModel, tiny_single_file: Path, tiny_model_path: Path) -> None:
    model = load_base_model(tiny_single_file, config=tiny_model_path)
    assert model.name == "tiny-sd15" and model.path == str(tiny_single_file.resolve())
    _assert_same_weights(tiny_model, model)


def test_fp16_single_file_loads_as_float32(
    tiny_model: loading.BaseModel, tiny_model_path: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state_dict = diffusers_to_ldm(tiny_model.unet, tiny_model.vae, tiny_model.text_encoder)
    path = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in state_dict.items()}, str(path))
    model = load_base_model(path, config=tiny_model_path)
    for part in PARTS:
        assert {p.dtype for p in getattr(model, part).parameters()} == {torch.float32}


def test_separate_vae(
    tiny_model: loading.BaseModel, tiny_single_file: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    other = {k: (v + 1).contiguous() for k, v in vae_to_ldm(tiny_model.vae).items()}
    vae_file = tmp_path / "other-vae.safetensors"
    save_file(other, str(vae_file))
    expected = {k: v + 1 for k, v in tiny_model.vae.state_dict().items()}
    for base in (tiny_single_file, tiny_model_path):
        model = load_base_model(base, config=tiny_model_path, vae=vae_file)
        assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in expected.items())

    # A diffusers VAE folder, or a pipeline folder whose VAE to take.
    for vae in (tiny_model_path / "vae", tiny_model_path):
        model = load_base_model(tiny_single_file, config=tiny_model_path, vae=vae)
        assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in tiny_model.vae.state_dict().items())


def test_full_size_sd15_shapes_on_meta() -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with torch.device("meta"):
        unet = architectures.build_unet("sd15")
        vae = architectures.build_vae("sd15")
        text_encoder = architectures.build_text_encoder("sd15")

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(unet) == 859_520_964
    assert count(text_encoder) == 123_060_480
    assert count(vae) == 83_653_863

    state_dict = diffusers_to_ldm(unet, vae, text_encoder)
    prefixes = ("model.", "first_stage_model.", "cond_stage_model.")
    by_prefix = {p: sum(k.startswith(p) for k in state_dict) for p in prefixes}
    # The key counts of the SD1.5 release files (without the position_ids buffer).
    assert by_prefix == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    known = {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    }
    assert {k: tuple(state_dict[k].shape) for k in known} == known

    # diffusers' own LDM -> diffusers converter maps every key back where it came from.
    for module, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(state_dict, dict(module.config))
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_noise_scheduler_config() -> None:
    scheduler = architectures.build_noise_scheduler(v_parameterization=False)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.clip_sample is False
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert architectures.build_noise_scheduler(True).config.prediction_type == "v_prediction"


# --- errors -------------------------------------------------------------------------


def _expect_error(*words: str, **kwargs) -> str:
    path = kwargs.pop("path", None)
    with pytest.raises(ModelLoadError) as info:
        load_base_model(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


def test_error_path_does_not_exist(tmp_path: Path) -> None:
    _expect_error("model.path", str(tmp_path / "nope"), "does not exist", path=tmp_path / "nope")


def test_error_component_subfolder(tiny_model_path: Path) -> None:
    _expect_error("model.path", "unet/ subfolder", str(tiny_model_path), path=tiny_model_path / "unet")


def test_error_bare_model_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_path / "unet", tmp_path / "my-unet")
    _expect_error("model.path", "UNet2DConditionModel", "model_index.json", path=tmp_path / "my-unet")


def test_error_not_a_pipeline_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    _expect_error("model.path", "not a diffusers pipeline folder", "model.safetensors", path=tmp_path)


@pytest.mark.parametrize("suffix", [".gguf", ".onnx", ".txt"])
def test_error_unsupported_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"x")
    _expect_error("model.path", "unsupported file type", suffix, str(path), path=path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_error_pickles_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even a pickle: opening it would raise something else")
    _expect_error("model.path", "pickle", "arbitrary code", "safetensors", path=path)


def test_error_pickled_pipeline_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "old-pipeline"
    shutil.copytree(tiny_model_path, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    _expect_error("model.path", "pickle", "diffusion_pytorch_model.bin", path=folder)


def test_error_single_file_without_config(tiny_single_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A repo no cache has, so the test doesn't depend on what this machine cached.
    monkeypatch.setitem(sources.DEFAULT_CONFIG_REPOS, "sd1", "atelier-tests/not-cached")
    _expect_error("model.config", "local diffusers folder", str(tiny_single_file), path=tiny_single_file)


def test_error_bad_config(tiny_single_file: Path, tiny_model_path: Path, tmp_path: Path) -> None:
    _expect_error("model.config", "does not exist", path=tiny_single_file, config=tmp_path / "missing")
    _expect_error("model.config", "unet/ subfolder", path=tiny_single_file, config=tiny_model_path / "unet")


def test_error_bad_vae(tiny_model_path: Path, tmp_path: Path) -> None:
    _expect_error("model.vae", "does not exist", path=tiny_model_path, vae=tmp_path / "vae.safetensors")
    (tmp_path / "vae.pt").write_bytes(b"x")
    _expect_error("model.vae", "pickle", path=tiny_model_path, vae=tmp_path / "vae.pt")
    _expect_error("model.vae", "neither", path=tiny_model_path, vae=tmp_path)


def test_error_not_a_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    lora = tmp_path / "my-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    _expect_error("model.path", "LoRA", path=lora)
    corrupt = tmp_path / "truncated.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00")
    _expect_error("model.path", "not a readable .safetensors", path=corrupt)


def test_error_sdxl(tmp_path: Path) -> None:
    _expect_error("model.version=sdxl", "not an SDXL model", builtin="tiny-sd15", version="sdxl")
    _expect_error("model.version=sd1", "is an SDXL model", "model.version=sdxl", builtin="tiny-sdxl", version="sd1")
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2)}, str(path))
    _expect_error("SDXL single-file checkpoints cannot be loaded yet", "diffusers folder", path=path, version="sdxl")


def test_error_version_mismatch(tiny_single_file: Path, tiny_model_path: Path) -> None:
    _expect_error("model.version=sd2", "sd1 checkpoint", path=tiny_single_file, config=tiny_model_path, version="sd2")
    with torch.device("meta"):
        unet = architectures.build_unet("sd15")
    with pytest.raises(ModelLoadError, match="model.version=sd2, .* is an sd1 model.*set model.version=sd1"):
        loading._check_matches_version(unet, "sd2", Path("sd15"))


def test_error_arguments() -> None:
    _expect_error("model.version", "sd3", builtin="tiny-sd15", version="sd3")
    _expect_error("model.path", "model.builtin", path="x", builtin="tiny-sd15")
    _expect_error("model.builtin", "tiny-sd15", builtin="huge")
    _expect_error("model.path is not set", "model.builtin=tiny-sd15")


def test_ensure_tiny_model_uses_env_cache(atelier_cache: Path) -> None:
    assert os.environ["ATELIER_CACHE"] == str(atelier_cache)
    assert ensure_tiny_model() == atelier_cache / TINY_MODEL_DIRNAME
