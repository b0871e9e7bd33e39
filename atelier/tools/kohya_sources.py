"""What kohya users already have, read as sd-scripts' train_network.py options: an sd-scripts
--config_file TOML, a --dataset_config TOML, a kohya_ss GUI JSON, or a saved
`accelerate launch train_network.py ...` command line (atelier import-kohya maps the result).

Each reader gives a KohyaRun: option name (sd-scripts', no dashes) -> value as sd-scripts would
parse it, typed by the option's declaration in sd_scripts_args.json.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.tools.common import ToolError
from atelier.tools.kohya_coverage import KohyaOption, script_options

SDXL_SCRIPT = "sdxl_train_network.py"
FLUX_SCRIPT = "flux_train_network.py"


@dataclass
class KohyaRun:
    source: Path
    kind: str  # "config TOML", "dataset TOML", "kohya_ss GUI JSON", "command line"
    script: str = "train_network.py"
    args: dict[str, Any] = field(default_factory=dict)  # train_network.py options
    accelerate: dict[str, Any] = field(default_factory=dict)  # accelerate launch options
    general: dict[str, Any] = field(default_factory=dict)  # a dataset TOML's [general] (and [[datasets]] keys)
    subsets: list[dict[str, Any]] = field(default_factory=list)  # a dataset TOML's subsets
    unknown: dict[str, Any] = field(default_factory=dict)  # names sd-scripts does not know: listed, not mapped


def read_source(path: Path, script: str | None = None) -> KohyaRun:
    """Any of the four, told apart by suffix and content. `script`: the sd-scripts script a
    config TOML is for (a TOML does not say; import-kohya's --sdxl / --flux)."""
    if not path.is_file():
        raise ToolError(f"{path}: no such file; give an sd-scripts config or dataset TOML, a kohya_ss GUI JSON, "
                        "or a file holding the training command line")  # fmt: skip
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        data = _toml(text, path)
        if "datasets" in data:
            run = KohyaRun(path, "dataset TOML")
            _read_dataset(run, data)
            return run
        return _read_config(path, data, script or "train_network.py")
    if path.suffix.lower() == ".json":
        return _read_gui(path, text)
    return _read_command(path, text)


def _toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ToolError(f"{path} is not valid TOML: {err}") from None


# --- values ------------------------------------------------------------------------------


def typed(option: KohyaOption, value: Any, where: str) -> Any:
    """`value` as sd-scripts' argparse would hand it over (numbers from strings, lists for nargs)."""
    if option.switch:
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
    if option.nargs in ("*", "+"):
        items = value if isinstance(value, list) else str(value).split()
        return [_scalar(option, item, where) for item in items]
    return _scalar(option, value, where)


def _scalar(option: KohyaOption, value: Any, where: str) -> Any:
    kind = option.type
    if isinstance(value, bool) or kind not in ("int", "float", "int_or_float"):
        return value
    text = str(value).strip()
    try:
        if kind == "int":
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind == "float":
            return float(text)
        number = float(text)  # int_or_float: lr_warmup_steps (a whole number: steps; below 1: a ratio)
        return int(number) if number.is_integer() and number >= 1 else number
    except ValueError:
        raise ToolError(f"{where}: --{option.name} needs a number, got {value!r}") from None


def _put(run: KohyaRun, name: str, value: Any, where: str) -> None:
    """One option: typed when sd-scripts knows it, kept aside when it does not. Unset values
    (None, "") are dropped: sd-scripts' default applies."""
    if value is None or value == "":
        return
    option = script_options(run.script).get(name)
    if option is None:
        run.unknown[name] = value
        return
    run.args[name] = typed(option, value, where)


# --- sd-scripts TOML configs ---------------------------------------------------------------


def _read_config(path: Path, data: dict[str, Any], script: str) -> KohyaRun:
    """--config_file: sd-scripts reads every key of every table as an option (the tables only group)."""
    run = KohyaRun(path, "config TOML", script=script)
    for key, value in data.items():
        for name, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            _put(run, name, item, str(path))
    dataset = run.args.pop("dataset_config", None)
    if dataset:
        dataset_path = Path(dataset).expanduser()
        if not dataset_path.is_absolute():
            dataset_path = path.parent / dataset_path
        if not dataset_path.is_file():
            raise ToolError(f"{path}: dataset_config={dataset}: no such file (give it next to the config, or its full path)")
        _read_dataset(run, _toml(dataset_path.read_text(encoding="utf-8"), dataset_path))
    return run


def _read_dataset(run: KohyaRun, data: dict[str, Any]) -> None:
    """--dataset_config: [general], then [[datasets]] (one is supported) with [[datasets.subsets]]."""
    run.general.update(data.get("general", {}))
    datasets = data.get("datasets", [])
    if len(datasets) > 1:
        raise ToolError(f"{run.source}: {len(datasets)} [[datasets]]; Atelier trains one dataset per run: "
                        "import each dataset's subsets as a run of its own")  # fmt: skip
    for dataset in datasets:
        run.general.update({k: v for k, v in dataset.items() if k != "subsets"})
        run.subsets.extend(dict(subset) for subset in dataset.get("subsets", []))


# --- kohya_ss GUI JSON ---------------------------------------------------------------------

# kohya_ss' LoRA_type -> (network_module, LyCORIS algo or None), as its lora_gui.py builds the command.
GUI_LORA_TYPES = {
    "Standard": ("networks.lora", None), "Kohya LoCon": ("networks.lora", None),
    "LoCon": ("lycoris.kohya", "locon"), "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"), "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3"), "Kohya DyLoRA": ("networks.dylora", None),
}  # fmt: skip
# GUI fields whose 0 means "off" (lora_gui.py passes None for them).
GUI_ZERO_IS_UNSET = {
    "seed", "max_train_steps", "max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_steps",
    "save_last_n_epochs", "save_last_n_steps_state", "save_last_n_epochs_state", "sample_every_n_epochs",
    "sample_every_n_steps", "min_snr_gamma", "min_timestep", "max_timestep", "ip_noise_gamma", "vae_batch_size",
    "v_pred_like_loss", "stop_text_encoder_training", "unet_lr", "multires_noise_iterations", "noise_offset",
    "caption_dropout_every_n_epochs", "network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms",
}  # fmt: skip
# GUI fields that only steer the GUI, or that the GUI turns into other options (handled below).
GUI_ONLY = {
    "LoRA_type", "LyCORIS_preset", "epoch", "optimizer", "lr_warmup", "max_resolution", "xformers", "sdxl",
    "sdxl_no_half_vae", "num_cpu_threads_per_process", "additional_parameters", "noise_offset_type", "conv_dim",
    "conv_alpha", "factor", "unit", "use_cp", "use_tucker", "use_scalar", "decompose_both", "train_on_input",
    "dora_wd", "bypass_mode", "rank_dropout_scale", "train_norm", "constrain", "rescaled", "lora_network_weights",
    "stop_text_encoder_training_pct", "block_alphas", "block_dims", "block_lr_zero_threshold", "conv_block_alphas",
    "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "model_list", "save_as_bool",
}  # fmt: skip


