"""ss_* and modelspec.* metadata for kohya LoRA files (all values are strings)."""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

from atelier.config.optimizer_types import call_string, scheduler_class_path
from atelier.config.options import schema_fields
from atelier.config.schema import (
    AtelierConfig,
    DatasetConfig,
    PartLearningRates,
    SchedulerConfig,
    part_learning_rates,
)
from atelier.config.network_spec import kohya_module, kohya_network_args
from atelier.families import family_of
from atelier.plugins import PLUGINS, plugin_of

# Keys of options written only when the option is given: sd-scripts leaves a modelspec.* field
# that is None out (library/sai_model_spec.py); ss_training_comment, which sd-scripts writes
# as "None", is left out too, so that a run without a comment keeps the metadata it had.
WRITTEN_WHEN_GIVEN = ("ss_training_comment", "modelspec.author", "modelspec.description", "modelspec.license",
                      "modelspec.tags", "modelspec.trigger_phrase", "modelspec.usage_hint", "modelspec.thumbnail",
                      "modelspec.merged_from", "modelspec.preprocessor", "modelspec.is_negative_embedding")  # fmt: skip
# Options added after tests/data/unchanged_outputs.json was recorded: written only when on, so a
# default run's metadata stays as it was (sd-scripts writes them always, False / None when off).
WRITTEN_WHEN_ON = ("ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_face_crop_aug_range",
                   "ss_resize_interpolation", "ss_full_fp16", "ss_fp8_base", "ss_fp8_base_unet",
                   "ss_max_validation_steps")  # fmt: skip
# What output.no_metadata keeps besides the modelspec.* keys (and the sshs_* hashes save_lora
# adds): sd-scripts' train_util.SS_METADATA_MINIMUM_KEYS, what a loader needs to apply the network.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")  # fmt: skip


def _str(value: Any) -> str:
    return "None" if value is None else str(value)


def training_metadata(
    cfg: AtelierConfig,
    *,
    base_model_name: str,
    optimizer_name: str,
    dataset_dirs: dict[str, dict[str, int]],
    tag_frequency: dict[str, dict[str, int]],
    num_train_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    started_at: float,
    num_reg_images: int = 0,
    bucket_info: dict[str, Any] | None = None,
    cache_latents: bool = True,
    variant: str | None = None,
) -> dict[str, str]:
    """Metadata known when training starts; `checkpoint_metadata` adds the rest.

    The ss_* key of an option copied as it is comes from its schema field (option(ss=...));
    the keys below are computed (from several options, or from the run).
    num_reg_images: reg images x repeats (sd-scripts' count); bucket_info: as
    atelier.data.buckets.bucket_info; cache_latents: whether latents were cached; variant: the
    loaded model's (FLUX.1 dev / schnell), which names its modelspec.architecture.
    """
    t, net, out = cfg.training, cfg.network, cfg.output
    family = family_of(cfg.model.version)
    base = family.base(cfg.model.v_parameterization)
    res = cfg.dataset.resolution
    rates = part_learning_rates(cfg.optimizer)
    computed = {
        "ss_network_module": family.lora_module or kohya_module(net),
        "ss_network_args": json.dumps(kohya_network_args(net)),
        "ss_base_model_version": base.ss_name,
        "ss_v2": family.kohya_v2,
        "ss_sd_model_name": base_model_name,
        "ss_unet_lr": None if net.train_text_encoder_only else rates.unet,
        "ss_text_encoder_lr": None if net.train_unet_only else text_encoder_rates(rates),
        "ss_lr_scheduler": scheduler_name(cfg.scheduler),
        "ss_optimizer": optimizer_name,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_noise_offset": t.noise_offset or None,  # sd-scripts writes None for no offset
        "ss_resolution": f"({res}, {res})",
        **dataset_metadata(cfg.dataset, bucket_info, cache_latents),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_started_at": started_at,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.variants.get(variant, base.architecture)}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": out.output_name if out.metadata_title is None else out.metadata_title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if cfg.model.v_parameterization else "epsilon",
        "modelspec.thumbnail": thumbnail_data_url(out.metadata_thumbnail),
    }
    meta = {**copied_metadata(cfg, skip=computed.keys()), **computed}
    plugin = plugin_of(cfg.model.version)
    for other in PLUGINS.values():  # keys of another family's options (copied from every config)
        for key in set(other.own_metadata) - set(plugin.own_metadata):
            meta.pop(key, None)
    plugin.metadata(meta)
    if not net.weights:
        del meta["ss_network_weights"]
    for key in WRITTEN_WHEN_GIVEN:
        if meta.get(key) is None:
            meta.pop(key, None)
    for key in WRITTEN_WHEN_ON:
        if not meta.get(key):
            meta.pop(key, None)
    if t.min_timestep is not None or t.max_timestep is not None:
        # sd-scripts' get_sai_model_spec: the range trained on, the missing end filled in.
        low = 0 if t.min_timestep is None else t.min_timestep
        high = 1000 if t.max_timestep is None else t.max_timestep
        meta["modelspec.timestep_range"] = f"{low},{high}"
    return {k: _str(v) for k, v in meta.items()}


