"""`atelier merge` into FLUX.1: kohya FLUX LoRAs (networks.lora_flux) into a FLUX.1 transformer.

Two bases, both written out as one BFL single file (what sd-scripts' flux_train_network.py,
ComfyUI and Forge load as the FLUX.1 model; the AE, CLIP-L and T5-XXL files are not touched):

- a BFL transformer single file (`double_blocks.N.img_attn.qkv.weight`, ..., optionally behind
  ComfyUI's `model.diffusion_model.` prefix), as sd-scripts' networks/flux_merge_lora.py
  (merge_to_flux_model) does: a kohya name is "lora_unet_" + the BFL module path with "." -> "_",
  and W += ratio * up @ down * alpha / rank on it; a fused layer (qkv, linear1) is one BFL Linear,
  so its update is added whole. The output keeps the input's keys, dtypes and metadata.
- a diffusers FLUX.1 folder (model_index.json with transformer/, or the transformer/ folder
  itself): its transformer weights are merged in diffusers' layout, where a fused kohya module
  patches several Linears (atelier.network.flux_names): part i gets rows r_i of the fused update,
  W_i += ratio * up[r_i] @ down * alpha / rank. The merged transformer is then written as a BFL
  single file (atelier.models.flux_files.flux_transformer_to_bfl) in the folder's dtype: one file
  users can load like any FLUX.1 checkpoint, rather than a whole copy of the pipeline folder.

Sums are done in float32, then cast back to each weight's dtype. CLIP-L modules (lora_te1_) go
into a CLIP-L single file when one is given (`--clip-l clip_l.safetensors --clip-l-output ...`, as
sd-scripts' --clip_l / --clip_l_save_to): "lora_te1_" + the layer's path in transformers' CLIP
layout (text_model.encoder.layers.N...), W += ratio * up @ down * alpha / rank; without one they
are left out and the report says how many. A module the base has no weight for is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atelier.families import FLUX1
from atelier.network.flux_lora import CLIP_PREFIX
from atelier.network.flux_names import PREFIX, flux_targets
from atelier.tools.common import LoRAFactors, ToolError, lora_family

# (weight key, first row, end row): where part of a module's update goes.
Part = tuple[str, int, int]
LoRAs = list[tuple[Path, dict[str, LoRAFactors], float]]


def _transformer_folder(path: Path) -> Path | None:
    """The diffusers FLUX transformer folder of `path` (a pipeline folder or the folder itself), or None."""
    for folder in (path / "transformer", path):
        config = folder / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (OSError, ValueError):
                continue
            if name == FLUX1.denoiser:
                return folder
    return None


def is_flux_base(path: Path) -> bool:
    """Whether `path` is a FLUX.1 transformer: a BFL single file or a diffusers FLUX folder."""
    from atelier.models.flux_files import what_file_holds

    if path.is_dir():
        return _transformer_folder(path) is not None
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return what_file_holds(handle.keys()) == "transformer"
    except Exception:  # not a readable safetensors file: the SD path names the problem
        return False


def bfl_parts(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, list[Part]]:
    """kohya name -> the BFL weight it updates whole, for every `.weight` (sd-scripts' naming)."""
    parts: dict[str, list[Part]] = {}
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith(".weight"):
            path = key[len(prefix) : -len(".weight")]
            parts[f"{PREFIX}_{path.replace('.', '_')}"] = [(key, 0, shape[0])]
    return parts


def diffusers_parts(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Part]]:
    """kohya name -> the diffusers Linears it updates and the rows of the fused update each takes."""

    def count(prefix: str) -> int:
        return len({key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)})

    parts: dict[str, list[Part]] = {}
    for target in flux_targets(count("transformer_blocks."), count("single_transformer_blocks.")):
        start, found = 0, []
        for module in target.modules:
            key = f"{module}.weight"
            if key not in shapes:
                break
            found.append((key, start, start + shapes[key][0]))
            start += shapes[key][0]
        else:
            parts[target.name] = found
    return parts


def clip_l_parts(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Part]]:
    """kohya name (lora_te1_...) -> the CLIP-L weight it updates, for a clip_l file's keys (with or
    without transformers' "text_model." root, which the kohya names always carry)."""
    parts: dict[str, list[Part]] = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 2:
            path = key[: -len(".weight")]
            path = path if path.startswith("text_model.") else f"text_model.{path}"
            parts[f"{CLIP_PREFIX}_{path.replace('.', '_')}"] = [(key, 0, shape[0])]
    return parts


