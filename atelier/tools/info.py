"""`atelier info`: the metadata of a LoRA (or any .safetensors) file, readable.

Values are strings in the file; the JSON-valued ones (ss_tag_frequency,
ss_dataset_dirs, ss_bucket_info, ss_network_args, ...) are decoded and
pretty-printed. Only the header is read, never the tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from atelier.config.network_kinds import VARIANT_TENSORS
from atelier.families import FLUX1
from atelier.network.flux_lora import CLIP_PREFIX, T5_PREFIX
from atelier.network.flux_names import FUSED_SUFFIXES, flux_module_part
from atelier.tools.common import ToolError, existing_file, lora_family

# Known JSON-valued keys; any other value that starts like JSON and parses is decoded too.
JSON_FIELDS = (
    "ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info", "ss_network_args",
    "ss_datasets", "ss_merged_from", "atelier.merged_loras",
)  # fmt: skip
# What sd-scripts' flux_train_network.py writes of its flow-matching options (FLUX.1 files only).
FLUX_FIELDS = (
    "ss_model_type", "ss_timestep_sampling", "ss_discrete_flow_shift", "ss_model_prediction_type", "ss_guidance_scale",
    "ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale", "ss_sigmoid_scale",
    "ss_apply_t5_attn_mask", "ss_t5xxl_max_token_length",
)  # fmt: skip
SECTIONS = (
    ("model & network", ("ss_sd_model", "ss_new_sd_model", "ss_base_model", "ss_v2", "ss_v_param", "ss_network", "ss_output_name")),
    ("flow matching (FLUX.1)", FLUX_FIELDS),
    ("training", ("ss_",)),
    ("modelspec", ("modelspec.",)),
    ("hashes", ("sshs_",)),
    ("other", ("",)),
)  # fmt: skip


def decode_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The metadata with JSON-valued fields decoded (a value that fails to parse stays a string)."""
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        looks_json = isinstance(value, str) and value[:1] in "{["
        if key in JSON_FIELDS or looks_json:
            try:
                decoded[key] = json.loads(value)
                continue
            except (TypeError, ValueError):
                pass
        decoded[key] = value
    return decoded


