"""`atelier merge`: LoRAs into a base checkpoint, or several LoRAs into one.

Into a checkpoint (SD1 single file, original/LDM layout): each module's update
ratio * up @ down * alpha / rank is added to the weight it patches. Kohya names
use diffusers module paths (lora_unet_down_blocks_0_attentions_0_...) for the
UNet and transformers paths (lora_te_text_model_encoder_layers_0_...) for the
text encoder; the UNet's LDM key is found with atelier.models.ldm_convert's
diffusers -> LDM map, built on a meta-device UNet whose config comes from
--config (a diffusers folder or `atelier skeleton`) or, without it, is read off
the checkpoint's own keys and shapes (and checked against all of them). The
output has the input's keys, dtypes and metadata; the sums are done in float32.

Several LoRAs into one: the ranks are concatenated,
    up = [c1 * up1, c2 * up2, ...],  down = [down1; down2; ...],  c_i = ratio_i * alpha_i / rank_i,
    alpha = new rank (scale 1),
so up @ down = sum_i ratio_i * delta_i exactly, module by module (a module only
some files have keeps only their parts). The scale is folded into up. FLUX.1 LoRAs merge the
same way (a fused qkv / linear1 module is one kohya module: one down, one up); LoRAs of families
whose kohya names differ (SD vs FLUX.1) are refused. Into a FLUX.1 base: atelier.tools.merge_flux.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from atelier.tools.common import (
    LoRAFactors,
    ToolError,
    check_output,
    existing_file,
    load_lora_file,
    lora_family,
    precision_for,
    require_finite,
)
from atelier.tools.merge_flux import check_families, is_flux_base, merge_into_clip_l, merge_into_flux

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# Metadata of the first LoRA that still describes a merge of LoRAs of the same base.
KEPT_METADATA = (
    "ss_base_model_version", "ss_v2", "ss_v_parameterization", "ss_sd_model_name", "ss_sd_model_hash",
    "ss_new_sd_model_hash", "ss_network_module", "ss_resolution", "ss_clip_skip", "modelspec.sai_model_spec",
    "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type", "modelspec.resolution",
)  # fmt: skip


# --- LoRAs into one LoRA ---------------------------------------------------------------


def merge_loras(loras: list[tuple[dict[str, LoRAFactors], float]]) -> dict[str, LoRAFactors]:
    """Concatenate the modules of several LoRAs, each scaled by its ratio (see the docstring)."""
    parts: dict[str, list[tuple[LoRAFactors, float]]] = {}
    for modules, ratio in loras:
        for name, module in modules.items():
            parts.setdefault(name, []).append((module, ratio))
    merged = {}
    for name, items in parts.items():
        first = items[0][0]
        out_features, down_tail = first.up.shape[0], tuple(first.down.shape[1:])
        ups, downs = [], []
        for module, ratio in items:
            if module.up.shape[0] != out_features or module.down[0].numel() != first.down[0].numel():
                raise ToolError(
                    f"{name}: the LoRAs disagree on its shape (up {tuple(first.up.shape)} / down "
                    f"{tuple(first.down.shape)} vs {tuple(module.up.shape)} / {tuple(module.down.shape)}); "
                    "were they trained on different base models?"
                )
            ups.append(module.up2d() * (ratio * module.scale))
            downs.append(module.down2d())
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        rank = up.shape[1]
        merged[name] = LoRAFactors(
            name,
            down.reshape(rank, *down_tail),
            up.reshape(out_features, rank, *first.up.shape[2:]),
            float(rank),
        )
    return merged


def check_same_naming(sources: list[tuple[Path, dict[str, str]]]) -> None:
    """LoRAs of families whose kohya module names mean other layers (SD's UNet, FLUX.1's blocks:
    ModelFamily.unet_naming) cannot be merged into one; SD1 with SD2 is only warned of below."""
    families = [(path, lora_family(meta)) for path, meta in sources]
    known = [(path, family) for path, family in families if family is not None]
    if len({family.unet_naming for _, family in known}) > 1:
        listed = ", ".join(f"{path.name} ({family.label})" for path, family in known)
        raise ToolError(f"the LoRAs are of model families with different module names ({listed}); merge LoRAs of one "
                        "family")


def merged_lora_metadata(
    sources: list[tuple[Path, dict[str, str], float]], modules: dict[str, LoRAFactors], output: Path
) -> dict[str, str]:
    first = sources[0][1]
    versions = {meta.get("ss_base_model_version") for _, meta, _ in sources} - {None}
    if len(versions) > 1:
        log.warning("the LoRAs were trained on different base models (%s)", ", ".join(sorted(versions)))
    meta = {key: first[key] for key in KEPT_METADATA if key in first}
    ranks = {m.rank for m in modules.values()}
    meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alphas = {m.alpha for m in modules.values()}
    meta["ss_network_alpha"] = str(float(alphas.pop())) if len(alphas) == 1 else "Dynamic"
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_output_name"] = meta["modelspec.title"] = output.stem
    merged_from = [{"file": p.name, "ratio": r, "sshs_model_hash": m.get("sshs_model_hash")} for p, m, r in sources]
    meta["ss_merged_from"] = json.dumps(merged_from)
    meta["ss_training_comment"] = "merged by atelier: " + " + ".join(f"{r:g} x {p.name}" for p, _, r in sources)
    return meta


# --- LoRAs into a checkpoint -------------------------------------------------------------


def infer_unet_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """UNet2DConditionModel kwargs that reproduce the module layout of an SD1/SD2 single file.

    Only what decides module names and weight shapes is inferred (not e.g. the
    number of attention heads, which changes neither).
    """

    def has(prefix: str) -> bool:
        return any(key.startswith(UNET_PREFIX + prefix) for key in shapes)

    def shape(key: str) -> tuple[int, ...]:
        try:
            return shapes[UNET_PREFIX + key]
        except KeyError:
            raise ToolError(f"cannot read the UNet layout: no {UNET_PREFIX + key}; pass --config") from None

    conv_in = shape("input_blocks.0.0.weight")
    levels: list[dict[str, Any]] = [{"resnets": 0, "attention": False, "channels": conv_in[0]}]
    n = 1
    while has(f"input_blocks.{n}."):
        if has(f"input_blocks.{n}.0.op."):
            levels.append({"resnets": 0, "attention": False, "channels": levels[-1]["channels"]})
        else:
            level = levels[-1]
            level["resnets"] += 1
            level["channels"] = shape(f"input_blocks.{n}.0.out_layers.3.weight")[0]
            level["attention"] |= has(f"input_blocks.{n}.1.")
        n += 1
    layers = levels[0]["resnets"]
    if layers == 0 or any(level["resnets"] != layers for level in levels):
        raise ToolError("cannot read the UNet layout (uneven blocks); pass --config")
    up_attention = []
    for i in range(len(levels)):
        first = i * (layers + 1)
        up_attention.append(has(f"output_blocks.{first}.1.transformer_blocks."))
    attn_keys = [k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    channels = [level["channels"] for level in levels]
    block_indices = [
        int(k.split("transformer_blocks.")[1].split(".")[0])
        for k in shapes
        if k.startswith(UNET_PREFIX + "input_blocks.") and "transformer_blocks." in k
    ]
    depth = 1 + max(block_indices, default=0)
    return {
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": shape("out.2.weight")[0],
        "block_out_channels": tuple(channels),
        "layers_per_block": layers,
        "down_block_types": tuple("CrossAttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        "cross_attention_dim": shapes[attn_keys[0]][1] if attn_keys else 768,
        "use_linear_projection": bool(proj_in) and len(shapes[proj_in[0]]) == 2,
        "transformer_layers_per_block": depth,
        "attention_head_dim": 1,
        "norm_num_groups": math.gcd(32, *channels),
    }


def unet_module_keys(unet_config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """kohya module name -> LDM weight key, for every Linear / Conv2d of the UNet.

    The meta UNet's whole state dict, converted, must match the checkpoint's UNet
    keys and shapes exactly, or the config does not describe the checkpoint.
    """
    from diffusers import UNet2DConditionModel
    from torch import nn

    from atelier.models.ldm_convert import _rename, _unet_module_map, unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    expected = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet_to_ldm(unet).items()}
    actual = {k: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        differ = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
        raise ToolError(
            "the UNet config does not describe this checkpoint "
            f"({len(missing)} keys missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}; "
            f"{len(differ)} of other shapes, e.g. {differ[:2]}); pass --config with the base model's diffusers "
            "folder (or its `atelier skeleton`)"
        )
    module_map = _unet_module_map(unet)
    keys = {}
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            keys[f"lora_unet_{path.replace('.', '_')}"] = UNET_PREFIX + _rename(f"{path}.weight", module_map, "UNet")
    return keys


def text_module_keys(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """kohya module name -> LDM weight key for the SD1 text encoder (same paths, prefixed)."""
    keys = {}
    for key in shapes:
        if key.startswith(TEXT_PREFIX) and key.endswith(".weight"):
            path = key[len(TEXT_PREFIX) : -len(".weight")]
            keys[f"lora_te_{path.replace('.', '_')}"] = key
    return keys


def unet_config_from_folder(folder: Path) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    config_file = folder / "unet" / "config.json"
    if not config_file.is_file():
        raise ToolError(
            f"--config: no unet/config.json in '{folder}'; give a diffusers folder or an `atelier skeleton`"
        )
    config = UNet2DConditionModel.load_config(str(folder / "unet"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def merge_into_checkpoint(
    base: Path,
    loras: list[tuple[Path, dict[str, LoRAFactors], float]],
    config: Path | None = None,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The merged state dict and metadata of `base`; plus one report line per LoRA."""
    from safetensors import safe_open

    from atelier.families import FAMILIES, family_of
    from atelier.models.sources import inspect_single_file

    existing_file(base, "base checkpoint")
    if base.suffix.lower() != ".safetensors":
        raise ToolError(
            f"the base checkpoint must be a .safetensors single file (convert a .ckpt with `atelier convert-ckpt`): {base}"
        )
    info = inspect_single_file(base, key="base checkpoint")
    if not family_of(info.version).merges_into_single_files:
        can = " and ".join(family.label for family in FAMILIES.values() if family.merges_into_single_files)
        raise ToolError(f"'{base}' is {info.description}; merging into a checkpoint supports {can} single files")
    with safe_open(str(base), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    unet_config = unet_config_from_folder(config) if config is not None else infer_unet_config(shapes)
    targets = {**unet_module_keys(unet_config, shapes), **text_module_keys(shapes)}

    work: dict[str, torch.Tensor] = {}  # float32 sums of the touched weights
    report = []
    for path, modules, ratio in loras:
        unknown = sorted(name for name in modules if name not in targets)
        if unknown:
            raise ToolError(
                f"{path.name}: {len(unknown)} of its {len(modules)} modules have no weight in '{base.name}' "
                f"(e.g. {', '.join(unknown[:3])}); was it trained on another base model?"
            )
        for name, module in modules.items():
            key = targets[name]
            weight = work.get(key)
            if weight is None:
                weight = state[key].to(device, torch.float32)
            delta = module.delta2d().to(device)
            if delta.numel() != weight.numel():
                raise ToolError(
                    f"{path.name}: {name} updates a {tuple(module.weight_shape())} weight, but {key} is "
                    f"{tuple(weight.shape)}; was it trained on another base model?"
                )
            work[key] = weight + ratio * delta.reshape(weight.shape)
        report.append(f"merged {path.name} x {ratio:g}: {len(modules)} modules")
    for key, weight in work.items():
        state[key] = weight.to("cpu", state[key].dtype).contiguous()
    merged_from = [{"file": p.name, "ratio": r} for p, _, r in loras]
    metadata = {**metadata, "atelier.merged_loras": json.dumps(merged_from)}
    return state, metadata, report


# --- the command ---------------------------------------------------------------------


def _ratios(args: argparse.Namespace, count: int) -> list[float]:
    ratios = args.ratios if args.ratios is not None else [1.0] * count
    if len(ratios) != count:
        raise ToolError(f"--ratios: give one ratio per LoRA ({count} LoRAs, {len(ratios)} ratios)")
    return ratios


def _looks_like_lora(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(key.startswith(("lora_unet_", "lora_te")) for key in handle.keys())
    except Exception:
        return False


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from atelier.network.lora_file import save_lora
    from atelier.utils.atomic import atomic_path

    inputs = [Path(p) for p in args.inputs]
    if args.loras:
        if inputs:
            raise ToolError("give either a base checkpoint and LoRAs, or --loras (to merge LoRAs into one), not both")
        if args.clip_l or args.clip_l_output:
            raise ToolError("--clip-l / --clip-l-output merge into a FLUX.1 base's CLIP-L file; --loras merges LoRAs")
        paths = [Path(p) for p in args.loras]
        out = check_output(args.output, args.force, paths)
        ratios = _ratios(args, len(paths))
        loaded = [(p, *load_lora_file(p)) for p in paths]
        for path, modules, _, _ in loaded:
            require_finite(modules, path)
        check_same_naming([(p, m) for p, _, m, _ in loaded])
        merged = merge_loras([(modules, r) for (_, modules, _, _), r in zip(loaded, ratios)])
        state = {k: v for module in merged.values() for k, v in module.to_state().items()}
        meta = merged_lora_metadata([(p, m, r) for (p, _, m, _), r in zip(loaded, ratios)], merged, out)
        save_lora(out, state, meta, precision_for(loaded[0][3], args.save_precision))
        ranks = sorted({m.rank for m in merged.values()})
        print(f"merged {len(paths)} LoRAs into {len(merged)} modules (rank {'/'.join(map(str, ranks))})")
        print(f"wrote {out}")
        return 0

    if len(inputs) < 2:
        raise ToolError(
            "give a base checkpoint and at least one LoRA (atelier merge base.safetensors a.safetensors -o out), "
            "or --loras a.safetensors b.safetensors -o merged.safetensors"
        )
    base, lora_paths = inputs[0], inputs[1:]
    if _looks_like_lora(base):
        raise ToolError(
            f"'{base}' is a LoRA; the first argument is the base checkpoint (to merge LoRAs into one, use --loras)"
        )
    out = check_output(args.output, args.force, inputs)
    ratios = _ratios(args, len(lora_paths))
    files = [(p, *load_lora_file(p)[:2]) for p in lora_paths]
    loras = [(p, modules, r) for (p, modules, _), r in zip(files, ratios)]
    for path, modules, _ in loras:
        require_finite(modules, path)
    clip_out = _clip_l_output(args, base, inputs, out)
    if is_flux_base(base):  # a BFL transformer file or a diffusers FLUX.1 folder: atelier.tools.merge_flux
        check_families(base, [(p, metadata) for p, _, metadata in files])
        if clip_out is not None:  # first: a wrong CLIP-L file fails before the transformer is written
            clip_state, clip_metadata, clip_report = merge_into_clip_l(Path(args.clip_l), loras, args.device)
        state, metadata, report = merge_into_flux(base, loras, args.device, clip_l_merged=clip_out is not None)
    else:
        config = Path(args.config) if args.config else None
        state, metadata, report = merge_into_checkpoint(base, loras, config, args.device)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    print("\n".join(report))
    print(f"wrote {out}")
    if clip_out is not None:
        with atomic_path(clip_out) as tmp:
            save_file(clip_state, str(tmp), metadata=clip_metadata)
        print("\n".join(clip_report))
        print(f"wrote {clip_out}")
    return 0


def _clip_l_output(args: argparse.Namespace, base: Path, inputs: list[Path], out: Path) -> Path | None:
    """--clip-l-output, checked: given with --clip-l, for a FLUX.1 base, not overwriting anything."""
    if (args.clip_l is None) != (args.clip_l_output is None):
        raise ToolError("--clip-l and --clip-l-output go together: the CLIP-L file to merge into and the file to write")
    if args.clip_l is None:
        return None
    if not is_flux_base(base):
        raise ToolError(f"--clip-l: '{base}' is no FLUX.1 transformer; CLIP-L files are merged with a FLUX.1 base")
    clip_l = existing_file(args.clip_l, "--clip-l")
    clip_out = check_output(args.clip_l_output, args.force, [*inputs, clip_l])
    if clip_out.expanduser().resolve() == out.expanduser().resolve():
        raise ToolError(f"--clip-l-output and -o are the same file ({out}); give two files")
    return clip_out
