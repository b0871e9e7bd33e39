"""The option table of `atelier export-kohya`: how each of our config keys becomes an sd-scripts
option (OPTIONS, one entry per schema field, whose flag and note are declared on the field in
atelier/config/schema/, option(flag=..., kohya=...)), and HOW, the converters for the keys that
are not passed as a plain option value. atelier.tools.export_kohya writes the export from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from atelier.config.options import schema_fields
from atelier.config.schema import NetworkConfig, flag_name
from atelier.config.network_spec import kohya_module
from atelier.families import family_of
from atelier.tools.common import ToolError


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
    """The run's network options as the schema's typed NetworkConfig (what atelier.config.network_spec reads)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(NetworkConfig), cfg["network"]))


def _unless_zero(value: Any, cfg: dict[str, Any]) -> Any:
    return value or None


def _unless_one(value: Any, cfg: dict[str, Any]) -> Any:
    return None if value == 1 else value


def _text_encoder_lrs(value: float | None, cfg: dict[str, Any]) -> float | list[float] | None:
    """--text_encoder_lr A, or A B with SDXL's second text encoder's rate (sd-scripts' nargs='*')."""
    opt = cfg["optimizer"]
    second = opt.get("text_encoder_2_lr")
    if second is None:
        return value
    return [opt["learning_rate"] if value is None else value, second]


def _optimizer_args(value: dict[str, Any] | None, cfg: dict[str, Any]) -> list[str] | None:
    """sd-scripts parses each "key=value" with ast.literal_eval; lists become tuples (also
    --lr_scheduler_args)."""
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


def _ratio_unless_steps(name: str) -> Callable[[float | None, dict[str, Any]], float | None]:
    """scheduler.<name>_ratio as --lr_<name>_steps (a float below 1 is a ratio in sd-scripts too),
    unless scheduler.<name>_steps is set: a step count wins over a ratio (atelier.optim.schedulers),
    and sd-scripts takes one --lr_<name>_steps."""
    def convert(value: float | None, cfg: dict[str, Any]) -> float | None:
        return None if cfg["scheduler"].get(f"{name}_steps") else (value or None)

    return convert


def _epochs_unless_steps(value: int | None, cfg: dict[str, Any]) -> int | None:
    """Steps win here when both are set (atelier.data.plan); sd-scripts lets --max_train_epochs
    override --max_train_steps (train_network.py), so only the one that sets the length is given."""
    return None if cfg["training"].get("max_train_steps") is not None else value


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


def _flux_only(value: Any, cfg: dict[str, Any]) -> Any:
    """FLUX's flow-matching options: flux_train_network.py's, unknown to the SD scripts."""
    return value if family_of(cfg.get("model", {}).get("version", "sd1")).objective == "flow_matching" else None


def _lora_module(value: Any, cfg: dict[str, Any]) -> str:
    """The family's own LoRA module (FLUX: networks.lora_flux), else the network kind's."""
    return family_of(cfg.get("model", {}).get("version", "sd1")).lora_module or kohya_module(network_config(cfg))


def _with_torch_compile(value: Any, cfg: dict[str, Any]) -> Any:
    return value if cfg["training"].get("torch_compile") else None


def args_value(name: str, value: Any) -> Any:
    """The dataset TOML's resolution is a number, face_crop_aug_range a list; train_network.py
    takes --resolution as a string and --face_crop_aug_range as 'low,high'."""
    if name == "face_crop_aug_range":
        return ",".join(f"{v:g}" for v in value)
    return str(value) if name == "resolution" else value


def _path(value: str | None, cfg: dict[str, Any]) -> str | None:
    return str(Path(value).resolve()) if value else None


def _thumbnail(value: str | None, cfg: dict[str, Any]) -> str | None:
    """output.metadata_thumbnail: a data URL as it is, an image file as an absolute path."""
    return value if value is None or value.startswith("data:") else _path(value, cfg)


def _wandb_run_name(value: str | None, cfg: dict[str, Any]) -> str | None:
    """Our wandb run is named output.output_name by default; sd-scripts leaves the name to wandb."""
    out = cfg["output"]
    return value or (out["output_name"] if out.get("log_with") in ("wandb", "all") else None)


