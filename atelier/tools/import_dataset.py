"""import-kohya's dataset part: sd-scripts' train_data_dir / reg_data_dir or a dataset config's
subsets as dataset.* keys.

Subsets become dataset.train_data_dir / reg_data_dir when they are exactly the N_name folders
of one parent and carry nothing of their own (the layout export-kohya writes); any other set
of subsets becomes dataset.subsets, key for key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.config.schema.subset import CAPTION_KEYS
from atelier.data.dataset import parse_concept_folder_name
from atelier.tools.imported import Imported, source_path
from atelier.tools.kohya_sources import KohyaRun

# Keys of a subset that dataset.subsets entries carry.
SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", *CAPTION_KEYS}
# sd-scripts subset keys that are dataset-wide here: taken when every subset agrees.
DATASET_WIDE = ("flip_aug", "color_aug", "random_crop", "face_crop_aug_range", "alpha_mask", "resize_interpolation")
# The subset keys a subset read as an N_name folder may carry (conditioning_data_dir: _conditioning_dir).
_FOLDER_KEYS = {"image_dir", "num_repeats", "class_tokens", "is_reg", "conditioning_data_dir"}


def import_dataset(run: KohyaRun, args: dict[str, Any], out: Imported) -> None:
    """Set dataset.*; a dataset-wide subset key goes into `args`, mapped with the other options."""
    _resolution(args, out)
    train = [s for s in run.subsets if not s.get("is_reg")]
    reg = [s for s in run.subsets if s.get("is_reg")]
    parents = {key: _parent_of(subsets, run) for key, subsets in (("train", train), ("reg", reg)) if subsets}
    if run.subsets and all(parents.values()):
        out.set("dataset.train_data_dir", parents.get("train", "???"))
        if "reg" in parents:
            out.set("dataset.reg_data_dir", parents["reg"])
    elif run.subsets:
        _as_subsets(run, args, out)
    else:
        for name in ("train_data_dir", "reg_data_dir"):
            if args.get(name):
                out.set(f"dataset.{name}", str(source_path(args[name], run.source)))
    if any("conditioning_data_dir" in s for s in train):
        _conditioning_dir(train, run, out)
    if "dataset.train_data_dir" not in out.values:
        out.set("dataset.train_data_dir", "???")
        out.notes.append("no train_data_dir or dataset subsets: set dataset.train_data_dir before training")
    train_dir = out.values["dataset.train_data_dir"]
    first = source_path(str(train[0].get("image_dir", "")), run.source) if train else None
    named = Path(train_dir) if train_dir not in ("???", None) else first
    out.set("dataset.name", named.name if named is not None else "imported")


def _resolution(args: dict[str, Any], out: Imported) -> None:
    resolution = args.get("resolution")
    if resolution is None:
        out.set("dataset.resolution", out.values["model.resolution"])
        return
    text = ",".join(map(str, resolution)) if isinstance(resolution, (list, tuple)) else str(resolution)
    sides = [int(float(s)) for s in text.replace("x", ",").split(",") if s.strip()]
    if len(sides) == 2 and sides[0] != sides[1]:
        out.skip("resolution", resolution, "Atelier trains square resolutions (buckets give other shapes)")
    out.set("dataset.resolution", sides[0])


def _as_subsets(run: KohyaRun, args: dict[str, Any], out: Imported) -> None:
    """Every subset as a dataset.subsets entry (sd-scripts ignores train_data_dir / reg_data_dir then)."""
    entries = []
    for subset in run.subsets:
        entry = {key: subset[key] for key in SUBSET_KEYS if key in subset}
        entry["image_dir"] = str(source_path(str(subset.get("image_dir", "")), run.source))
        entries.append(dict(sorted(entry.items(), key=lambda kv: kv[0] != "image_dir")))
        for key in sorted(set(subset) - SUBSET_KEYS - _FOLDER_KEYS - set(DATASET_WIDE)):
            out.skip("datasets.subsets", f"{Path(entry['image_dir']).name}: {key}={subset[key]}",
                     "a subset key Atelier has no field for")  # fmt: skip
    for key in DATASET_WIDE:
        values = {repr(s.get(key, args.get(key))) for s in run.subsets}
        if len(values) == 1 and any(key in s for s in run.subsets):
            args[key] = run.subsets[0].get(key, args.get(key))
        elif len(values) > 1:
            out.skip("datasets.subsets", f"{key} per subset: {[s.get(key, args.get(key)) for s in run.subsets]}",
                     f"{key} is dataset-wide in Atelier (dataset.{key}); the [general] value is used")  # fmt: skip
    out.set("dataset.train_data_dir", None)
    out.set("dataset.reg_data_dir", None)
    out.set("dataset.subsets", entries)


def _conditioning_dir(subsets: list[dict[str, Any]], run: KohyaRun, out: Imported) -> None:
    """The subsets' conditioning_data_dir (masks) as dataset.conditioning_data_dir: one folder for all,
    or per subset <dir>/<its image folder's name> (the layout atelier.data.masks.mask_folder reads)."""
    folders = [(source_path(str(s.get("image_dir", "")), run.source).name,
                source_path(str(s["conditioning_data_dir"]), run.source) if s.get("conditioning_data_dir") else None)
               for s in subsets]  # fmt: skip
    candidates = {str(mask.parent if mask.name == name else mask) for name, mask in folders if mask is not None}
    if len(candidates) == 1 and all(mask is not None for _, mask in folders):
        out.set("dataset.conditioning_data_dir", candidates.pop())
        return
    out.skip("datasets.subsets", [str(mask) for _, mask in folders],
             "Atelier reads masks from one conditioning_data_dir (per concept folder: <dir>/<folder name>)")


def _parent_of(subsets: list[dict[str, Any]], run: KohyaRun) -> str | None:
    """The folder of N_name folders the subsets are, or None: each subset's folder is named
    <num_repeats>_<class_tokens>, carries no key of its own, they share one parent and (where the
    parent is on this machine) are all of its N_name folders."""
    parents = set()
    folders = set()
    for subset in subsets:
        folder = source_path(str(subset.get("image_dir", "")), run.source)
        parsed = parse_concept_folder_name(folder.name)
        repeats, tokens = int(subset.get("num_repeats", 1)), subset.get("class_tokens")
        if parsed is None or parsed[0] != repeats or (tokens is not None and parsed[1] != tokens):
            return None
        if set(subset) - _FOLDER_KEYS:
            return None
        parents.add(folder.parent)
        folders.add(folder.name)
    if len(parents) != 1:
        return None
    parent = parents.pop()
    if parent.is_dir():
        present = {p.name for p in parent.iterdir() if p.is_dir() and parse_concept_folder_name(p.name)}
        if present != folders:
            return None  # training the parent would add folders the source does not train
    return str(parent)
