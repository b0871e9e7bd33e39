"""`atelier export-kohya <run_dir>`: the same run for kohya sd-scripts.

From the run's resolved config.yaml it prints the `accelerate launch
train_network.py ...` command line and writes, into the run dir (or --out):
  kohya_config.toml   train_network.py --config_file: flat keys, one per option
  kohya_dataset.toml  --dataset_config: [general] options and one subset per N_name folder
  kohya_prompts.txt   --sample_prompts: the run's sample prompts, every option spelled out
and lists the keys that have no sd-scripts equivalent.

OPTIONS is the mapping (our key -> sd-scripts option): one entry per schema field, whose
flag and note are declared on the field (atelier/config/schema/, option(flag=..., kohya=...));
HOW below says how a value is passed where it is not a plain option value.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from atelier.config.options import schema_fields
from atelier.config.schema import NetworkConfig, flag_name
from atelier.network.spec import kohya_module, kohya_network_args
from atelier.tools.common import ToolError, check_output

CONFIG_TOML = "kohya_config.toml"
DATASET_TOML = "kohya_dataset.toml"
PROMPTS_TXT = "kohya_prompts.txt"
KOHYA_OUTPUT_DIR = "sd-scripts"  # sd-scripts' output_dir, inside the export folder: never our files


@dataclass(frozen=True)
class Option:
    """How one of our config keys becomes an sd-scripts option.

    flag: the train_network.py option (no dashes); None: no equivalent (`note` says why).
    place: "args" (command line + kohya_config.toml), "dataset" (command line + [general] of
      kohya_dataset.toml), "subsets" (command line; the dataset TOML has one subset per
      folder instead), "accelerate" (an `accelerate launch` option), "prompts" (written into
      each line of kohya_prompts.txt), "covered" (expressed through another option).
    kind: "value", "switch" (store_true: given when true) or "list" (nargs='*').
    convert: value -> the option's value (None: leave the option out).
    dataset_key: also written to the dataset TOML's [general] under this name.
    """

    key: str
    flag: str | None
    place: str = "args"
    kind: str = "value"
    convert: Callable[[Any, dict[str, Any]], Any] | None = None
    dataset_key: str | None = None
    note: str = ""


def network_config(cfg: dict[str, Any]) -> NetworkConfig:
    """The run's network options as the schema's typed NetworkConfig (what atelier.network.spec reads)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(NetworkConfig), cfg["network"]))


def _unless_zero(value: Any, cfg: dict[str, Any]) -> Any:
    return value or None


def _unless_one(value: Any, cfg: dict[str, Any]) -> Any:
    return None if value == 1 else value


def _optimizer_args(value: dict[str, Any] | None, cfg: dict[str, Any]) -> list[str] | None:
    """sd-scripts parses each "key=value" with ast.literal_eval; lists become tuples."""
    if not value:
        return None
    items = []
    for name, arg in value.items():
        if isinstance(arg, (list, tuple)):
            text = ",".join(repr(v) for v in arg)
        elif isinstance(arg, str):
            text = repr(arg)
        else:
            text = repr(arg)
        items.append(f"{name}={text}")
    return items


def _warmup_steps(value: int, cfg: dict[str, Any]) -> int | None:
    if cfg["scheduler"].get("warmup_ratio") is not None:
        return None  # the ratio row gives lr_warmup_steps
    return value or None


def _decay_steps(value: int, cfg: dict[str, Any]) -> int | None:
    if cfg["scheduler"].get("decay_ratio") is not None:
        return None  # the ratio row gives lr_decay_steps
    return value or None


def _model_path(value: str | None, cfg: dict[str, Any]) -> str:
    if value:
        return str(Path(value).expanduser().resolve())
    from atelier.models.tiny import TINY_MODEL_DIRNAMES, default_cache_dir

    builtin = cfg["model"].get("builtin")
    if builtin in TINY_MODEL_DIRNAMES:
        return str(default_cache_dir() / TINY_MODEL_DIRNAMES[builtin])
    raise ToolError("the run has neither model.path nor a known model.builtin")


