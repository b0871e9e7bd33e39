"""`atelier import-kohya <file>`: what a kohya user already has, as an Atelier experiment config.

The file is an sd-scripts --config_file TOML (its dataset_config followed), a --dataset_config
TOML, a kohya_ss GUI JSON or a saved `accelerate launch train_network.py ...` command line
(atelier.tools.kohya_sources reads them). Each option is mapped to the config key that carries
its flag (the schema's option(flag=...), as export-kohya writes them); options sd-scripts left
at its default get sd-scripts' default where ours differs, so the run trains the same thing.
The experiment (conf/experiment/<name>.yaml, or --out) states every imported value; an option
with no Atelier key is listed by name in the file's header and on the console, never dropped.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from atelier.config.network_kinds import KINDS, PRESETS
from atelier.config.options import ConfigOption
from atelier.families import family_of_script, known_scripts
from atelier.tools.common import ToolError, check_output
from atelier.tools.import_dataset import import_dataset
from atelier.tools.imported import Imported, source_path
from atelier.tools.kohya_coverage import ours_by_flag, sd_scripts_options
from atelier.tools.kohya_sources import FLUX_SCRIPT, SDXL_SCRIPT, KohyaRun, read_source

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
# The groups the experiment states in full (their conf/ options would add values of their own).
STATED_GROUPS = ("model", "network", "optimizer", "scheduler", "dataset")
# Options handled by a function of their own below (not a plain value for one key).
HANDLED = {
    "pretrained_model_name_or_path", "v2", "network_module", "network_args", "network_dim", "network_alpha",
    "optimizer_args", "lr_scheduler_args", "lr_warmup_steps", "lr_decay_steps", "text_encoder_lr", "resolution",
    "xformers", "sdpa", "mem_eff_attn", "sample_prompts", "train_data_dir", "reg_data_dir", "max_train_epochs",
    "max_train_steps", "output_dir",
}  # fmt: skip
# Atelier's model resolution (the bucket and sample default) per family.


def import_run(run: KohyaRun) -> Imported:
    out = Imported()
    args = {**run.args, **_dataset_general(run)}
    ours = ours_by_flag()
    _model(run, args, out)
    _network(args, out, ours, family_of_script(run.script, v2=bool(args.get("v2"))).lora_module)
    _optimizer(args, out)
    _scheduler(args, out, ours)
    _length(args, out)
    import_dataset(run, args, out)
    _attention(args, out)
    if args.get("sample_prompts"):
        out.set("sampling.prompt_file", str(source_path(args["sample_prompts"], run.source)))
    if "output_dir" in args:
        out.notes.append(f"--output_dir {args['output_dir']}: the run goes to Hydra's run dir (outputs/<project>/...)")
    for name, value in args.items():
        if name in HANDLED or name in ("dataset_config", "config_file"):
            continue
        simple = [o for o in ours.get(name, []) if o.flag == name]
        if simple:
            out.set(simple[0].key, _value_for(simple[0], value))
        else:
            out.skip(name, value)
    _accelerate(run, out)
    _sd_scripts_defaults(args, out, ours)
    for name, value in run.unknown.items():
        out.skip(name, value, f"not an option of sd-scripts' {run.script}")
    return out


def _value_for(option: ConfigOption, value: Any) -> Any:
    if option.key == "model.version":
        return "sd2" if value else "sd1"
    return value


def _dataset_general(run: KohyaRun) -> dict[str, Any]:
    """A dataset TOML's [general] keys as options (batch_size is train_batch_size there)."""
    general = {("train_batch_size" if k == "batch_size" else k): v for k, v in run.general.items()}
    known = sd_scripts_options()
    return {k: v for k, v in general.items() if k in known}


def _model(run: KohyaRun, args: dict[str, Any], out: Imported) -> None:
    try:
        family = family_of_script(run.script, v2=bool(args.get("v2")))
    except ValueError as error:
        raise ToolError(f"{run.source}: {error}; Atelier reads runs of {', '.join(known_scripts())}") from None
    path = args.get("pretrained_model_name_or_path")
    out.set("model.name", Path(str(path)).stem if path else "imported")
    out.set("model.path", str(path) if path else "???")
    out.set("model.builtin", None)
    out.set("model.version", family.version)
    out.set("model.resolution", family.base(bool(args.get("v_parameterization"))).resolution)
    if not path:
        out.notes.append("no --pretrained_model_name_or_path: set model.path before training")
    elif family.extra_files:  # FLUX's single files load with configs and tokenizers from a local folder
        out.notes.append(f"{family.label} single files also need model.config=<a local diffusers {family.label} folder> "
                         "(configs and tokenizers; nothing is downloaded)")


