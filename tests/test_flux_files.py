"""[10] FLUX.1 single files (atelier.models.flux_files) on tiny-flux: written as BFL / ComfyUI
files and loaded back with the tiny-flux folder as the config folder, checked against diffusers'
converter at FLUX.1's sizes and against sd-scripts' own FLUX model (library/flux_models.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atelier.models import flux_architectures as flux
from atelier.models.flux_files import (COMFY_PREFIX, FP8, flux_transformer_to_bfl, flux_transformer_to_diffusers,
                                       load_flux_single_files, write_flux_single_files)  # fmt: skip
from atelier.models.load_errors import ModelLoadError
from atelier.models.tiny import TINY_FLUX_NAME, ensure_tiny_model

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# Round to nearest: at most half a step, |x| * 2^-(mantissa bits + 1) for a normal value, half the
# smallest subnormal below the normal range: fp8 e4m3fn 3 bits, subnormal step 2^-9; fp16 10 bits,
# step 2^-24; bf16 7 bits (float32's range: no subnormal at weight scales).
ROUNDING = {FP8: (2**-4, 2**-10), torch.float16: (2**-11, 2**-25), torch.bfloat16: (2**-8, 0.0), torch.float32: (0.0, 0.0)}
SD_SCRIPTS = Path(os.environ.get("SD_SCRIPTS_MIRROR", "/work/.mirror/kohya-ss+sd-scripts/repo"))


@pytest.fixture(scope="module")
def tiny_flux_path(atelier_cache: Path) -> Path:
    return ensure_tiny_model(atelier_cache, TINY_FLUX_NAME)


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_path)


@pytest.fixture(scope="module")
def files(pipeline, tmp_path_factory) -> dict[str, Path]:
    """tiny-flux as float32 single files."""
    return write_flux_single_files(pipeline, tmp_path_factory.mktemp("flux-files"), transformer_dtype=torch.float32,
                                   t5_dtype=torch.float32, clip_dtype=torch.float32)  # fmt: skip


def load(files: dict[str, Path], config: Path, **changes):
    paths = {**files, **changes}
    return load_flux_single_files(paths["transformer"], paths["ae"], paths["clip_l"], paths["t5xxl"], config)


def keys_of(path: Path) -> list[str]:
    with safe_open(path, "pt") as handle:
        return list(handle.keys())


def test_float32_files_load_back_exactly(files, pipeline, tiny_flux_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing is downloaded
    assert {name: path.name for name, path in files.items()} == {
        "transformer": "flux1-dev.safetensors", "ae": "ae.safetensors", "clip_l": "clip_l.safetensors",
        "t5xxl": "t5xxl_fp32.safetensors"}  # fmt: skip
    assert not list(files["ae"].parent.glob(".*.tmp"))  # atomic writes leave no temp file
    loaded = load(files, tiny_flux_path)
    for name in COMPONENTS:
        original, back = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert back.keys() == original.keys(), name
        assert all(value.dtype == torch.float32 and value.device.type == "cpu" for value in back.values())
        assert all(torch.equal(back[key], original[key]) for key in original), name
    assert loaded.text_encoder_2.shared.weight is loaded.text_encoder_2.encoder.embed_tokens.weight  # still tied
    assert loaded.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert loaded.tokenizer("a cat").input_ids == pipeline.tokenizer("a cat").input_ids
    assert loaded.tokenizer_2("a cat").input_ids == pipeline.tokenizer_2("a cat").input_ids


def test_the_files_have_the_keys_bfl_and_comfyui_use(files):
    transformer = keys_of(files["transformer"])
    for key in ("double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
                "single_blocks.2.linear1.weight", "img_in.weight", "txt_in.bias", "time_in.in_layer.weight",
                "vector_in.out_layer.bias", "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight"):
        assert key in transformer
    assert not [key for key in transformer if "transformer_blocks" in key or "to_q" in key]
    ae = keys_of(files["ae"])
    assert "encoder.down.0.block.0.norm1.weight" in ae and "decoder.up.2.upsample.conv.weight" in ae
    assert not [key for key in ae if "quant_conv" in key]  # FLUX's AE has none
    assert load_file(files["ae"])["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs, as in ae.safetensors
    assert all(key.startswith("text_model.") for key in keys_of(files["clip_l"]))
    t5 = keys_of(files["t5xxl"])
    assert "shared.weight" in t5 and "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in t5


def test_fp8_and_bf16_files_load_within_their_rounding(pipeline, tiny_flux_path, tmp_path):
    """The loaded float32 weights are exactly the cast ones (fp8 files: matrices fp8, vectors bf16;
    clip_l fp16), so within each format's rounding of the original (ROUNDING)."""
    files = write_flux_single_files(pipeline, tmp_path, transformer_dtype=FP8, t5_dtype=FP8)
    assert files["t5xxl"].name == "t5xxl_fp8_e4m3fn.safetensors"
    with safe_open(files["t5xxl"], "pt") as handle:
        assert handle.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == FP8
    loaded = load_flux_single_files(*(files[part] for part in ("transformer", "ae", "clip_l", "t5xxl")), tiny_flux_path)
    for name, matrices_as, default in (("transformer", FP8, torch.bfloat16), ("text_encoder_2", FP8, torch.bfloat16),
                                       ("text_encoder", torch.float16, torch.float16), ("vae", None, None)):  # fmt: skip
        original, back = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        for key, value in original.items():
            dtype = (matrices_as if value.ndim >= 2 else default) or torch.float32
            assert back[key].dtype == torch.float32
            assert torch.equal(back[key], value.to(dtype).float()), (name, key)
            relative, absolute = ROUNDING[dtype]
            bound = value.abs() * relative + absolute
            assert ((back[key] - value).abs() <= bound).all(), (name, key)


