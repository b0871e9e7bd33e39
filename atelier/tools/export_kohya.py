"""`atelier export-kohya <run_dir>`: the same run for kohya sd-scripts.

From the run's resolved config.yaml it prints the `accelerate launch
train_network.py ...` command line and writes, into the run dir (or --out):
  kohya_config.toml   train_network.py --config_file: flat keys, one per option
  kohya_dataset.toml  --dataset_config: [general] options and one subset per N_name folder
  kohya_prompts.txt   --sample_prompts: the run's sample prompts, every option spelled out
and lists the keys that have no sd-scripts equivalent.

OPTIONS is the mapping (our key -> sd-scripts option): one entry per schema field, whose
flag and note are declared on the field (atelier/config/schema/, option(flag=..., kohya=...));
HOW says how a value is passed where it is not a plain option value (both in
atelier.tools.kohya_options).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from atelier.config.network_spec import kohya_network_args
from atelier.families import family_of
from atelier.plugins import plugin_of
from atelier.tools.common import ToolError, check_output
from atelier.tools.kohya_options import (  # noqa: F401 (OPTIONS: read from here too)
    OPTIONS,
    OPTIONS_BY_KEY,
    args_value,
    network_config,
)

CONFIG_TOML = "kohya_config.toml"
DATASET_TOML = "kohya_dataset.toml"
PROMPTS_TXT = "kohya_prompts.txt"
KOHYA_OUTPUT_DIR = "sd-scripts"  # sd-scripts' output_dir, inside the export folder: never our files




# --- reading the run ------------------------------------------------------------------


def load_run_config(run_dir: Path) -> dict[str, Any]:

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ToolError(f"'{run_dir}' is not a folder; give a run dir (it holds config.yaml)")
    if not path.is_file():
        hint = " (a sweep folder: give one of its job folders)" if (run_dir / "multirun.yaml").is_file() else ""
        raise ToolError(f"'{run_dir}' has no config.yaml{hint}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict) or "network" not in cfg:
        raise ToolError(f"'{path}' is not the config of a training run")
    return cfg


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; a key of the mapping table is a leaf even when its value is a dict."""
    flat: dict[str, Any] = {}
    for name, value in cfg.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in OPTIONS_BY_KEY:
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def concept_folders(root: str | None) -> list[tuple[Path, int, str]]:
    """(folder, repeats, class tokens) of each N_name subfolder (an unreadable root gives [])."""
    from atelier.data.dataset import parse_concept_folder_name

    if not root:
        return []
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        return []
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        parsed = parse_concept_folder_name(sub.name)
        if parsed is not None:
            found.append((sub, *parsed))
    return found


# --- building the export ----------------------------------------------------------------


@dataclass
class Export:
    script: str
    accelerate: dict[str, Any]  # accelerate launch options
    args: dict[str, Any]  # train_network.py options (command line and config TOML)
    dataset_general: dict[str, Any]  # [general] of the dataset TOML
    subsets: list[dict[str, Any]]
    prompts: list[str]
    unmapped: list[tuple[str, Any, str]]  # key, value, why