def _kv_list(items: list[str], option: str, out: Imported) -> dict[str, Any]:
    """["k=v", ...] as sd-scripts reads them (ast.literal_eval where it parses, else the text)."""
    found = {}
    for item in items:
        key, eq, text = str(item).partition("=")
        if not eq:
            out.skip(option, item, "not key=value")
            continue
        try:
            found[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            found[key.strip()] = text.strip()
    return found


def _network(args: dict[str, Any], out: Imported, ours: dict[str, list[ConfigOption]],
             family_module: str | None = None) -> None:  # fmt: skip
    """family_module: the family's own LoRA module (FLUX: networks.lora_flux), read as network=lora."""
    module = args.get("network_module", "networks.lora")
    if family_module is not None and module == family_module:
        module = "networks.lora"
    extra = _kv_list(args.get("network_args", []), "network_args", out)
    algo = extra.pop("algo", "lora" if module == "lycoris.kohya" else None)
    kind = _kind_of(module, algo)
    if kind is None:
        out.skip("network_module", f"{module}" + (f" algo={algo}" if algo else ""),
                 f"Atelier trains {', '.join(KINDS)}; this kind is not one of them (lora is imported instead)")  # fmt: skip
        kind = "lora"
    out.set("network.module", kind)
    # networks.lora's defaults when none is given (sd-scripts: dim 4, alpha 1).
    out.set("network.dim", 4 if args.get("network_dim") is None else args["network_dim"])
    out.set("network.alpha", args.get("network_alpha", 1.0))
    preset = extra.pop("preset", None)
    entry = KINDS[kind]
    if preset is not None and preset != (entry.lycoris_preset or ("full" if extra.get("conv_dim") else "attn-mlp")):
        if "preset" in entry.args and preset in PRESETS:
            _preset(preset, args, extra, out)
        else:
            out.skip("network_args", f"preset={preset}", "Atelier's targets are LyCORIS' attn-mlp (full with conv_dim)")
    by_arg = {o.flag.split()[1]: o for o in ours.get("network_args", []) if len(o.flag.split()) == 2}
    for name, value in extra.items():
        if name in by_arg and (by_arg[name].key.split(".")[1] in entry.args or (family_module and name == "train_blocks")):
            out.set(by_arg[name].key, value)
        else:
            out.skip("network_args", f"{name}={_text(value)}", f"not an option network.module={kind} takes here")


def _preset(preset: str, args: dict[str, Any], extra: dict[str, Any], out: Imported) -> None:
    """network.preset, with what LyCORIS does around it made explicit (network.preset's rules)."""
    out.set("network.preset", preset)
    if PRESETS[preset].conv and not extra.get("conv_dim"):  # LyCORIS: conv_dim / conv_alpha default to dim / alpha
        extra.update(conv_dim=args.get("network_dim") or 4,
                     conv_alpha=extra.get("conv_alpha", args.get("network_alpha", 1.0)))
    elif not PRESETS[preset].conv and extra.get("conv_dim"):
        out.skip("network_args", f"conv_dim={extra.pop('conv_dim')}", f"LyCORIS' preset={preset} trains no 3x3 conv")
        extra.pop("conv_alpha", None)
    if not PRESETS[preset].text_encoder:
        out.set("network.train_unet_only", True)  # the preset has no text-encoder layer


def _text(value: Any) -> str:
    """A parsed key=value back as written (literal_eval made "2,2,2" a tuple)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _kind_of(module: str, algo: str | None) -> str | None:
    for kind in KINDS.values():
        if kind.kohya_module == module and kind.lycoris_algo == algo and kind.name != "locon":
            return kind.name
    return "locon" if module == "lycoris.kohya" and algo in ("lora", "locon") else None


def _optimizer(args: dict[str, Any], out: Imported) -> None:
    out.set("optimizer.type", args.get("optimizer_type") or "AdamW")  # sd-scripts' default
    out.set("optimizer.learning_rate", args.get("learning_rate", 2e-6))
    out.set("optimizer.args", _kv_list(args.get("optimizer_args", []), "optimizer_args", out))
    rates = args.get("text_encoder_lr")
    if rates:
        out.set("optimizer.text_encoder_lr", rates[0])
        if len(rates) > 1:
            out.set("optimizer.text_encoder_2_lr", rates[1])


def _scheduler(args: dict[str, Any], out: Imported, ours: dict[str, list[ConfigOption]]) -> None:
    out.set("scheduler.type", args.get("lr_scheduler", "constant"))
    for name, key in (("lr_warmup_steps", "warmup"), ("lr_decay_steps", "decay")):
        value = args.get(name, 0)
        if isinstance(value, float) and value < 1:
            out.set(f"scheduler.{key}_ratio", value)  # sd-scripts: a float below 1 is a ratio of the steps
        elif value:
            out.set(f"scheduler.{key}_steps", int(value))
    extra = _kv_list(args.get("lr_scheduler_args", []), "lr_scheduler_args", out)
    by_arg = {o.flag.split()[1]: o for o in ours.get("lr_scheduler_args", []) if len(o.flag.split()) == 2}
    plain = {}
    for name, value in extra.items():
        if name in by_arg:
            out.set(by_arg[name].key, value)
        else:
            plain[name] = value
    if plain:
        out.set("scheduler.args", plain)


def _length(args: dict[str, Any], out: Imported) -> None:
    """sd-scripts: --max_train_epochs wins over --max_train_steps; neither: 1600 steps."""
    epochs, steps = args.get("max_train_epochs"), args.get("max_train_steps")
    if epochs:
        out.set("training.max_train_epochs", epochs)
        out.set("training.max_train_steps", None)
    else:
        out.set("training.max_train_epochs", None)
        out.set("training.max_train_steps", steps or 1600)


def _attention(args: dict[str, Any], out: Imported) -> None:
    if args.get("xformers"):
        out.set("training.attention", "xformers")
    elif args.get("sdpa") or args.get("mem_eff_attn"):
        out.set("training.attention", "sdpa")
    else:
        out.set("training.attention", "math")  # sd-scripts' plain attention when neither is given


def _accelerate(run: KohyaRun, out: Imported) -> None:
    for name, value in run.accelerate.items():
        if name == "mixed_precision":
            out.values.setdefault("training.mixed_precision", value)
        elif name == "num_processes":
            out.set("training.num_processes", int(value))
        elif name == "cpu":
            out.set("training.cpu", True)
        elif name not in ("num_cpu_threads_per_process", "num_machines", "main_process_port", "dynamo_backend"):
            out.skip(f"accelerate --{name}", value, "an accelerate launch option Atelier does not take")


def _sd_scripts_defaults(args: dict[str, Any], out: Imported, ours: dict[str, list[ConfigOption]]) -> None:
    """The options the source left out: sd-scripts' default where Atelier's differs."""
    from atelier.config.options import all_options

    defaults = {o.key: o.default for o in all_options()}
    for name, option in sd_scripts_options().items():
        if name in args or name in HANDLED:
            continue
        for ours_option in ours.get(name, []):
            key = ours_option.key
            if ours_option.flag != name or key in out.values or key.startswith("model."):
                continue
            value = None if option.default == "" else _value_for(ours_option, option.default)  # "": unset
            if value is None and "None" not in ours_option.type:
                continue  # sd-scripts' "not given" where Atelier's key always has a value (its default is that)
            if _yaml(value) != defaults[key]:
                out.set(key, value)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- writing --------------------------------------------------------------------------------


def nested(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def experiment_yaml(imported: Imported, run: KohyaRun, name: str) -> str:
    header = [
        "# @package _global_",
        f"# Imported by `atelier import-kohya` from {run.source} ({run.kind}, {run.script}),",
        f"# {dt.date.today().isoformat()}, as experiment `{name}`.",
        "# Every group is stated in full (defaults: null below), with sd-scripts' defaults where",
        "# the source left an option out, so the run trains what the source did.",
    ]
    if imported.unmapped:
        header.append("# Not imported (no Atelier equivalent):")
        header += [f"#   {option}={value}: {why}" for option, value, why in imported.unmapped]
    header += [f"# Note: {note}" for note in imported.notes]
    defaults = {"defaults": [{f"override /{group}": None} for group in STATED_GROUPS]}
    body = OmegaConf.to_yaml(OmegaConf.create({**defaults, **nested(imported.values)}))
    return "\n".join(header) + "\n" + body


def run(args: argparse.Namespace) -> int:
    from atelier.utils.atomic import write_text

    source = Path(args.file).expanduser().resolve()
    name = args.name or "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)
    out = Path(args.out).expanduser().resolve() if args.out else REPO_CONF / "experiment" / f"{name}.yaml"
    if out.parent.name != "experiment" or out.suffix != ".yaml":
        raise ToolError(f"--out {out}: an experiment config is <folder>/experiment/<name>.yaml (Hydra finds it there)")
    check_output(out, args.force)
    if args.sdxl and args.flux:
        raise ToolError("--sdxl and --flux: a config is for one script; give one of them")
    script = SDXL_SCRIPT if args.sdxl else FLUX_SCRIPT if args.flux else None
    kohya = read_source(source, script)
    if script is not None:
        kohya.script = script
    imported = import_run(kohya)
    write_text(out, experiment_yaml(imported, kohya, out.stem))
    print(f"read {source} ({kohya.kind}); wrote {out}")
    overrides = [] if out.parent == REPO_CONF / "experiment" else [f"hydra.searchpath=[file://{out.parent.parent}]"]
    problem = config_problem(out, overrides)
    print(f"train it: python train.py {' '.join([*overrides, f'experiment={out.stem}'])}")
    if problem:
        print(f"warning: the config does not check yet: {problem}")
    if imported.unmapped:
        print("\nnot imported (no Atelier equivalent):")
        for option, value, why in imported.unmapped:
            print(f"  {option}={value}: {why}")
    for note in imported.notes:
        print(f"note: {note}")
    return 0


def config_problem(experiment: Path, overrides: list[str]) -> str | None:
    """Why the written experiment does not compose into a run config (a path that is not on this
    machine, a value out of range), or None."""
    from hydra import compose, initialize_config_dir

    import atelier.config
    from atelier.config.typed import run_config

    atelier.config.register()
    try:
        with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
            run_config(compose("config", overrides=[*overrides, f"experiment={experiment.stem}"]))
    except Exception as err:  # noqa: BLE001 (any reason is reported, the file stays)
        return " ".join(str(err).split())[:400]
    return None