def _neuron_dropout(value: float | None, cfg: dict[str, Any]) -> float | None:
    """--network_dropout is networks.lora's; LyCORIS takes it in network_args."""
    return value if value and kohya_module(network_config(cfg)) == "networks.lora" else None


def _with_validation(value: Any, cfg: dict[str, Any]) -> Any:
    """Validation options only when validation is on (older sd-scripts do not know them)."""
    return value if cfg["dataset"].get("validation_split") else None


def _attention(value: Any, cfg: dict[str, Any]) -> bool:
    return value == "sdpa"


def _with_torch_compile(value: Any, cfg: dict[str, Any]) -> Any:
    return value if cfg["training"].get("torch_compile") else None


def _args_value(name: str, value: Any) -> Any:
    """The dataset TOML's resolution is a number; train_network.py's --resolution a string."""
    return str(value) if name == "resolution" else value


def _path(value: str | None, cfg: dict[str, Any]) -> str | None:
    return str(Path(value).resolve()) if value else None


# How a key is exported where it is not a plain value for its flag (the flag and the note
# are the schema's: option(flag=..., kohya=...)).
HOW: dict[str, dict[str, Any]] = {
    "model.path": {"convert": _model_path},
    "model.builtin": {"place": "covered"},
    "model.name": {"place": "covered"},
    "model.version": {"kind": "switch", "convert": lambda v, c: v == "sd2"},
    "model.v_parameterization": {"kind": "switch"},
    "model.resolution": {"place": "covered"},
    "network.module": {"convert": lambda v, c: kohya_module(network_config(c))},
    # network_args is one list made from several keys (build_export)
    **{f"network.{name}": {"place": "covered"}
       for name in ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "factor", "unit")},
    "network.dropout": {"convert": _neuron_dropout},
    "network.train_unet_only": {"kind": "switch"},
    "network.train_text_encoder_only": {"kind": "switch"},
    "optimizer.args": {"kind": "list", "convert": _optimizer_args},
    "scheduler.warmup_steps": {"convert": _warmup_steps},
    "scheduler.warmup_ratio": {"convert": _unless_zero},
    "scheduler.decay_steps": {"convert": _decay_steps},
    "scheduler.decay_ratio": {"convert": _unless_zero},
    "scheduler.step_rules": {"kind": "list", "convert": lambda v, c: [f"step_rules={v!r}"] if v else None},
    "dataset.name": {"place": "covered"},
    "dataset.train_data_dir": {"place": "subsets", "convert": _path},
    "dataset.reg_data_dir": {"place": "subsets", "convert": _path},
    **{f"dataset.{name}": {"place": "dataset"}
       for name in ("caption_extension", "resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                    "keep_tokens", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                    "caption_tag_dropout_rate", "caption_dropout_every_n_epochs")},
    **{f"dataset.{name}": {"place": "dataset", "kind": "switch"}
       for name in ("enable_bucket", "bucket_no_upscale", "shuffle_caption", "flip_aug", "random_crop", "color_aug")},
    "dataset.keep_tokens_separator": {"place": "dataset", "convert": lambda v, c: v or None},
    "dataset.cache_latents": {"kind": "switch"},
    "dataset.cache_latents_to_disk": {"kind": "switch"},
    "dataset.persistent_data_loader_workers": {"kind": "switch"},
    "dataset.validation_split": {"convert": _unless_zero},
    "dataset.validation_seed": {"convert": _with_validation},
    "dataset.validate_every_n_epochs": {"convert": _with_validation},
    "training.train_batch_size": {"dataset_key": "batch_size"},
    "training.gradient_checkpointing": {"kind": "switch"},
    "training.cpu": {"place": "accelerate", "kind": "switch"},
    "training.num_processes": {"place": "accelerate", "convert": _unless_one},
    "training.noise_offset": {"convert": _unless_zero},
    "training.zero_terminal_snr": {"kind": "switch"},
    "training.debiased_estimation_loss": {"kind": "switch"},
    "training.huber_scale": {"convert": lambda v, c: None if v == 1.0 else v},
    "training.attention": {"kind": "switch", "convert": _attention},
    "training.torch_compile": {"kind": "switch"},
    "training.dynamo_backend": {"convert": _with_torch_compile},
    "sampling.prompts": {"place": "covered"},
    "sampling.prompt_file": {"place": "covered"},
    **{f"sampling.{name}": {"place": "prompts"} for name in ("limit", "width", "height", "steps", "cfg_scale", "seed")},
    "project": {"place": "covered"},
}


def _options() -> tuple[Option, ...]:
    """One Option per schema field: its flag and note from the schema, how it is exported from HOW."""
    options = []
    for key, field in schema_fields().items():
        flag = field.metadata["flag"]
        options.append(Option(key, flag_name(flag) if flag else None, note=field.metadata["kohya"], **HOW.get(key, {})))
    return tuple(options)


OPTIONS: tuple[Option, ...] = _options()
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


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
            if converted:
                accelerate[option.flag] = True
            continue
        (general if option.place == "dataset" else args)[option.flag] = converted
        if option.dataset_key:
            general[option.dataset_key] = converted
    network_args = kohya_network_args(network_config(cfg)) if "network" in cfg else {}
    if network_args:  # one list, from several keys (sd-scripts: key=value strings)
        args["network_args"] = [f"{name}={value}" for name, value in network_args.items()]
    precision = cfg.get("training", {}).get("mixed_precision")
    if precision:
        accelerate["mixed_precision"] = precision

    out_dir = out_dir.resolve()
    args["output_dir"] = str(out_dir / KOHYA_OUTPUT_DIR)
    args["logging_dir"] = str(out_dir / KOHYA_OUTPUT_DIR / "logs")
    args["save_model_as"] = "safetensors"
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
    prompts = sample_prompt_lines(cfg, [s.get("class_tokens", "") for s in subsets if not s.get("is_reg")])
    if prompts:
        args["sample_prompts"] = str(out_dir / PROMPTS_TXT)
    version = cfg.get("model", {}).get("version")
    script = "sdxl_train_network.py" if version == "sdxl" else "train_network.py"
    return Export(script, accelerate, args, general, subsets, prompts, unmapped)


def sample_prompt_lines(cfg: dict[str, Any], class_tokens: list[str]) -> list[str]:
    """The run's sample prompts with every option (size, steps, CFG, seed) spelled out."""
    from atelier.sampling.prompts import SampleDefaults, load_prompt_file, parse_prompts

    s = cfg.get("sampling", {})
    defaults = SampleDefaults(
        width=s.get("width", 512), height=s.get("height", 512), steps=s.get("steps", 20),
        cfg_scale=s.get("cfg_scale", 7.0), seed=s.get("seed"),
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
        args.update({k: _args_value(k, v) for k, v in export.dataset_general.items() if k != "batch_size"})
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
    options.update({k: _args_value(k, v) for k, v in export.dataset_general.items() if k != "batch_size"})
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

    print("# sd-scripts command line for this run (from the sd-scripts folder):")
    print(command_line(export))
    print("\n# or, with the files written here:")
    print(f"accelerate launch {export.script} --config_file {shlex.quote(str(outputs[CONFIG_TOML]))}")
    print("\nwrote " + ", ".join(str(p) for p in outputs.values()))
    if not export.subsets:
        print(f"note: no N_name folders found under dataset.train_data_dir; {DATASET_TOML} not written")
    if export.unmapped:
        print("\nno sd-scripts equivalent (left out):")
        for key, value, why in export.unmapped:
            print(f"  {key}={json.dumps(value)}: {why}")
    return 0