def build_export(cfg: dict[str, Any], out_dir: Path) -> Export:
    flat = flatten(cfg)
    args: dict[str, Any] = {}
    accelerate: dict[str, Any] = {"num_cpu_threads_per_process": 1}
    general: dict[str, Any] = {}
    unmapped: list[tuple[str, Any, str]] = []
    for key, value in flat.items():
        option = OPTIONS_BY_KEY.get(key)
        if option is None:
            unmapped.append((key, value, "not in the mapping table"))
            continue
        if option.flag is None and option.place != "covered" and option.place != "prompts":
            unmapped.append((key, value, option.note))
            continue
        if option.place in ("covered", "prompts"):
            continue
        converted = option.convert(value, cfg) if option.convert else value
        if converted is None:
            continue
        if option.kind == "switch":
            converted = bool(converted)
        if option.place == "accelerate":
            if converted:  # a switch (--cpu) or a value (--num_processes 2)
                accelerate[option.flag] = converted
            continue
        (general if option.place == "dataset" else args)[option.flag] = converted
        if option.dataset_key:
            general[option.dataset_key] = converted
    network_args = kohya_network_args(network_config(cfg)) if "network" in cfg else {}
    if network_args:  # one list, from several keys (sd-scripts: key=value strings)
        args["network_args"] = [f"{name}={value}" for name, value in network_args.items()]
    if {"save_last_n_epochs_state", "save_last_n_steps_state"} & set(args):
        args["save_state"] = True  # sd-scripts saves (and so rotates) states only with --save_state
    precision = cfg.get("training", {}).get("mixed_precision")
    if precision:
        accelerate["mixed_precision"] = precision

    out_dir = out_dir.resolve()
    args["output_dir"] = str(out_dir / KOHYA_OUTPUT_DIR)
    args.setdefault("logging_dir", str(out_dir / KOHYA_OUTPUT_DIR / "logs"))  # output.logging_dir wins
    dataset = cfg.get("dataset", {})
    subsets = [
        {"image_dir": str(folder), "num_repeats": repeats, "class_tokens": tokens}
        for folder, repeats, tokens in concept_folders(dataset.get("train_data_dir"))
    ]
    subsets += [
        {"image_dir": str(folder), "num_repeats": repeats, "class_tokens": tokens, "is_reg": True}
        for folder, repeats, tokens in concept_folders(dataset.get("reg_data_dir"))
    ]
    for subset in subsets:
        if not subset["class_tokens"]:
            del subset["class_tokens"]
    subsets += [own_subset(subset) for subset in dataset.get("subsets") or []]
    if dataset.get("conditioning_data_dir"):
        _add_mask_folders(subsets, Path(dataset["conditioning_data_dir"]).expanduser().resolve())
    prompts = sample_prompt_lines(cfg, [s.get("class_tokens", "") for s in subsets if not s.get("is_reg")])
    if prompts:
        args["sample_prompts"] = str(out_dir / PROMPTS_TXT)
    script = family_of(cfg.get("model", {}).get("version", "sd1")).kohya_script
    return Export(script, accelerate, args, general, subsets, prompts, unmapped)


def own_subset(subset: dict[str, Any]) -> dict[str, Any]:
    """A dataset.subsets entry as a [[datasets.subsets]] table: the keys are sd-scripts' own; a null
    (the dataset's value) is left out, so the subset inherits the [general] one there too."""
    table = {key: value for key, value in subset.items() if value is not None}
    table["image_dir"] = str(Path(str(subset["image_dir"])).expanduser().resolve())
    if not table.get("is_reg"):
        table.pop("is_reg", None)
    return table


def _add_mask_folders(subsets: list[dict[str, Any]], conditioning_dir: Path) -> None:
    """dataset.conditioning_data_dir as sd-scripts' per-subset key: each train subset's mask folder
    (atelier.data.masks.mask_folder: <dir>/<concept folder> when it exists, else <dir>)."""
    for subset in subsets:
        if not subset.get("is_reg"):
            mirrored = conditioning_dir / Path(subset["image_dir"]).name
            subset["conditioning_data_dir"] = str(mirrored if mirrored.is_dir() else conditioning_dir)


def sample_prompt_lines(cfg: dict[str, Any], class_tokens: list[str]) -> list[str]:
    """The run's sample prompts with every option (size, steps, CFG, seed) spelled out."""
    from atelier.config.sample_prompts import SampleDefaults, load_prompt_file, parse_prompts

    s = cfg.get("sampling", {})
    defaults = SampleDefaults(
        width=s.get("width", 512), height=s.get("height", 512), steps=s.get("steps", 20),
        cfg_scale=plugin_of(cfg.get("model", {}).get("version", "sd1")).sample_cfg_scale(s.get("cfg_scale")),
        seed=s.get("seed"),
    )  # fmt: skip
    try:
        if s.get("prompts"):
            prompts = parse_prompts(list(s["prompts"]), defaults)
        elif s.get("prompt_file"):
            prompts = load_prompt_file(s["prompt_file"], defaults)
        else:
            prompts = parse_prompts([t for t in class_tokens if t], defaults)
    except (OSError, ValueError) as error:
        raise ToolError(f"cannot read the run's sample prompts: {error}") from error
    if s.get("limit") is not None:
        prompts = prompts[: s["limit"]]
    lines = []
    for p in prompts:
        line = f"{p.prompt} --w {p.width} --h {p.height} --s {p.steps} --l {p.cfg_scale:g} --d {p.seed}"
        if p.negative_prompt:
            line += f" --n {p.negative_prompt}"
        if p.sampler:
            line += f" --ss {p.sampler}"
        if p.guidance is not None:
            line += f" --g {p.guidance:g}"
        lines.append(line)
    return lines


