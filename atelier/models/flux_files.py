"""FLUX.1 as the single files users have (sd-scripts' flux_train_network.py and ComfyUI take them).

- the transformer in BFL (Black Forest Labs) keys: `double_blocks.N.img_attn.qkv.weight`,
  `single_blocks.N.linear1.weight`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`
  (dev only), `final_layer`; bf16 or fp8 (float8_e4m3fn); ComfyUI checkpoints prefix the keys with
  `model.diffusion_model.` (and may hold the other parts under other prefixes, ignored here);
- `ae.safetensors`: BFL's AE in LDM keys (`encoder.down.0.block.0.norm1.weight`), no quant convs;
- `clip_l.safetensors`: HF CLIPTextModel keys (`text_model.*`, sometimes `text_projection`);
- `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`: HF T5EncoderModel keys.

Loading follows sd-scripts' library/flux_utils.py (load_flow_model, load_ae, load_clip_l,
load_t5xxl) into diffusers / transformers modules built from a local diffusers FLUX folder's
configs; each file's keys and shapes are read from its header (safe_open) and checked first, so
a wrong file is named with its option (model.path, .ae, .clip_l, .t5xxl, .config) and the fix.
diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes FLUX.1's width (3072) to
split `linear1`, so no other width (the tiny model) converts; the transformer is converted both
ways from one key table (flux_key_table), tested equal to diffusers' converter at FLUX.1's sizes.
The AE is read by diffusers' convert_ldm_vae_checkpoint, written by ldm_convert.vae_to_ldm.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atelier.models.ldm_convert import text_encoder_to_ldm, vae_to_ldm
from atelier.models.load_errors import ModelLoadError, read_json, reraise_as_load_error
from atelier.utils.atomic import atomic_path

PathLike = str | os.PathLike
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
COMFY_PREFIX = "model.diffusion_model."
OPTIONS = {"transformer": "model.path", "ae": "model.ae", "clip_l": "model.clip_l", "t5xxl": "model.t5xxl"}
USUAL_NAMES = {"transformer": "flux1-dev.safetensors", "ae": "ae.safetensors", "clip_l": "clip_l.safetensors",
               "t5xxl": "t5xxl_fp16.safetensors"}  # fmt: skip
_HOLDS = {
    "transformer": "a FLUX.1 transformer (double_blocks.*, single_blocks.*)",
    "ae": "FLUX's autoencoder (encoder.down.*, decoder.up.*)",
    "clip_l": "a CLIP-L text encoder (text_model.encoder.layers.*)",
    "t5xxl": "a T5-XXL encoder (encoder.block.*)",
    "sd": "a Stable Diffusion / SDXL checkpoint (model.diffusion_model.input_blocks.*, first_stage_model.*)",
}
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "tokenizer", "tokenizer_2", "scheduler/scheduler_config.json")  # fmt: skip

# BFL module -> the diffusers modules whose weights it stacks on dim 0, in order (sd-scripts'
# BFL_TO_DIFFUSERS_MAP says the same). Linear modules: each maps .weight and .bias.
_TOP_LINEARS = {
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "img_in": ("x_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),  # halves swapped, see _SWAPPED
}
_DOUBLE_LINEARS = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_SINGLE_LINEARS = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # q, k, v, then the MLP's input
    "linear2": ("proj_out",),
}
# RMSNorm scales: BFL's `.scale` is diffusers' `.weight`.
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                 "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}  # fmt: skip
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
# BFL's final modulation yields (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
_SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def _block_count(keys: Iterable[str], prefix: str) -> int:
    indices = {int(key.split(".")[1]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def flux_key_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """BFL key -> the diffusers keys stacked (dim 0, in order) into it, for a FLUX.1 transformer with
    `num_double` double-stream and `num_single` single-stream blocks (guidance_in included)."""
    table: dict[str, tuple[str, ...]] = {}

    def add(bfl: str, linears: dict, norms: dict, diffusers_prefix: str) -> None:
        for module, targets in linears.items():
            for param in ("weight", "bias"):
                table[f"{bfl}{module}.{param}"] = tuple(f"{diffusers_prefix}{t}.{param}" for t in targets)
        for scale, weight in norms.items():
            table[f"{bfl}{scale}"] = (f"{diffusers_prefix}{weight}",)

    add("", _TOP_LINEARS, {}, "")
    for i in range(num_double):
        add(f"double_blocks.{i}.", _DOUBLE_LINEARS, _DOUBLE_NORMS, f"transformer_blocks.{i}.")
    for i in range(num_single):
        add(f"single_blocks.{i}.", _SINGLE_LINEARS, _SINGLE_NORMS, f"single_transformer_blocks.{i}.")
    return table


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensor.chunk(2, dim=0)[::-1], dim=0)


def flux_transformer_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL keys (the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers, sd-scripts' convert_diffusers_sd_to_bfl):
    q/k/v (and single blocks' proj_mlp) concatenated on dim 0 into one qkv / linear1, norm
    `.weight` -> `.scale`, final modulation halves swapped. Raises KeyError on a key it does not map."""
    table = flux_key_table(_block_count(state_dict, "transformer_blocks."),
                           _block_count(state_dict, "single_transformer_blocks."))  # fmt: skip
    mapped = {part for parts in table.values() for part in parts}
    unknown = sorted(set(state_dict) - mapped)
    if unknown:
        raise KeyError(f"diffusers FLUX transformer keys without a BFL name: {unknown[:5]}")
    converted = {}
    for bfl, parts in table.items():
        if all(part in state_dict for part in parts):  # guidance_in only in dev
            tensors = [state_dict[part] for part in parts]
            converted[bfl] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    for key in _SWAPPED:
        converted[key] = _swap_halves(converted[key])
    return converted