def _read_gui(path: Path, text: str) -> KohyaRun:
    try:
        gui = json.loads(text)
    except json.JSONDecodeError as err:
        raise ToolError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(gui, dict) or "LoRA_type" not in gui:
        raise ToolError(f"{path} is not a kohya_ss LoRA config (no LoRA_type); give a JSON saved from its LoRA tab")
    run = KohyaRun(path, "kohya_ss GUI JSON", script=SDXL_SCRIPT if gui.get("sdxl") else "train_network.py")
    for name, value in gui.items():
        if name in GUI_ONLY or (name in GUI_ZERO_IS_UNSET and _is_zero(value)) or value is False:
            continue
        _put(run, name, value, str(path))
    _gui_network(run, gui)
    _put(run, "optimizer_type", gui.get("optimizer"), str(path))
    _put(run, "network_weights", gui.get("lora_network_weights"), str(path))
    _put(run, "resolution", gui.get("max_resolution"), str(path))
    if not gui.get("max_train_epochs") or _is_zero(gui.get("max_train_epochs")):
        _put(run, "max_train_epochs", gui.get("epoch"), str(path))  # the GUI's epoch count sets the length
    if not run.args.get("lr_warmup_steps") and not _is_zero(gui.get("lr_warmup", 0)):
        run.args["lr_warmup_steps"] = float(gui["lr_warmup"]) / 100  # a percent of the steps: sd-scripts' ratio
    attention = gui.get("xformers")
    if attention in (True, "xformers", "sdpa"):
        run.args["sdpa" if attention == "sdpa" else "xformers"] = True
    if gui.get("sdxl") and gui.get("sdxl_no_half_vae"):
        run.args["no_half_vae"] = True
    if gui.get("noise_offset_type") == "Multires":
        run.args.pop("noise_offset", None)
    else:
        run.args.pop("multires_noise_iterations", None)
        run.args.pop("multires_noise_discount", None)
    if gui.get("num_cpu_threads_per_process"):
        run.accelerate["num_cpu_threads_per_process"] = gui["num_cpu_threads_per_process"]
    if str(gui.get("additional_parameters") or "").strip():
        _read_words(run, shlex.split(gui["additional_parameters"]), f"{path}: additional_parameters")
    return run


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return value in ("", None)


