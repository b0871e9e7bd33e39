"""Checks of a composed config before it is typed; no torch (a launcher runs them).

The rules about values live on the schema dataclasses (their `__post_init__`, run by
atelier.config.typed.run_config); here only what must be known about the DictConfig
itself: every key an option of the schema, every mandatory ??? key set, and the file-name
rule of the keys Hydra builds paths from (the run-dir guard checks it before the run dir is made).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from atelier.config.network_kinds import kind_named
from atelier.config.schema.checks import check_name
from atelier.errors import ConfigError  # raised by the checks (and imported from here)

# What to say when a mandatory key was left at ???.
MISSING_HINTS = {
    "model.path": "a diffusers folder or a single-file .safetensors checkpoint, e.g. model.path=/models/sd15",
    "dataset.train_data_dir": "the folder holding N_concept subfolders, e.g. dataset.train_data_dir=/data/mychar",
    "dataset.subsets": "the image folders, e.g. 'dataset.subsets=[{image_dir: /data/char, num_repeats: 10}]'",
    "dataset.name": "the dataset's name (the project folder), e.g. dataset.name=mychar",
}


# Config values that become file or folder names inside a run dir (or the outputs/ tree).
NAME_KEYS = ("project", "output.output_name")


def check_names(cfg: DictConfig) -> None:
    """The file-name rule of `project` and `output.output_name` (atelier.config.schema.checks), on a
    composed config: the run-dir guard checks it before Hydra or the run writes anything."""
    for key in NAME_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
        if value is None and key == "project":
            continue
        check_name(key, "" if value is None else str(value))


def check_required(cfg: DictConfig) -> None:
    """Mandatory keys (???) are set: named here, before Hydra resolves a path built from them
    (hydra.run.dir holds ${project} = the dataset folder's name)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
        # An interpolation to a missing value names the key it was resolving; the message the missing one.
        key = err.full_key
        if isinstance(err, InterpolationToMissingValueError):
            missing = str(err).split("Missing mandatory value: ")[-1].splitlines()[0].strip()
            if missing and " " not in missing:
                key = missing
        hint = MISSING_HINTS.get(key, f"{key}=<value>")
        raise ConfigError(f"'{key}' must be set for this config: pass {hint}") from None


# A group's free-form args under sd-scripts' name: its values are typed keys of the group here.
ARGS_NAMES = {"network": ("args", "network_args"), "scheduler": ("args", "lr_scheduler_args")}


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of a composed config is an option of the schema (AtelierConfig).

    Hydra's `+key=value` adds a key to a typed node (it opens the struct flag), and
    OmegaConf.to_object sets a key that is not a field as a plain attribute that nothing
    reads: such a key is refused here, named, with the closest option. The free-form dicts
    (optimizer.args) are checked against their target where it is resolved
    (atelier.optim.optimizers.check_optimizer_args).
    """
    from atelier.config.schema import AtelierConfig

    unknown = list(_unknown_keys(cfg, AtelierConfig, ""))
    if unknown:
        first, *others = unknown
        also = f" (also unknown: {', '.join(others)})" if others else ""
        raise ConfigError(unknown_key_message(first, cfg) + also)
    check_class_names(cfg)


def check_class_names(cfg: DictConfig) -> None:
    """optimizer.type and scheduler.class_path name something (a free str: a class path is a
    type too): checked with the keys, so a typo stops in the run-dir guard, before Hydra makes
    the run dir, as OmegaConf stops a bad enum value at compose time."""
    from atelier.config.optimizer_types import canonical_optimizer, scheduler_class_path

    for key, check in (("optimizer.type", canonical_optimizer), ("scheduler.class_path", scheduler_class_path)):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        if isinstance(value, str) and value != "???":
            check(value)


@cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _unknown_keys(node: DictConfig, schema: type, prefix: str) -> Iterator[str]:
    hints = _hints(schema)
    for key in node.keys():
        child = node._get_node(key)
        if key not in hints:
            yield from _leaves(child, f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            if not (child._is_missing() or child._is_none() or child._is_interpolation()):
                yield from _unknown_keys(child, hints[key], f"{prefix}{key}.")


def _leaves(node: Any, key: str) -> Iterator[str]:
    """The dotted keys a user gave under an unknown key (`+network.args.x=1`: network.args.x)."""
    if isinstance(node, DictConfig) and not (node._is_missing() or node._is_none()) and len(node):
        for name in node.keys():
            yield from _leaves(node._get_node(name), f"{key}.{name}")
    else:
        yield key


def unknown_key_message(key: str, cfg: DictConfig | None = None) -> str:
    """What is wrong with `key` (not an option) and the option meant, e.g. "training.min_snr_gama:
    not an option of training; did you mean training.min_snr_gamma? (...)". `cfg` (the composed
    config) names the options of the chosen network kind / schedule for their args."""
    from atelier.config.options import RUN_GROUP, schema_fields

    fields = schema_fields()
    group, _, rest = key.partition(".")
    in_group = {k: f for k, f in fields.items() if k.startswith(f"{group}.")}
    if not in_group or not rest:  # a top-level key
        group, rest = RUN_GROUP, key
        in_group = {k: f for k, f in fields.items() if "." not in k}
    name, _, sub = rest.partition(".")
    listing = f"(`atelier options {group}` lists them)"
    where = "the run config" if group == RUN_GROUP else group
    if sub and name in ARGS_NAMES.get(group, ()):
        return _args_message(key, group, sub, in_group, cfg) + " " + listing
    hint = _closest(name, in_group, fields)
    return f"{key}: not an option of {where}{f'; did you mean {hint}?' if hint else ''} {listing}"


def _closest(name: str, in_group: dict[str, Any], fields: dict[str, Any]) -> str | None:
    """The option meant by `name`: one of the group's keys or sd-scripts flags (difflib), else
    the same name (or flag) in another group."""
    from atelier.config.schema import flag_name

    def names(options: dict[str, Any]) -> dict[str, str]:
        found = {key.rpartition(".")[2]: key for key in options}
        for key, field in options.items():
            flag = field.metadata.get("flag")
            if flag and " " not in flag:
                found.setdefault(flag_name(flag), key)
        return found

    local, anywhere = names(in_group), names(fields)
    close = difflib.get_close_matches(name, list(local), n=1)
    found, key = (close[0], local[close[0]]) if close else (name, anywhere.get(name))
    if key is None:
        return None
    return f"{key} (sd-scripts' --{found})" if found != key.rpartition(".")[2] else key


def _args_message(key: str, group: str, sub: str, in_group: dict[str, Any], cfg: DictConfig | None) -> str:
    """`network.args.x` / `scheduler.args.x`: sd-scripts' --network_args / --lr_scheduler_args are
    keys of their own here; the message names the key to set, or those the chosen kind reads."""
    if sub in {k.rpartition(".")[2] for k in in_group} - {"type", "module"}:
        return f"{key}: sd-scripts' {group} args are options of their own here: set {group}.{sub}"
    selector = "module" if group == "network" else "type"
    chosen = None if cfg is None else OmegaConf.select(cfg, f"{group}.{selector}", default=None,
                                                       throw_on_resolution_failure=False)
    chosen = getattr(chosen, "value", chosen)  # an enum member in a typed node
    try:
        if group == "network":
            accepted = sorted(kind_named(str(chosen)).args)
        else:
            from atelier.config.schema.scheduler import keys_read_by

            accepted = keys_read_by(chosen)
    except (ValueError, KeyError):
        chosen, accepted = None, sorted(k.rpartition(".")[2] for k in in_group)
    of = f"{group}.{selector}={chosen}" if chosen is not None else group
    return f"{key}: not an argument {of} takes; it takes {', '.join(f'{group}.{a}' for a in accepted)}"