# --- writing ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    raise ToolError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def _table(values: dict[str, Any]) -> list[str]:
    return [f"{key} = {toml_value(value)}" for key, value in values.items()]


def config_toml(export: Export, run_dir: Path, dataset_toml: Path | None) -> str:
    args = dict(export.args)
    if dataset_toml is not None:
        # The dataset TOML's subsets replace train_data_dir / reg_data_dir.
        args.pop("train_data_dir", None)
        args.pop("reg_data_dir", None)
        args["dataset_config"] = str(dataset_toml)
    else:
        args.update({k: args_value(k, v) for k, v in export.dataset_general.items() if k != "batch_size"})
    lines = [
        f"# sd-scripts {export.script} --config_file for the atelier run {run_dir}",
        "# written by `atelier export-kohya`; keys are train_network.py options without the dashes",
        *_table(args),
    ]
    return "\n".join(lines) + "\n"


def dataset_toml(export: Export, run_dir: Path) -> str:
    lines = [
        f"# sd-scripts --dataset_config for the atelier run {run_dir} (written by `atelier export-kohya`)",
        "# one subset per N_name folder: N = num_repeats, name = class_tokens",
        "[general]",
        *_table(export.dataset_general),
        "",
        "[[datasets]]",
    ]
    for subset in export.subsets:
        lines += ["", "  [[datasets.subsets]]", *("  " + line for line in _table(subset))]
    return "\n".join(lines) + "\n"


def command_line(export: Export) -> str:
    """`accelerate launch ... train_network.py --option value ...`, one option per line."""
    launch = ["accelerate", "launch"]
    for name, value in export.accelerate.items():
        launch += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    segments = [" ".join(shlex.quote(p) for p in [*launch, export.script])]
    options = dict(export.args)
    options.update({k: args_value(k, v) for k, v in export.dataset_general.items() if k != "batch_size"})
    for name, value in options.items():
        if isinstance(value, bool):
            words = [f"--{name}"] if value else []
        elif isinstance(value, (list, tuple)):
            words = [f"--{name}", *map(str, value)]
        else:
            words = [f"--{name}", str(value)]
        if words:
            segments.append(" ".join(shlex.quote(w) for w in words))
    return " \\\n    ".join(segments)


def run(args: argparse.Namespace) -> int:
    from atelier.utils.atomic import write_text

    run_dir = Path(args.run_dir).expanduser().resolve()
    cfg = load_run_config(run_dir)
    out_dir = Path(args.out).expanduser().resolve() if args.out else run_dir
    export = build_export(cfg, out_dir)
    outputs = {CONFIG_TOML: out_dir / CONFIG_TOML}
    if export.subsets:
        outputs[DATASET_TOML] = out_dir / DATASET_TOML
    if export.prompts:
        outputs[PROMPTS_TXT] = out_dir / PROMPTS_TXT
    for path in outputs.values():
        check_output(path, args.force)

    dataset_path = outputs.get(DATASET_TOML)
    if dataset_path is not None:
        write_text(dataset_path, dataset_toml(export, run_dir))
    if export.prompts:
        write_text(outputs[PROMPTS_TXT], "\n".join(export.prompts) + "\n")
    write_text(outputs[CONFIG_TOML], config_toml(export, run_dir, dataset_path))

    if cfg.get("dataset", {}).get("subsets"):  # per-subset options have no command-line flags
        print(f"# dataset.subsets are in {DATASET_TOML}: train with the --config_file command below")
    else:
        print("# sd-scripts command line for this run (from the sd-scripts folder):")
        print(command_line(export))
    print("\n# or, with the files written here:")
    print(f"accelerate launch {export.script} --config_file {shlex.quote(str(outputs[CONFIG_TOML]))}")
    print("\nwrote " + ", ".join(str(p) for p in outputs.values()))
    if not export.subsets:
        print(f"note: no N_name folders under dataset.train_data_dir and no dataset.subsets; {DATASET_TOML} not written")
    if export.unmapped:
        print("\nno sd-scripts equivalent (left out):")
        for key, value, why in export.unmapped:
            print(f"  {key}={json.dumps(value)}: {why}")
    return 0