def _gui_network(run: KohyaRun, gui: dict[str, Any]) -> None:
    lora_type = gui.get("LoRA_type")
    if lora_type not in GUI_LORA_TYPES:
        run.unknown["LoRA_type"] = lora_type
        return
    module, algo = GUI_LORA_TYPES[lora_type]
    run.args["network_module"] = module
    args = []
    if algo:
        args += [f"algo={algo}", f"preset={gui.get('LyCORIS_preset') or 'full'}"]
    conv = lora_type == "Kohya LoCon" or (algo in ("locon", "loha", "lokr") and not _is_zero(gui.get("conv_dim", 0)))
    if conv:
        args += [f"conv_dim={gui.get('conv_dim')}", f"conv_alpha={gui.get('conv_alpha', 1)}"]
    if algo == "lokr":
        args.append(f"factor={gui.get('factor', -1)}")
    if module == "networks.dylora":
        args.append(f"unit={gui.get('unit', 1)}")
    for name in ("rank_dropout", "module_dropout"):
        if not _is_zero(gui.get(name, 0)):
            args.append(f"{name}={gui[name]}")
    if algo and not _is_zero(gui.get("network_dropout", 0)):
        args.append(f"dropout={gui['network_dropout']}")
        run.args.pop("network_dropout", None)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                 "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "dora_wd", "use_tucker", "use_cp",
                 "use_scalar", "decompose_both", "bypass_mode", "train_norm"):  # fmt: skip
        if gui.get(name) not in (None, "", False, 0, "0"):
            args.append(f"{name}={gui[name]}")
    if args:
        run.args["network_args"] = args


# --- a saved command line --------------------------------------------------------------------


def _read_command(path: Path, text: str) -> KohyaRun:
    """`[accelerate launch [opts]] [python] train_network.py --opt value ...` (line continuations,
    comments and a leading shell prompt are fine)."""
    lines = [line.split("#", 1)[0] if line.lstrip().startswith("#") else line for line in text.splitlines()]
    try:
        words = shlex.split(" ".join(line.rstrip().removesuffix("\\").removesuffix("^").removesuffix("`") for line in lines))
    except ValueError as err:
        raise ToolError(f"{path}: cannot split the command line ({err})") from None
    scripts = [i for i, word in enumerate(words) if Path(word).name.endswith("train_network.py")]
    if not scripts:
        raise ToolError(f"{path}: no train_network.py (or sdxl_train_network.py) in the command line")
    at = scripts[0]
    run = KohyaRun(path, "command line", script=Path(words[at]).name)
    launch = words[:at]
    if "launch" in launch:
        _read_accelerate(run, launch[launch.index("launch") + 1:])
    _read_words(run, words[at + 1:], str(path))
    return run


def _split_options(words: list[str], where: str) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for word in words:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            found.append((name, [value] if eq else []))
        elif found:
            found[-1][1].append(word)
        else:
            raise ToolError(f"{where}: {word!r} comes before any --option")
    return found


def _read_words(run: KohyaRun, words: list[str], where: str) -> None:
    for name, values in _split_options(words, where):
        option = script_options(run.script).get(name)
        if option is None:
            run.unknown[name] = " ".join(values) if values else True
        elif option.switch:
            run.args[name] = True
        elif option.nargs in ("*", "+"):
            run.args[name] = typed(option, values, where)
        elif len(values) != 1:
            raise ToolError(f"{where}: --{name} takes one value, got {len(values)}: {' '.join(values) or 'none'}")
        else:
            _put(run, name, values[0], where)


def _read_accelerate(run: KohyaRun, words: list[str]) -> None:
    for name, values in _split_options(words, "accelerate launch"):
        run.accelerate[name] = values[0] if len(values) == 1 else (True if not values else values)