def add_lora_deltas(
    state: dict[str, torch.Tensor], targets: dict[str, list[Part]], base: Path, loras: LoRAs, device: str,
    text_encoder: bool = False, clip_l_merged: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The float32 sums W + ratio * up[rows] @ down * alpha / rank of the weights the LoRAs touch:
    the transformer's modules, or with `text_encoder` CLIP-L's (the others are not this base's).
    `clip_l_merged`: the CLIP-L modules go into a CLIP-L file (the report does not list them as left out)."""
    work: dict[str, torch.Tensor] = {}
    report = []
    for path, modules, ratio in loras:
        others = [name for name in modules if name.startswith("lora_te") != text_encoder]  # not this base's part
        unknown = sorted(name for name in modules if name not in targets and name not in others)
        if unknown:
            raise ToolError(
                f"{path.name}: {len(unknown)} of its {len(modules)} modules have no weight in '{base.name}' "
                f"(e.g. {', '.join(unknown[:3])}); was it trained on another FLUX.1 model (block count) or "
                "another family? Merge it into the base it was trained on"
            )
        for name, module in modules.items():
            if name in others:
                continue
            up, down = module.up2d().to(device), module.down2d().to(device)
            parts = targets[name]
            rows = sum(end - start for _, start, end in parts)
            if rows != up.shape[0] or any(state[key].shape[1:] != down.shape[1:] for key, _, _ in parts):
                shapes = ", ".join(f"{key} {tuple(state[key].shape)}" for key, _, _ in parts)
                raise ToolError(
                    f"{path.name}: {name} updates a {up.shape[0]} x {down.shape[1]} weight, but '{base.name}' has "
                    f"{shapes}; was it trained on another FLUX.1 model?"
                )
            for key, start, end in parts:
                weight = work.get(key)
                if weight is None:
                    weight = state[key].to(device, torch.float32)
                work[key] = weight + (ratio * module.scale) * (up[start:end] @ down)
        if text_encoder:
            report.append(f"merged {path.name} x {ratio:g}: {len(modules) - len(others)} CLIP-L modules into '{base.name}'")
            continue
        line = f"merged {path.name} x {ratio:g}: {len(modules) - len(others)} transformer modules"
        if others and not clip_l_merged:
            line += (f"; {len(others)} text-encoder modules (lora_te...) not merged: '{base.name}' holds only the "
                     "transformer (give --clip-l and --clip-l-output to merge them into a CLIP-L file, or train "
                     "with network.train_unet_only=true)")  # fmt: skip
        report.append(line)
    return work, report


def check_families(base: Path, loras: list[tuple[Path, dict[str, str]]]) -> None:
    """A LoRA whose metadata names another family than FLUX.1 is refused, naming the file."""
    for path, metadata in loras:
        family = lora_family(metadata)
        if family is not None and family is not FLUX1:
            raise ToolError(
                f"{path.name} is a {family.label} LoRA (ss_base_model_version "
                f"{metadata.get('ss_base_model_version')}), but '{base}' is a {FLUX1.label} transformer; merge it into "
                f"a {family.label} checkpoint"
            )


def merge_into_flux(
    base: Path, loras: LoRAs, device: str = "cpu", clip_l_merged: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The merged transformer in BFL keys, the metadata to write with it, and one report line per LoRA
    (`clip_l_merged`: the CLIP-L modules go into a CLIP-L file, merge_into_clip_l)."""
    from safetensors import safe_open

    from atelier.models.flux_files import COMFY_PREFIX, flux_transformer_to_bfl

    merged_from = json.dumps([{"file": p.name, "ratio": r} for p, _, r in loras])
    folder = _transformer_folder(base) if base.is_dir() else None
    if folder is None:
        with safe_open(str(base), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        prefix = COMFY_PREFIX if any(key.startswith(COMFY_PREFIX + "double_blocks.") for key in state) else ""
        targets = bfl_parts({key: tuple(value.shape) for key, value in state.items()}, prefix)
        work, report = add_lora_deltas(state, targets, base, loras, device, clip_l_merged=clip_l_merged)
        for key, weight in work.items():
            state[key] = weight.to("cpu", state[key].dtype).contiguous()
        return state, {**metadata, "atelier.merged_loras": merged_from}, report
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ToolError(f"'{folder}' holds no .safetensors weights; give a FLUX.1 folder saved as safetensors")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            state.update((key, handle.get_tensor(key)) for key in handle.keys())
    targets = diffusers_parts({key: tuple(value.shape) for key, value in state.items()})
    work, report = add_lora_deltas(state, targets, base, loras, device, clip_l_merged=clip_l_merged)
    for key, weight in work.items():
        state[key] = weight.to("cpu", state[key].dtype)
    try:
        bfl = flux_transformer_to_bfl(state)
    except KeyError as error:
        raise ToolError(f"'{folder}': cannot write its transformer in BFL keys ({error})") from None
    metadata = {"format": "pt", "atelier.merged_base": str(base), "atelier.merged_loras": merged_from}
    return {key: value.contiguous() for key, value in bfl.items()}, metadata, report


def merge_into_clip_l(
    clip_l: Path, loras: LoRAs, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The LoRAs' CLIP-L modules merged into a CLIP-L single file: its tensors (keys, dtypes kept),
    metadata and one report line per LoRA."""
    from safetensors import safe_open

    from atelier.models.flux_files import what_file_holds

    with safe_open(str(clip_l), framework="pt") as handle:
        if what_file_holds(handle.keys()) != "clip_l":
            raise ToolError(f"--clip-l '{clip_l}' is not a CLIP-L text encoder file (clip_l.safetensors)")
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    targets = clip_l_parts({key: tuple(value.shape) for key, value in state.items()})
    work, report = add_lora_deltas(state, targets, clip_l, loras, device, text_encoder=True)
    for key, weight in work.items():
        state[key] = weight.to("cpu", state[key].dtype).contiguous()
    merged_from = json.dumps([{"file": p.name, "ratio": r} for p, _, r in loras])
    return state, {**metadata, "atelier.merged_loras": merged_from}, report


__all__ = ["bfl_parts", "check_families", "clip_l_parts", "diffusers_parts", "is_flux_base", "merge_into_clip_l",
           "merge_into_flux"]