def flux_transformer_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-keyed FLUX.1 transformer (the `model.diffusion_model.` prefix removed) in diffusers'
    keys: the inverse of flux_transformer_to_bfl. The fused rows split into parts of the hidden
    size (img_in's rows, 3072 in FLUX.1), the single blocks' MLP part taking the rest (4 x 3072)."""
    hidden = state_dict["img_in.weight"].shape[0]
    table = flux_key_table(_block_count(state_dict, "double_blocks."), _block_count(state_dict, "single_blocks."))
    state_dict = {key: _swap_halves(value) if key in _SWAPPED else value for key, value in state_dict.items()}
    converted = {}
    for bfl, parts in table.items():
        if bfl not in state_dict:
            continue
        if len(parts) == 1:
            converted[parts[0]] = state_dict[bfl]
            continue
        sizes = [hidden] * len(parts)
        if parts[-1].endswith(("proj_mlp.weight", "proj_mlp.bias")):
            sizes[-1] = state_dict[bfl].shape[0] - hidden * (len(parts) - 1)
        # Copies, not views of the fused tensor: saving a model whose weights share storage fails.
        converted.update((part, tensor.clone()) for part, tensor in zip(parts, torch.split(state_dict[bfl], sizes)))
    return converted


def what_file_holds(keys: Iterable[str]) -> str | None:
    """Which FLUX part ("transformer", "ae", "clip_l", "t5xxl") or "sd" a file's keys are, or None."""
    keys = set(keys)
    if any(key.startswith(("model.diffusion_model.input_blocks.", "conditioner.embedders.", "cond_stage_model.",
                           "first_stage_model.")) for key in keys):  # fmt: skip
        return "sd"
    keys = {key.removeprefix(COMFY_PREFIX) for key in keys}
    if any(key.startswith(("double_blocks.", "single_blocks.")) for key in keys):
        return "transformer"
    if any(key.startswith("encoder.down.") for key in keys) and any(key.startswith("decoder.up.") for key in keys):
        return "ae"
    if any(key.startswith("encoder.block.") for key in keys):
        return "t5xxl"
    if any(key.removeprefix("text_model.").startswith("encoder.layers.") for key in keys):
        return "clip_l"
    return None


@dataclass
class FluxFiles:
    """FLUX.1 loaded from single files: diffusers / transformers modules, float32 on CPU."""

    transformer: Any  # diffusers FluxTransformer2DModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (CLIP-L)
    text_encoder_2: Any  # transformers T5EncoderModel (T5-XXL)
    tokenizer: Any  # CLIPTokenizer
    tokenizer_2: Any  # T5TokenizerFast
    scheduler_config: dict[str, Any]  # FlowMatchEulerDiscreteScheduler's, from scheduler/


def load_flux_single_files(transformer: PathLike, ae: PathLike, clip_l: PathLike, t5xxl: PathLike,
                           config_folder: PathLike, *, dtype: torch.dtype = torch.float32) -> FluxFiles:  # fmt: skip
    """Load FLUX.1 from its four single files (sd-scripts' --pretrained_model_name_or_path, --ae,
    --clip_l, --t5xxl), offline: the configs and tokenizers come from `config_folder`, a local
    diffusers FLUX.1 folder (no weights needed). Every weight (bf16, fp16 or fp8) is cast to `dtype`.
    Raises ModelLoadError naming the file and its option when a file is missing or of the wrong kind."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = _config_folder(config_folder)
    files = {"transformer": transformer, "ae": ae, "clip_l": clip_l, "t5xxl": t5xxl}
    shapes = {part: _header_shapes(part, path) for part, path in files.items()}  # every file checked first
    paths = {part: Path(path).expanduser().resolve() for part, path in files.items()}
    with reraise_as_load_error(f"model.config: cannot read the tokenizers of '{folder}'"):
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        tokenizer_2 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    return FluxFiles(
        transformer=_load_transformer(paths["transformer"], shapes["transformer"], folder, dtype),
        vae=_load_ae(paths["ae"], shapes["ae"], folder, dtype),
        text_encoder=_load_text_encoder("clip_l", paths["clip_l"], shapes["clip_l"], folder, dtype),
        text_encoder_2=_load_text_encoder("t5xxl", paths["t5xxl"], shapes["t5xxl"], folder, dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json", "model.config"),
    )


def _config_folder(path: PathLike) -> Path:
    folder = Path(path).expanduser().resolve()
    missing = [name for name in CONFIG_FILES if not (folder / name).exists()]
    if missing:
        raise ModelLoadError(
            f"model.config: '{folder}' is not a diffusers FLUX.1 folder: it lacks {', '.join(missing)}. Set "
            "model.config to a local copy of the FLUX.1 variant's diffusers folder (black-forest-labs/FLUX.1-dev "
            "or -schnell); its configs and tokenizers are enough, the weights are not needed"
        )
    return folder


def _header_shapes(part: str, path: PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the file's tensors, read from its header; checks it holds `part`."""
    from safetensors import safe_open

    option, file = OPTIONS[part], Path(path).expanduser().resolve()
    fix = f"Set {option} to the {USUAL_NAMES[part]} file ({_HOLDS[part]})"
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise ModelLoadError(f"{option}: '{file}' {where}. {fix}; relative paths start at {Path.cwd()}")
    if file.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{option}: '{file}' is not a .safetensors file (FLUX.1's files are .safetensors; "
                             f"convert a .ckpt/.pt/.bin/.gguf first). {fix}")  # fmt: skip
    with reraise_as_load_error(f"{option}: cannot read '{file}' as safetensors"), safe_open(file, "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    if "scaled_fp8" in shapes or any(key.endswith(".scale_weight") for key in shapes):
        raise ModelLoadError(f"{option}: '{file}' is a scaled fp8 file (per-layer scale_weight), which is not "
                             f"read here; use the plain fp8 (float8_e4m3fn), bf16 or fp16 file. {fix}")  # fmt: skip
    found = what_file_holds(shapes)
    if found != part:
        holds = _HOLDS.get(found or "", "keys of no FLUX.1 part (first: " + ", ".join(sorted(shapes)[:3]) + ")")
        message = f"{option}: '{file}' holds {holds}, not {_HOLDS[part]}."
        if found in OPTIONS:
            message += f" It belongs in {OPTIONS[found]}: set {OPTIONS[found]} to it and {option} to the " \
                       f"{USUAL_NAMES[part]} file"  # fmt: skip
        elif found == "sd":
            message += (" FLUX LoRAs train on a FLUX.1 transformer: set model.path to flux1-dev.safetensors "
                        "(or to a FLUX.1 diffusers folder); to train this SD / SDXL checkpoint, set model.path to "
                        "it without model.ae / clip_l / t5xxl")  # fmt: skip
        else:
            message += f" {fix}"
        raise ModelLoadError(message)
    return shapes


def _expect_shapes(part: str, file: Path, found: dict, expected: dict, folder: Path, config: str) -> None:
    """Raise unless the file's tensors are exactly the ones `config` (in model.config) describes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    # img_in first (its rows are the width), then the keys outside blocks.
    differ = sorted((key for key in set(found) & set(expected) if tuple(found[key]) != tuple(expected[key])),
                    key=lambda key: (key != "img_in.weight", "blocks." in key, key))  # fmt: skip
    if not (missing or unexpected or differ):
        return
    details = [f"{key}: {list(found[key])} in the file, {list(expected[key])} by the config" for key in differ[:3]]
    details += [f"missing {', '.join(missing[:3])}"] * bool(missing)
    details += [f"not in the config's model: {', '.join(unexpected[:3])}"] * bool(unexpected)
    raise ModelLoadError(
        f"{OPTIONS[part]}: '{file}' does not fit model.config '{folder}' ({config}): {'; '.join(details)}"
        f" ({len(missing)} missing, {len(unexpected)} extra, {len(differ)} of other shape). Set model.config to the "
        f"diffusers folder of this file's model (same variant and size), or {OPTIONS[part]} to a file of that model"
    )


def _read_tensors(file: Path, keys: Iterable[str], dtype: torch.dtype, strip: str = "") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        return {key.removeprefix(strip): handle.get_tensor(key).to(dtype) for key in keys}


def _assign(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    with reraise_as_load_error(what):
        model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _load_transformer(file: Path, shapes: dict, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = read_json(folder / "transformer" / "config.json", "model.config")
    # A ComfyUI checkpoint prefixes the transformer's keys (and may hold the AE and text encoders too).
    prefix = COMFY_PREFIX if any(key.startswith(COMFY_PREFIX) for key in shapes) else ""
    keys = [key for key in shapes if key.startswith(prefix)]
    found = {key.removeprefix(prefix): shapes[key] for key in keys}
    has_guidance, wants_guidance = "guidance_in.in_layer.weight" in found, bool(config.get("guidance_embeds"))
    if has_guidance != wants_guidance:
        variant, other = ("dev", "schnell") if has_guidance else ("schnell", "dev")
        raise ModelLoadError(
            f"model.path: '{file}' is a FLUX.1-{variant} transformer ({'with' if has_guidance else 'no'} "
            f"guidance_in), but model.config '{folder}' describes FLUX.1-{other} (transformer/config.json "
            f"guidance_embeds={str(wants_guidance).lower()}). Set model.config to a FLUX.1-{variant} diffusers "
            f"folder (black-forest-labs/FLUX.1-{variant}), or model.path to a FLUX.1-{other} file"
        )
    what = f"model.config: '{folder}/transformer/config.json' is no FluxTransformer2DModel config"
    with reraise_as_load_error(what), init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    expected = {key: tuple(value.shape) for key, value in flux_transformer_to_bfl(model.state_dict()).items()}
    blocks = f"{config.get('num_layers')} double / {config.get('num_single_layers')} single blocks"
    ours = f"{_block_count(found, 'double_blocks.')} double / {_block_count(found, 'single_blocks.')} single"
    _expect_shapes("transformer", file, found, expected, folder, f"transformer/config.json: {blocks}; file: {ours}")
    state_dict = flux_transformer_to_diffusers(_read_tensors(file, keys, dtype, strip=prefix))
    return _assign(model, state_dict, f"model.path: cannot load '{file}' into FluxTransformer2DModel")


def _load_ae(file: Path, shapes: dict, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = read_json(folder / "vae" / "config.json", "model.config")
    with reraise_as_load_error(f"model.config: '{folder}/vae/config.json' is no AE config"), init_empty_weights():
        model = AutoencoderKL.from_config(config)
    expected = {key: tuple(value.shape) for key, value in vae_to_ldm(model).items()}
    _expect_shapes("ae", file, shapes, expected, folder, "vae/config.json")
    state_dict = convert_ldm_vae_checkpoint(_read_tensors(file, shapes, dtype), config)
    return _assign(model, state_dict, f"model.ae: cannot load '{file}' into AutoencoderKL")


# Keys some text encoder files carry that the diffusers pipelines do not use (sd-scripts loads
# with strict=False for them): CLIP's projection and position ids, T5's tied encoder embedding.
_UNUSED_TEXT_KEYS = ("text_projection.weight", "embeddings.position_ids", "encoder.embed_tokens.weight")


def _load_text_encoder(part: str, file: Path, shapes: dict, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    subfolder, config_class, model_class = (("text_encoder", CLIPTextConfig, CLIPTextModel) if part == "clip_l"
                                            else ("text_encoder_2", T5Config, T5EncoderModel))  # fmt: skip
    with reraise_as_load_error(f"model.config: cannot read '{folder / subfolder}/config.json'"), init_empty_weights():
        model = model_class(config_class.from_pretrained(folder / subfolder))
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; clip_l files keep it.
    names = {key: key.removeprefix("text_model.") for key in shapes}
    found = {name: shapes[key] for key, name in names.items() if name not in _UNUSED_TEXT_KEYS}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in _UNUSED_TEXT_KEYS}
    _expect_shapes(part, file, found, expected, folder, f"{subfolder}/config.json")
    state_dict = {names[key]: value for key, value in _read_tensors(file, shapes, dtype).items()
                  if names[key] not in _UNUSED_TEXT_KEYS}  # fmt: skip
    if part == "t5xxl":
        # T5's encoder embedding is the shared one (transformers ties them); give it the same tensor.
        state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"]
    model = _assign(model, state_dict, f"{OPTIONS[part]}: cannot load '{file}' into {model_class.__name__}")
    if part == "t5xxl":
        model.encoder.embed_tokens = model.shared  # one parameter, as from_pretrained leaves it
    return model


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast for saving. fp8: matrices (ndim >= 2) clamped to e4m3fn's +-448 (torch 2.13 saturates on CPU;
    out-of-range casts are not documented) then cast; vectors bf16: few, and fp8's 3-bit mantissa
    would move norm scales near 1 by up to 6%."""
    if dtype != FP8:
        return {key: value.detach().to(dtype).contiguous() for key, value in state_dict.items()}
    return {key: (value.detach().float().clamp(-FP8_MAX, FP8_MAX).to(FP8) if value.ndim >= 2
                  else value.detach().to(torch.bfloat16)).contiguous() for key, value in state_dict.items()}  # fmt: skip


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", FP8: "fp8_e4m3fn"}


def _save(state_dict: dict[str, torch.Tensor], target: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(state_dict, str(tmp), metadata={"format": "pt"})
    return target


def write_flux_single_files(
    pipeline_or_folder: Any, out_dir: PathLike, *, transformer_dtype: torch.dtype = torch.bfloat16,
    t5_dtype: torch.dtype = torch.float16, clip_dtype: torch.dtype = torch.float16,
    ae_dtype: torch.dtype = torch.float32, key_prefix: str = "",
) -> dict[str, Path]:
    """Write a diffusers FLUX.1 (a FluxPipeline or its folder) as the single files users have:
    flux1-<dev|schnell>.safetensors (BFL keys, `key_prefix` before each, e.g. COMFY_PREFIX),
    ae.safetensors (LDM keys), clip_l.safetensors (text_model.*), t5xxl_<dtype>.safetensors.
    Each is written atomically (atelier.utils.atomic). Returns part ("transformer", "ae",
    "clip_l", "t5xxl") -> path; the dtypes default to those of the files BFL and ComfyUI publish."""
    pipeline = pipeline_or_folder
    if isinstance(pipeline_or_folder, (str, os.PathLike)):
        from diffusers import FluxPipeline

        pipeline = FluxPipeline.from_pretrained(pipeline_or_folder)
    out = Path(out_dir)
    variant = "dev" if pipeline.transformer.config.guidance_embeds else "schnell"
    transformer = flux_transformer_to_bfl(pipeline.transformer.state_dict())
    t5 = {key: value for key, value in pipeline.text_encoder_2.state_dict().items()
          if key != "encoder.embed_tokens.weight"}  # tied to shared.weight; safetensors refuses shared storage
    return {
        "transformer": _save({key_prefix + key: value for key, value in _cast(transformer, transformer_dtype).items()},
                             out / f"flux1-{variant}.safetensors"),  # fmt: skip
        "ae": _save(_cast(vae_to_ldm(pipeline.vae), ae_dtype), out / "ae.safetensors"),
        "clip_l": _save(_cast(text_encoder_to_ldm(pipeline.text_encoder), clip_dtype), out / "clip_l.safetensors"),
        "t5xxl": _save(_cast(t5, t5_dtype), out / f"t5xxl_{_DTYPE_NAMES[t5_dtype]}.safetensors"),
    }

