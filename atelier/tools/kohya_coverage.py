"""Which of sd-scripts' train_network.py options Atelier has: docs/kohya-options.md.

sd_scripts_args.json lists every option of train_network.py (scripts/extract_sd_scripts_args.py
reads it from sd-scripts' source). An option is ours when a schema field carries its flag
(option(flag=...)); every other one has its reason in NOT_HERE. The table is generated from
both (`atelier kohya-options --write docs/kohya-options.md`), and tests/test_kohya_coverage.py
fails when an option is in neither, or when a field's sd-scripts name is missing from it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from atelier.config.options import ConfigOption, all_options, sd_scripts_name
from atelier.config.schema import flag_name

ARGS_FILE = Path(__file__).with_name("sd_scripts_args.json")
REGENERATE = ".venv/bin/atelier kohya-options --write docs/kohya-options.md"

_HUB = "Hugging Face upload: Atelier writes local files (upload them with huggingface-cli)"
_DEEPSPEED = ("DeepSpeed: a LoRA's optimizer state is small, so data parallelism is accelerate's DDP "
              "(training.num_processes), without ZeRO or offloading")  # fmt: skip
# sd-scripts options that no schema field carries, and why.
NOT_HERE: dict[str, str] = {
    **{name: _HUB for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                               "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
                               "resume_from_huggingface", "async_upload")},
    **{name: _DEEPSPEED for name in ("deepspeed", "zero_stage", "zero3_init_flag", "zero3_save_16bit_model",
                                     "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                                     "offload_param_nvme_path", "fp16_master_weights_and_gradients")},
    "ddp_timeout": "accelerate's default DDP settings are used",
    "ddp_gradient_as_bucket_view": "accelerate's default DDP settings are used",
    "ddp_static_graph": "accelerate's default DDP settings are used",
    "xformers": "attention is torch's scaled_dot_product_attention (training.attention=sdpa); xformers is not needed",
    "mem_eff_attn": "the old memory-efficient attention of sd-scripts: torch's SDPA (training.attention=sdpa) replaces it",
    "console_log_level": "Hydra's job logging sets levels (hydra/job_logging); every run also writes train.log",
    "console_log_file": "every run writes its log to <run dir>/train.log",
    "console_log_simple": "Hydra's job logging sets the format (hydra/job_logging)",
    "config_file": "the config is Hydra's composed YAML; `atelier import-kohya` reads an sd-scripts --config_file",
    "output_config": "every run keeps its resolved config in <run dir>/.hydra/config.yaml",
    "output_dir": "runs go to Hydra's run dir (outputs/<project>/...; hydra.run.dir sets it)",
    "dataset_config": "the dataset is the dataset.* group; `atelier import-kohya` reads a dataset TOML",
    "in_json": "fine-tuning metadata datasets: Atelier reads kohya N_name folders",
    "dataset_class": "custom dataset classes: Atelier reads kohya N_name folders",
    "dataset_repeats": "for in_json datasets; repeats come from the N_name folder names",
    "cache_info": "the latent cache is checked by content key (image bytes, bucket, VAE), not by a metadata file",
    "skip_cache_check": "the latent cache is checked by content key (image bytes, bucket, VAE) every run; it is cheap",
    "debug_dataset": "`atelier dataset check` shows what a dataset trains on",
    "caption_extention": "sd-scripts' old misspelling of --caption_extension (dataset.caption_extension)",
    "use_8bit_adam": "deprecated in sd-scripts: optimizer.type=AdamW8bit",
    "use_lion_optimizer": "deprecated in sd-scripts: optimizer.type=Lion",
    "tokenizer_cache_dir": "tokenizers come with the base model; nothing is downloaded",
    "highvram": "the CUDA cache is never cleared between latents here",
    "lowram": "diffusers builds the models on the meta device and fills them from the file, so no second copy "
              "is held in RAM; they then go to the GPU",
    "no_half_vae": "the VAE always runs in float32 here (fp16 VAEs overflow)",
    "dim_from_weights": "network.weights always takes each module's rank and alpha from the file",
    "save_state": "output.save_state (on by default) keeps one training state per run dir, for continuing it; "
                  "states kept to train on from: output.save_state_on_train_end, output.save_last_n_epochs_state",
    "wandb_api_key": "a key does not belong in a config saved with each run: `wandb login` or WANDB_API_KEY",
    "log_config": "with output.log_with=wandb or all, every wandb run gets the run's resolved config",
    # train_network.py reads it only in get_optimizer's checks (Adafactor, no accumulation) and trains as without it.
    "fused_backward_pass": "the optimizer step inside the backward of sd-scripts' full fine-tuning scripts (sdxl_train.py, "
                           "flux_train.py, sd3_train.py, ...); train_network.py only checks it (Adafactor, no gradient "
                           "accumulation) and trains as without it",
    # train_network.py: unet.enable_gradient_checkpointing(cpu_offload=True), which only the DiTs take.
    "cpu_offload_checkpointing": "for the FLUX / SD3 / Lumina / Anima DiTs (their enable_gradient_checkpointing(cpu_offload=)); "
                                 "sd-scripts' SD1/SD2/SDXL UNets take no such argument (train_network.py stops with a "
                                 "TypeError), and those are the models Atelier trains",
}  # fmt: skip

# sd-scripts' argument groups (the add_*_arguments function an option comes from) -> a section title.
SECTIONS = {
    "add_sd_models_arguments": "Model", "add_model_spec_arguments": "Metadata", "add_dataset_arguments": "Dataset",
    "add_training_arguments": "Training", "add_masked_loss_arguments": "Masked loss",
    "add_deepspeed_arguments": "DeepSpeed", "add_optimizer_arguments": "Optimizer and schedule",
    "add_config_arguments": "Config files", "add_custom_train_arguments": "Loss", "add_logging_arguments": "Logging",
}  # fmt: skip
NETWORK_SECTION = "Network (train_network.py)"


@dataclass(frozen=True)
class KohyaOption:
    name: str
    section: str
    default: Any
    help: str
    nargs: Any
    switch: bool
    type: str | None  # the argparse type's name: int, float, str, int_or_float, ...


@cache
def sd_scripts_options() -> dict[str, KohyaOption]:
    data = json.loads(ARGS_FILE.read_text(encoding="utf-8"))
    found = {}
    for raw in data["options"]:
        function = raw["defined_in"].rpartition(":")[2]
        switch = raw["action"] == "store_true"
        default = False if switch and raw["default"] is None else raw["default"]
        found[raw["name"]] = KohyaOption(raw["name"], SECTIONS.get(function, NETWORK_SECTION), default,
                                         raw["help"] or "", raw["nargs"], switch, raw["type"])  # fmt: skip
    return found


# flux_train_network.py's own options (library/flux_train_utils.py add_flux_train_arguments, the
# weighting_scheme group) beyond train_network.py's: the schema's fields that carry them.
FLUX_OPTION_KEYS = ("model.ae", "model.clip_l", "model.t5xxl", *(f"training.{name}" for name in (
    "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "guidance_scale",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "apply_t5_attn_mask", "t5xxl_max_token_length",
    "blocks_to_swap")))


@cache
def script_options(script: str) -> dict[str, KohyaOption]:
    """The options an sd-scripts LoRA script takes: train_network.py's (sd_scripts_args.json), and
    for flux_train_network.py its FLUX options too, typed by the schema fields that carry them."""
    found = dict(sd_scripts_options())
    if script != "flux_train_network.py":
        return found
    for option in all_options():
        if option.key in FLUX_OPTION_KEYS:
            base = option.type.split(" | ")[0]
            found[option.flag] = KohyaOption(option.flag, "FLUX", option.default, option.doc, None, base == "bool",
                                             base if base in ("int", "float") else None)  # fmt: skip
    return found


def sd_scripts_commit() -> str:
    return json.loads(ARGS_FILE.read_text(encoding="utf-8"))["commit"]


def ours_by_flag() -> dict[str, list[ConfigOption]]:
    """sd-scripts option name -> the config options that carry it (several for --network_args)."""
    found: dict[str, list[ConfigOption]] = defaultdict(list)
    for option in all_options():
        if option.flag:
            found[flag_name(option.flag)].append(option)
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_coverage() -> str:
    """docs/kohya-options.md: every train_network.py option, with our keys or why not."""
    ours = ours_by_flag()
    kohya = sd_scripts_options()
    by_section: dict[str, list[KohyaOption]] = defaultdict(list)
    for option in kohya.values():
        by_section[option.section].append(option)
    have = sum(1 for name in kohya if name in ours)
    lines = [
        "# sd-scripts options in Atelier",
        "",
        f"Every option of kohya sd-scripts' `train_network.py` (commit {sd_scripts_commit()[:10]}) with the",
        "Atelier key that does the same, or why there is none. Generated from the config schema and",
        f"atelier/tools/sd_scripts_args.json by `{REGENERATE}`.",
        "",
        f"{have} of {len(kohya)} options have an Atelier key. `atelier import-kohya <file>` maps them from an",
        "sd-scripts config or dataset TOML, a kohya_ss GUI JSON or a command line into an experiment config;",
        "`atelier export-kohya <run dir>` writes a run back as sd-scripts options.",
    ]
    for section in [*dict.fromkeys(SECTIONS.values()), NETWORK_SECTION]:
        if not by_section.get(section):
            continue
        lines += ["", f"## {section}", "", "| sd-scripts | Atelier | note |", "|---|---|---|"]
        for option in sorted(by_section[section], key=lambda o: o.name):
            if option.name in ours:
                keys = ", ".join(f"`{o.key}`" + (f" ({sd_scripts_name(o.flag)})" if " " in o.flag else "")
                                 for o in ours[option.name])  # fmt: skip
                note = "; ".join(o.kohya for o in ours[option.name] if o.kohya)
            else:
                keys, note = "—", NOT_HERE.get(option.name, "")
            lines.append(f"| `--{option.name}` | {keys} | {_cell(note)} |")
    others = sorted((name, opts) for name, opts in ours.items() if name not in kohya)
    if others:
        lines += ["", "## Options of `accelerate launch`", "", "| accelerate | Atelier | note |", "|---|---|---|"]
        for name, opts in others:
            lines.append(f"| `--{name}` | {', '.join(f'`{o.key}`' for o in opts)} | "
                         f"{_cell('; '.join(o.kohya for o in opts if o.kohya))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args: Any) -> int:
    """`atelier kohya-options`: print the table, or write it (--write PATH)."""
    from atelier.utils.atomic import write_text

    text = render_coverage()
    if args.write:
        write_text(Path(args.write), text)
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0
