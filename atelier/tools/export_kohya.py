"""`atelier export-kohya <run_dir>`: the same run for kohya sd-scripts.

From the run's resolved config.yaml it prints the `accelerate launch
train_network.py ...` command line and writes, into the run dir (or --out):
  kohya_config.toml   train_network.py --config_file: flat keys, one per option
  kohya_dataset.toml  --dataset_config: [general] options and one subset per N_name folder
  kohya_prompts.txt   --sample_prompts: the run's sample prompts, every option spelled out
and lists the keys that have no sd-scripts equivalent.

OPTIONS below is the single mapping (our key -> sd-scripts option); it follows the
README's "sd-scripts flags and their keys here" table, plus the dataset options
that carry sd-scripts' names.
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
    return value if value and kohya_module(cfg["network"]) == "networks.lora" else None


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


OPTIONS: tuple[Option, ...] = (
    # model
    Option("model.path", "pretrained_model_name_or_path", convert=_model_path,
           note="the built-in tiny model: its diffusers folder in the cache"),
    Option("model.builtin", None, "covered", note="given as --pretrained_model_name_or_path"),
    Option("model.name", None, "covered", note="the model group option; its keys are mapped"),
    Option("model.config", None, note="sd-scripts finds (or downloads) a single file's configs itself"),
    Option("model.vae", "vae"),
    Option("model.version", "v2", kind="switch", convert=lambda v, c: v == "sd2",
           note="sdxl: sdxl_train_network.py"),
    Option("model.v_parameterization", "v_parameterization", kind="switch"),
    Option("model.resolution", None, "covered", note="the default of dataset.resolution"),
    Option("model.allow_pickle", None, note="sd-scripts loads pickled .ckpt files without asking"),
    # network
    Option("network.module", "network_module", convert=lambda v, c: kohya_module(c["network"]),
           note="lycoris.kohya kinds also get network_args algo=... preset=..."),
    Option("network.dim", "network_dim"),
    Option("network.alpha", "network_alpha"),
    Option("network.weights", "network_weights"),
    Option("network.conv_dim", "network_args", "covered", note="network_args conv_dim=..."),
    Option("network.conv_alpha", "network_args", "covered", note="network_args conv_alpha=..."),
    Option("network.dropout", "network_dropout", convert=_neuron_dropout,
           note="LyCORIS kinds: network_args dropout=..."),
    Option("network.rank_dropout", "network_args", "covered", note="network_args rank_dropout=..."),
    Option("network.module_dropout", "network_args", "covered", note="network_args module_dropout=..."),
    Option("network.factor", "network_args", "covered", note="network_args factor=... (lokr)"),
    Option("network.unit", "network_args", "covered", note="network_args unit=... (dylora)"),
    Option("network.scale_weight_norms", "scale_weight_norms"),
    Option("network.train_unet_only", "network_train_unet_only", kind="switch"),
    Option("network.train_text_encoder_only", "network_train_text_encoder_only", kind="switch"),
    # optimizer
    Option("optimizer.type", "optimizer_type"),
    Option("optimizer.args", "optimizer_args", kind="list", convert=_optimizer_args),
    Option("optimizer.learning_rate", "learning_rate"),
    Option("optimizer.unet_lr", "unet_lr"),
    Option("optimizer.text_encoder_lr", "text_encoder_lr"),
    # scheduler
    Option("scheduler.type", "lr_scheduler"),
    Option("scheduler.warmup_steps", "lr_warmup_steps", convert=_warmup_steps),
    Option("scheduler.warmup_ratio", "lr_warmup_steps", convert=_unless_zero,
           note="a float < 1 is a ratio of the total steps in sd-scripts too (it rounds down, we round up)"),
    Option("scheduler.num_cycles", "lr_scheduler_num_cycles"),
    Option("scheduler.power", "lr_scheduler_power"),
    Option("scheduler.min_lr_ratio", "lr_scheduler_min_lr_ratio"),
    Option("scheduler.decay_steps", "lr_decay_steps", convert=_decay_steps),
    Option("scheduler.decay_ratio", "lr_decay_steps", convert=_unless_zero,
           note="a float < 1 is a ratio of the total steps in sd-scripts too (it rounds down, we round up)"),
    Option("scheduler.timescale", "lr_scheduler_timescale"),
    Option("scheduler.step_rules", "lr_scheduler_args", kind="list",
           convert=lambda v, c: [f"step_rules={v!r}"] if v else None),
    # dataset
    Option("dataset.name", None, "covered", note="names the project folder"),
    Option("dataset.train_data_dir", "train_data_dir", "subsets", convert=lambda v, c: str(Path(v).resolve())),
    Option("dataset.reg_data_dir", "reg_data_dir", "subsets",
           convert=lambda v, c: str(Path(v).resolve()) if v else None),
    Option("dataset.caption_extension", "caption_extension", "dataset"),
    Option("dataset.resolution", "resolution", "dataset"),
    Option("dataset.enable_bucket", "enable_bucket", "dataset", kind="switch"),
    Option("dataset.min_bucket_reso", "min_bucket_reso", "dataset"),
    Option("dataset.max_bucket_reso", "max_bucket_reso", "dataset"),
    Option("dataset.bucket_reso_steps", "bucket_reso_steps", "dataset"),
    Option("dataset.bucket_no_upscale", "bucket_no_upscale", "dataset", kind="switch"),
    Option("dataset.cache_latents", "cache_latents", kind="switch"),
    Option("dataset.cache_latents_to_disk", "cache_latents_to_disk", kind="switch"),
    Option("dataset.latent_cache_dir", None, note="sd-scripts writes its .npz caches beside the images"),
    Option("dataset.cache_text_encoder_outputs", None,
           note="train_network.py (SD1/2) has no text-encoder cache; sdxl_train_network.py has"),
    Option("dataset.max_data_loader_n_workers", "max_data_loader_n_workers"),
    Option("dataset.persistent_data_loader_workers", "persistent_data_loader_workers", kind="switch",
           note="atelier's default is true; sd-scripts' is off"),
    Option("dataset.shuffle_caption", "shuffle_caption", "dataset", kind="switch"),
    Option("dataset.caption_separator", "caption_separator"),
    Option("dataset.keep_tokens", "keep_tokens", "dataset"),
    Option("dataset.keep_tokens_separator", "keep_tokens_separator", "dataset", convert=lambda v, c: v or None),
    Option("dataset.caption_prefix", "caption_prefix", "dataset"),
    Option("dataset.caption_suffix", "caption_suffix", "dataset"),
    Option("dataset.caption_dropout_rate", "caption_dropout_rate", "dataset"),
    Option("dataset.caption_tag_dropout_rate", "caption_tag_dropout_rate", "dataset"),
    Option("dataset.caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", "dataset"),
    Option("dataset.max_token_length", "max_token_length"),
    Option("dataset.flip_aug", "flip_aug", "dataset", kind="switch"),
    Option("dataset.random_crop", "random_crop", "dataset", kind="switch"),
    Option("dataset.color_aug", "color_aug", "dataset", kind="switch"),
    Option("dataset.prior_loss_weight", "prior_loss_weight"),
    Option("dataset.validation_split", "validation_split", convert=_unless_zero,
           note="recent sd-scripts; it holds out images across the dataset, not per concept folder"),
    Option("dataset.validation_seed", "validation_seed", convert=_with_validation),
    Option("dataset.validate_every_n_epochs", "validate_every_n_epochs", convert=_with_validation),
    # training
    Option("training.seed", "seed"),
    Option("training.max_train_epochs", "max_train_epochs"),
    Option("training.max_train_steps", "max_train_steps",
           note="sd-scripts lets max_train_epochs win when both are set; here steps win"),
    Option("training.train_batch_size", "train_batch_size", dataset_key="batch_size"),
    Option("training.gradient_accumulation_steps", "gradient_accumulation_steps"),
    Option("training.gradient_checkpointing", "gradient_checkpointing", kind="switch"),
    Option("training.mixed_precision", "mixed_precision", note="also given to accelerate launch"),
    Option("training.cpu", "cpu", "accelerate", kind="switch"),
    Option("training.num_processes", "num_processes", "accelerate", convert=_unless_one),
    Option("training.clip_skip", "clip_skip"),
    Option("training.min_snr_gamma", "min_snr_gamma"),
    Option("training.noise_offset", "noise_offset", convert=_unless_zero),
    Option("training.max_grad_norm", "max_grad_norm"),
    Option("training.adaptive_noise_scale", "adaptive_noise_scale"),
    Option("training.multires_noise_iterations", "multires_noise_iterations"),
    Option("training.multires_noise_discount", "multires_noise_discount"),
    Option("training.ip_noise_gamma", "ip_noise_gamma"),
    Option("training.zero_terminal_snr", "zero_terminal_snr", kind="switch"),
    Option("training.min_timestep", "min_timestep"),
    Option("training.max_timestep", "max_timestep"),
    Option("training.debiased_estimation_loss", "debiased_estimation_loss", kind="switch"),
    Option("training.loss_type", "loss_type"),
    Option("training.huber_schedule", "huber_schedule"),
    Option("training.huber_c", "huber_c"),
    Option("training.huber_scale", "huber_scale", convert=lambda v, c: None if v == 1.0 else v,
           note="recent sd-scripts; left out at its default 1.0 for older ones"),
    Option("training.attention", "sdpa", kind="switch", convert=_attention,
           note="xformers: --xformers; math: neither switch"),
    Option("training.channels_last", None, note="sd-scripts has no channels_last switch"),
    Option("training.torch_compile", "torch_compile", kind="switch"),
    Option("training.dynamo_backend", "dynamo_backend", convert=_with_torch_compile),
    Option("training.torch_compile_mode", None,
           note="sd-scripts' --torch_compile uses torch.compile's default mode"),
    Option("training.fused_optimizer", None,
           note="pass optimizer_args fused=True to sd-scripts (AdamW, SGD)"),
    Option("training.allow_tf32", None, note="sd-scripts leaves torch's TF32 defaults"),
    Option("training.reuse_base_model", None,
           note="atelier's in-process sweeps; sd-scripts trains one run per process"),
    Option("training.suggest_lr", None,
           note="atelier's lr finder (experiment=lr_find): reads the logged d*lr into lr_suggestion.json"),
    # sampling
    Option("sampling.prompts", "sample_prompts", "covered", note=f"written to {PROMPTS_TXT}"),
    Option("sampling.prompt_file", "sample_prompts", "covered", note=f"its lines written to {PROMPTS_TXT}"),
    Option("sampling.limit", None, "prompts", note="only the first N prompts are written"),
    Option("sampling.width", "w", "prompts"),
    Option("sampling.height", "h", "prompts"),
    Option("sampling.steps", "s", "prompts"),
    Option("sampling.cfg_scale", "l", "prompts"),
    Option("sampling.seed", "d", "prompts"),
    Option("sampling.sample_every_n_epochs", "sample_every_n_epochs"),
    Option("sampling.sampler", "sample_sampler"),
    # output
    Option("output.output_name", "output_name"),
    Option("output.save_every_n_epochs", "save_every_n_epochs"),
    Option("output.save_precision", "save_precision"),
    Option("output.save_state", None,
           note="sd-scripts' --save_state keeps every saved state for --resume; here the last epoch's "
           "state is kept while a run is unfinished"),
    Option("output.save_state_every_n_epochs", None,
           note="sd-scripts saves states with each --save_every_n_epochs checkpoint (with --save_state)"),
    Option("output.save_state_every_n_steps", None,
           note="sd-scripts saves states with each --save_every_n_steps checkpoint (with --save_state); "
           "here a state is also saved on SIGTERM/SIGUSR1/SIGUSR2"),
    # the run
    Option("project", None, "covered", note="the output folder"),
    Option("recipe", None, note="a recipe names sweep axes; export one job's run dir"),
    Option("resume", None, note="sd-scripts: --resume <state folder> (needs --save_state)"),
    Option("overwrite", None, note="atelier's run-dir guard; sd-scripts writes into an existing output dir"),
    Option("dataset.max_image_pixels", None, note="atelier's header check before decoding (PIL's limit by default)"),
    Option("dataset.max_aspect_ratio", None, note="atelier's header check before decoding"),
    Option("dataset.max_samples_per_epoch", None, note="atelier's cap on images x repeats"),
    Option("model.min_bucket_reso", None, note="the model's default for dataset.min_bucket_reso (exported there)"),
    Option("model.max_bucket_reso", None, note="the model's default for dataset.max_bucket_reso (exported there)"),
    Option("model.bucket_reso_steps", None, note="the model's default for dataset.bucket_reso_steps (exported there)"),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


# --- reading the run ------------------------------------------------------------------


def load_run_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

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
    network_args = kohya_network_args(cfg["network"]) if "network" in cfg else {}
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