def thumbnail_data_url(thumbnail: str | None) -> str | None:
    """output.metadata_thumbnail as sd-scripts writes it (sai_model_spec.file_to_data_url): a data URL
    as given, a file as data:<its MIME type>;base64,<its bytes>."""
    if thumbnail is None or thumbnail.startswith("data:"):
        return thumbnail
    path = Path(thumbnail).expanduser()
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def text_encoder_rates(rates: PartLearningRates) -> float | list[float]:
    """ss_text_encoder_lr: the rate, or [te1, te2] when SDXL's two differ (as sd-scripts writes
    its --text_encoder_lr list for the networks that read both)."""
    if rates.text_encoder_2 == rates.text_encoder:
        return rates.text_encoder
    return [rates.text_encoder, rates.text_encoder_2]


def scheduler_name(s: SchedulerConfig) -> str:
    """ss_lr_scheduler: scheduler.type, or a class-path schedule as `path(args)` (ss_optimizer's form)."""
    if s.class_path is None:
        return s.type.value
    return call_string(scheduler_class_path(s.class_path), dict(s.args))


def copied_metadata(cfg: AtelierConfig, skip: Iterable[str] = ()) -> dict[str, Any]:
    """ss key -> the option's value, for each ss key a schema field declares (enums as their
    YAML spelling); keys in `skip` are computed by the caller instead."""
    skip = set(skip)
    copied: dict[str, Any] = {}
    for key, field in schema_fields().items():
        for ss_key in field.metadata["ss"]:
            if ss_key not in skip:
                value = attrgetter(key)(cfg)
                copied[ss_key] = value.value if isinstance(value, Enum) else value
    return copied


def dataset_metadata(d: DatasetConfig, bucket_info: dict[str, Any] | None,
                     cache_latents: bool) -> dict[str, Any]:  # fmt: skip
    """The computed dataset keys: bucket sizes are None with bucketing off, as in sd-scripts."""
    bucketing = bool(d.enable_bucket)
    meta = {
        "ss_min_bucket_reso": d.min_bucket_reso if bucketing else None,
        "ss_max_bucket_reso": d.max_bucket_reso if bucketing else None,
        "ss_bucket_no_upscale": d.bucket_no_upscale if bucketing else None,
        "ss_cache_latents": cache_latents,
        # sd-scripts writes the parsed tuple: "(2.0, 4.0)".
        "ss_face_crop_aug_range": None if d.face_crop_aug_range is None else str(tuple(d.face_crop_aug_range)),
    }
    if bucket_info is not None:
        meta["ss_bucket_info"] = json.dumps(bucket_info)
    return meta


def checkpoint_metadata(base: dict[str, str], *, epoch: int, steps: int, finished_at: float,
                        no_metadata: bool = False) -> dict[str, str]:  # fmt: skip
    """One saved file's metadata; with no_metadata (output.no_metadata) only MINIMUM_KEYS and the
    modelspec.* keys, as sd-scripts' train_network.py saves with --no_metadata."""
    meta = {
        **base,
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_training_finished_at": str(finished_at),
        "modelspec.date": datetime.fromtimestamp(finished_at, timezone.utc).isoformat(timespec="seconds"),
    }
    if no_metadata:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    return meta