def test_a_comfyui_prefixed_transformer_loads(pipeline, files, tiny_flux_path, tmp_path):
    # Written from the folder this time (write_flux_single_files takes a FluxPipeline or its folder).
    prefixed = write_flux_single_files(tiny_flux_path, tmp_path, transformer_dtype=torch.float32, key_prefix=COMFY_PREFIX)
    keys = keys_of(prefixed["transformer"])
    assert all(key.startswith(COMFY_PREFIX) for key in keys)
    # A ComfyUI all-in-one checkpoint also holds the AE / text encoders under other prefixes: ignored.
    checkpoint = {**load_file(prefixed["transformer"]), "vae.encoder.conv_in.weight": torch.zeros(1)}
    save_file(checkpoint, tmp_path / "flux1-dev-comfy.safetensors")
    loaded = load(files, tiny_flux_path, transformer=tmp_path / "flux1-dev-comfy.safetensors")
    original = pipeline.transformer.state_dict()
    assert all(torch.equal(loaded.transformer.state_dict()[key], original[key]) for key in original)


def test_our_transformer_conversion_is_diffusers_at_flux1_sizes():
    """diffusers' converter splits with FLUX.1's fixed width (3072), so it is compared at FLUX.1-dev's
    sizes: every BFL tensor gets FLUX.1's rows and 1 column, each row a distinct number, so that a
    wrong split, order or swap shows in the values without FLUX.1's 12B parameters."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux.flux_transformer_config("dev"))
    bfl_shapes = {key: value.shape for key, value in flux_transformer_to_bfl(model.state_dict()).items()}
    assert len([key for key in bfl_shapes if key.endswith("img_attn.qkv.weight")]) == 19
    assert bfl_shapes["single_blocks.37.linear1.weight"] == (3 * 3072 + 4 * 3072, 3072)
    bfl, start = {}, 0
    for key, shape in bfl_shapes.items():
        bfl[key] = torch.arange(start, start + shape[0], dtype=torch.float64).reshape(shape[0], *[1] * (len(shape) - 1))
        start += shape[0]
    ours = flux_transformer_to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    back = flux_transformer_to_bfl(ours)
    assert back.keys() == bfl.keys() and all(torch.equal(back[key], bfl[key]) for key in bfl)


@pytest.fixture(scope="module")
def sd_scripts_flux_models(tmp_path_factory):
    """sd-scripts' library/flux_models.py from its mirror (its torch-only helpers beside it; library.utils,
    which pulls torchvision and cv2, stubbed), imported without installing sd-scripts."""
    if not (SD_SCRIPTS / "HEAD").exists():
        pytest.skip(f"no sd-scripts mirror at {SD_SCRIPTS}")
    root = tmp_path_factory.mktemp("sd-scripts")
    (root / "library").mkdir()
    for name in ("flux_models", "device_utils", "custom_offloading_utils"):
        source = subprocess.run(["git", "-C", str(SD_SCRIPTS), "show", f"HEAD:library/{name}.py"],
                                capture_output=True, check=True, text=True).stdout  # fmt: skip
        (root / "library" / f"{name}.py").write_text(source)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "utils.py").write_text("def setup_logging(*args, **kwargs):\n    pass\n")
    saved = {name: module for name, module in sys.modules.items() if name == "library" or name.startswith("library.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import library.flux_models as flux_models

        yield flux_models
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name == "library" or name.startswith("library.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_sd_scripts_flux_model_takes_our_files_and_computes_as_diffusers(sd_scripts_flux_models, files, pipeline):
    """Our BFL transformer file loads strictly into sd-scripts' Flux of tiny-flux's params (same keys and
    shapes) and gives diffusers' output; our ae.safetensors loads strictly into its AutoEncoder."""
    fm, config = sd_scripts_flux_models, flux.tiny_flux_config("transformer")
    params = fm.FluxParams(in_channels=64, vec_in_dim=config["pooled_projection_dim"],
                           context_in_dim=config["joint_attention_dim"], hidden_size=32, mlp_ratio=4.0, num_heads=2,
                           depth=2, depth_single_blocks=3, axes_dim=list(config["axes_dims_rope"]), theta=10_000,
                           qkv_bias=True, guidance_embed=True)  # fmt: skip
    model = fm.Flux(params).eval()
    model.load_state_dict(load_file(files["transformer"]), strict=True)
    vae = flux.tiny_flux_config("vae")
    ae = fm.AutoEncoder(fm.AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 2],
                                             num_res_blocks=1, z_channels=16, scale_factor=vae["scaling_factor"],
                                             shift_factor=vae["shift_factor"]))  # fmt: skip
    ae.load_state_dict(load_file(files["ae"]), strict=True)

    generator = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 64, generator=generator), torch.randn(1, 5, 32, generator=generator)
    pooled, t, guidance = torch.randn(1, 32, generator=generator), torch.tensor([0.7]), torch.tensor([3.5])
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    img_ids, txt_ids = img_ids.reshape(16, 3), torch.zeros(5, 3)
    with torch.no_grad():
        theirs = model(img=img, img_ids=img_ids[None], txt=txt, txt_ids=txt_ids[None], timesteps=t, y=pooled,
                       guidance=guidance)  # fmt: skip
        ours = pipeline.transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,
                                    timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample  # fmt: skip
    assert (theirs - ours).abs().max() < 1e-5