# How a key is exported where it is not a plain value for its flag (the flag and the note
# are the schema's: option(flag=..., kohya=...)).
HOW: dict[str, dict[str, Any]] = {
    "model.path": {"convert": _model_path},
    "model.builtin": {"place": "covered"},
    "model.name": {"place": "covered"},
    "model.version": {"kind": "switch", "convert": lambda v, c: v == "sd2"},
    "model.v_parameterization": {"kind": "switch"},
    "model.resolution": {"place": "covered"},
    "model.base_weights": {"kind": "list", "convert": lambda v, c: [str(Path(p).resolve()) for p in v] or None},
    "model.base_weights_multiplier": {"kind": "list", "convert": lambda v, c: list(v) or None},
    "network.module": {"convert": _lora_module},
    **{f"model.{name}": {"convert": _path} for name in ("ae", "clip_l", "t5xxl")},
    **{f"training.{name}": {"convert": _flux_only}
       for name in ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
                    "guidance_scale", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                    "t5xxl_max_token_length", "blocks_to_swap")},
    "training.apply_t5_attn_mask": {"kind": "switch", "convert": _flux_only},
    # network_args is one list made from several keys (build_export)
    **{f"network.{name}": {"place": "covered"}
       for name in ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "factor", "unit", "loraplus_lr_ratio",
                    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "dora_wd",
                    "use_tucker", "preset", "train_blocks")},
    "network.dropout": {"convert": _neuron_dropout},
    "network.train_unet_only": {"kind": "switch"},
    "network.train_text_encoder_only": {"kind": "switch"},
    "optimizer.args": {"kind": "list", "convert": _optimizer_args},
    "optimizer.text_encoder_lr": {"convert": _text_encoder_lrs},
    "optimizer.text_encoder_2_lr": {"place": "covered"},  # the second value of --text_encoder_lr
    "scheduler.args": {"kind": "list", "convert": _optimizer_args},
    "scheduler.warmup_steps": {"convert": _unless_zero},
    "scheduler.warmup_ratio": {"convert": _ratio_unless_steps("warmup")},
    "scheduler.decay_steps": {"convert": _unless_zero},
    "scheduler.decay_ratio": {"convert": _ratio_unless_steps("decay")},
    "scheduler.step_rules": {"kind": "list", "convert": lambda v, c: [f"step_rules={v!r}"] if v else None},
    "dataset.name": {"place": "covered"},
    "dataset.train_data_dir": {"place": "subsets", "convert": _path},
    "dataset.reg_data_dir": {"place": "subsets", "convert": _path},
    "dataset.subsets": {"place": "covered"},  # [[datasets.subsets]] of the dataset TOML (export_kohya.own_subset)
    **{f"dataset.{name}": {"place": "dataset"}
       for name in ("caption_extension", "resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                    "keep_tokens", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                    "caption_tag_dropout_rate", "caption_dropout_every_n_epochs")},
    **{f"dataset.{name}": {"place": "dataset", "kind": "switch"}
       for name in ("enable_bucket", "bucket_no_upscale", "shuffle_caption", "flip_aug", "random_crop", "color_aug")},
    "dataset.keep_tokens_separator": {"place": "dataset", "convert": lambda v, c: v or None},
    "dataset.secondary_separator": {"place": "dataset", "convert": lambda v, c: v or None},
    "dataset.enable_wildcard": {"place": "dataset", "kind": "switch"},
    "dataset.token_warmup_min": {"place": "dataset"},
    "dataset.token_warmup_step": {"place": "dataset", "convert": _unless_zero},
    "dataset.face_crop_aug_range": {"place": "dataset"},
    "dataset.resize_interpolation": {"place": "dataset"},
    "dataset.alpha_mask": {"place": "dataset", "kind": "switch"},
    # also each train subset's key in the dataset TOML (build_export)
    "dataset.conditioning_data_dir": {"place": "subsets", "convert": _path},
    "dataset.weighted_captions": {"kind": "switch"},  # a training argument in sd-scripts, not a dataset key
    "dataset.cache_latents": {"kind": "switch"},
    "dataset.cache_latents_to_disk": {"kind": "switch"},
    "dataset.persistent_data_loader_workers": {"kind": "switch"},
    "dataset.validation_split": {"convert": _unless_zero},
    "dataset.validation_seed": {"convert": _with_validation},
    "dataset.validate_every_n_epochs": {"convert": _with_validation},
    "dataset.max_validation_steps": {"convert": _with_validation},
    "dataset.validate_every_n_steps": {"convert": _with_validation},
    "training.max_train_epochs": {"convert": _epochs_unless_steps},
    "training.train_batch_size": {"dataset_key": "batch_size"},
    "training.gradient_checkpointing": {"kind": "switch"},
    "training.cpu": {"place": "accelerate", "kind": "switch"},
    "training.num_processes": {"place": "accelerate", "convert": _unless_one},
    "training.noise_offset": {"convert": _unless_zero},
    "training.zero_terminal_snr": {"kind": "switch"},
    "training.debiased_estimation_loss": {"kind": "switch"},
    **{f"training.{name}": {"kind": "switch"}
       for name in ("noise_offset_random_strength", "ip_noise_gamma_random_strength",
                    "scale_v_pred_loss_like_noise_pred", "full_bf16", "full_fp16", "masked_loss", "fp8_base",
                    "fp8_base_unet", "skip_until_initial_step")},
    "training.huber_scale": {"convert": lambda v, c: None if v == 1.0 else v},
    "training.attention": {"kind": "switch", "convert": _attention},
    "training.torch_compile": {"kind": "switch"},
    "training.dynamo_backend": {"convert": _with_torch_compile},
    "sampling.prompts": {"place": "covered"},
    "sampling.prompt_file": {"place": "covered"},
    "sampling.sample_at_first": {"kind": "switch"},
    **{f"sampling.{name}": {"place": "prompts"} for name in ("limit", "width", "height", "steps", "cfg_scale", "seed")},
    "output.no_metadata": {"kind": "switch"},
    "output.logging_dir": {"convert": _path},  # unset: the export's own logs folder (build_export)
    "output.wandb_run_name": {"convert": _wandb_run_name},
    "output.metadata_thumbnail": {"convert": _thumbnail},
    "output.log_tracker_config": {"convert": _path},
    "output.save_state_on_train_end": {"kind": "switch"},
    "training.resume_from": {"convert": _path},
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