def tensor_summary(path: Path) -> dict[str, Any]:
    """Counts, dtypes and ranks from the header: no tensor data is read."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    dtypes: dict[str, int] = {}
    ranks: dict[int, int] = {}
    variants: dict[str, set[str]] = {}  # network.dora_wd / use_tucker -> the modules trained with it
    modules = set()
    for key, entry in header.items():
        dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
        modules.add(key.split(".", 1)[0])
        if key.endswith(".lora_down.weight") and entry["shape"]:
            ranks[entry["shape"][0]] = ranks.get(entry["shape"][0], 0) + 1
        for variant, tensors in VARIANT_TENSORS.items():
            if key.split(".", 1)[-1] in tensors:
                variants.setdefault(variant, set()).add(key.split(".", 1)[0])
    unet = sum(1 for m in modules if m.startswith("lora_unet_"))
    text = sum(1 for m in modules if m.startswith("lora_te"))
    return {
        "tensors": len(header),
        "modules": len(modules),
        "unet_modules": unet,
        "text_encoder_modules": text,
        "dtypes": dtypes,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "size_bytes": path.stat().st_size,
        # Only when there are some: a plain file's summary stays as it was.
        **({"variants": {k: len(v) for k, v in sorted(variants.items())}} if variants else {}),
    }


def read_info(path: str | Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    path = existing_file(path, "file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise ToolError(f"'{path}' is not a readable .safetensors file ({error})") from error
    summary = tensor_summary(path)
    family = lora_family(metadata)
    if family is not None:
        summary["base_model"] = {"family": family.label, "version": family.version}
    names = _module_names(path)
    if family is FLUX1 or any(flux_module_part(name) for name in names):
        summary.update(flux_module_counts(names))
    return {"file": str(path), "summary": summary, "metadata": decode_metadata(metadata)}


def _module_names(path: Path) -> list[str]:
    with path.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return list(dict.fromkeys(key.split(".", 1)[0] for key in header if key != "__metadata__"))


def flux_module_counts(names: list[str]) -> dict[str, Any]:
    """A FLUX.1 LoRA's modules by part (sd-scripts' lora_flux names): double / single blocks, CLIP-L
    (lora_te1_), T5-XXL (lora_te3_), and how many are fused BFL layers (qkv, linear1: one kohya module
    over several diffusers Linears, atelier.network.flux_names)."""
    parts = {"double blocks": 0, "single blocks": 0, "CLIP-L": 0, "T5-XXL": 0, "other": 0}
    fused = 0
    for name in names:
        part = flux_module_part(name)
        if part is not None:
            parts[f"{part} blocks"] += 1
            fused += name.endswith(FUSED_SUFFIXES)
        elif name.startswith(f"{CLIP_PREFIX}_"):
            parts["CLIP-L"] += 1
        elif name.startswith(f"{T5_PREFIX}_"):
            parts["T5-XXL"] += 1
        else:
            parts["other"] += 1
    return {"flux_parts": {k: v for k, v in parts.items() if v or k.endswith("blocks")}, "fused_modules": fused}


def flux_settings(metadata: dict[str, Any]) -> str | None:
    """The flow-matching options of a FLUX.1 file in one line, or None when it has none."""
    if not any(key in metadata for key in FLUX_FIELDS):
        return None
    get = metadata.get
    parts = [f"timesteps {get('ss_timestep_sampling', '?')} (discrete_flow_shift {get('ss_discrete_flow_shift', '?')})",
             f"model prediction {get('ss_model_prediction_type', '?')}", f"guidance {get('ss_guidance_scale', '?')}",
             f"weighting {get('ss_weighting_scheme', '?')}"]  # fmt: skip
    return "flow matching: " + ", ".join(parts)


def format_info(info: dict[str, Any]) -> str:
    s = info["summary"]
    ranks = ", ".join(f"{rank} ({count} modules)" for rank, count in s["ranks"].items()) or "-"
    lines = [
        info["file"],
        f"  {s['tensors']} tensors, {s['modules']} modules ({_parts(s)}), dtypes {s['dtypes']}, rank {ranks}, "
        f"{s['size_bytes']:,} bytes",
    ]
    if "base_model" in s:
        module = info["metadata"].get("ss_network_module", "?")
        lines.append(f"  base model {s['base_model']['family']} ({s['base_model']['version']}), network {module}")
    settings = flux_settings(info["metadata"])
    if settings:
        lines.append(f"  {settings}")
    for variant, count in s.get("variants", {}).items():  # LyCORIS' DoRA / Tucker modules
        lines.append(f"  {count} modules trained with network.{variant} ({' / '.join(VARIANT_TENSORS[variant])})")
    metadata = dict(info["metadata"])
    if not metadata:
        lines.append("  no metadata")
    for title, prefixes in SECTIONS:
        keys = [k for k in sorted(metadata) if k.startswith(prefixes)]
        if not keys:
            continue
        lines.append(f"\n{title}:")
        width = max(len(k) for k in keys)
        for key in keys:
            value = metadata.pop(key)
            if isinstance(value, (dict, list)):
                text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n    ")
                lines.append(f"  {key}:\n    {text}")
            else:
                lines.append(f"  {key:<{width}}  {value}")
    return "\n".join(lines)


def _parts(summary: dict[str, Any]) -> str:
    if "flux_parts" in summary:
        counts = ", ".join(f"{count} {part}" for part, count in summary["flux_parts"].items())
        return f"{counts}; {summary['fused_modules']} fused qkv / linear1"
    return f"{summary['unet_modules']} UNet, {summary['text_encoder_modules']} text encoder"


def run(args: argparse.Namespace) -> int:
    info = read_info(Path(args.file))
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_info(info))
    return 0