# ---- errors: each names the file and its option, and says how to fix it ----


def test_a_missing_file_and_a_non_safetensors_file_are_named(files, tiny_flux_path, tmp_path):
    with pytest.raises(ModelLoadError, match=r"model\.ae: '.*nowhere\.safetensors' does not exist\. Set model\.ae"):
        load(files, tiny_flux_path, ae=tmp_path / "nowhere.safetensors")
    (tmp_path / "t5xxl.ckpt").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"model\.t5xxl: '.*t5xxl\.ckpt' is not a \.safetensors file"):
        load(files, tiny_flux_path, t5xxl=tmp_path / "t5xxl.ckpt")
    with pytest.raises(ModelLoadError, match=r"model\.config: '.*' is not a diffusers FLUX\.1 folder: it lacks "
                                             r"model_index\.json.*Set model\.config"):  # fmt: skip
        load(files, tmp_path)


def test_an_sd_checkpoint_as_the_transformer_is_refused(files, tiny_flux_path, tmp_path):
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, sdxl)
    with pytest.raises(ModelLoadError) as error:
        load(files, tiny_flux_path, transformer=sdxl)
    message = str(error.value)
    assert message.startswith(f"model.path: '{sdxl}' holds a Stable Diffusion / SDXL checkpoint")
    assert "set model.path to flux1-dev.safetensors" in message


@pytest.mark.parametrize(
    ("option", "given", "says"),
    [("transformer", "ae", r"model\.path: '.*ae\.safetensors' holds FLUX's autoencoder .*It belongs in model\.ae"),
     ("ae", "transformer", r"model\.ae: '.*flux1-dev\.safetensors' holds a FLUX\.1 transformer .*belongs in model\.path"),
     ("clip_l", "t5xxl", r"model\.clip_l: '.*t5xxl_fp32\.safetensors' holds a T5-XXL encoder .*model\.t5xxl to it"),
     ("t5xxl", "clip_l", r"model\.t5xxl: '.*clip_l\.safetensors' holds a CLIP-L text encoder .*model\.clip_l to it")],
)  # fmt: skip
def test_files_given_to_the_wrong_option_are_named(files, tiny_flux_path, option, given, says):
    with pytest.raises(ModelLoadError, match=says):
        load(files, tiny_flux_path, **{option: files[given]})


def test_a_transformer_of_another_size_than_the_config_is_refused(files, tiny_flux_path, tmp_path):
    config = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_flux_path, config)
    dev = {"_class_name": "FluxTransformer2DModel", **flux.flux_transformer_config("dev")}
    (config / "transformer" / "config.json").write_text(json.dumps(dev))  # FLUX.1-dev's configs, tiny weights
    with pytest.raises(ModelLoadError) as error:
        load(files, config)
    message = str(error.value)
    assert message.startswith(f"model.path: '{files['transformer']}' does not fit model.config '{config}'")
    assert "19 double / 38 single blocks; file: 2 double / 3 single" in message
    assert "img_in.weight: [32, 64] in the file, [3072, 64] by the config" in message
    assert "Set model.config to the diffusers folder of this file's model" in message


def test_a_schnell_file_with_a_dev_config_is_refused(files, tiny_flux_path, tmp_path):
    schnell = tmp_path / "flux1-schnell.safetensors"
    save_file({k: v for k, v in load_file(files["transformer"]).items() if not k.startswith("guidance_in.")}, schnell)
    with pytest.raises(ModelLoadError, match=r"model\.path: '.*flux1-schnell\.safetensors' is a FLUX\.1-schnell "
                                             r"transformer \(no guidance_in\), but model\.config '.*' describes FLUX\.1-dev"
                                             r".*guidance_embeds=true\)\. Set model\.config to a FLUX\.1-schnell"):  # fmt: skip
        load(files, tiny_flux_path, transformer=schnell)


def test_a_scaled_fp8_file_is_refused(files, tiny_flux_path, tmp_path):
    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({**load_file(files["t5xxl"]), "scaled_fp8": torch.zeros(2)}, scaled)
    with pytest.raises(ModelLoadError, match=r"model\.t5xxl: '.*_scaled\.safetensors' is a scaled fp8 file"):
        load(files, tiny_flux_path, t5xxl=scaled)
