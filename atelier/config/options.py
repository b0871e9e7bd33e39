"""Every option of the run config, read from the schema's field metadata: its key, type,
default, doc, sd-scripts flag and ss_* metadata keys.

One source for `atelier options [group]`, the README's option table (render_markdown),
`atelier export-kohya` (schema_fields: the flags) and the LoRA metadata writer (the ss keys).
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

from atelier.config.schema import SCHEMAS, AtelierConfig

RUN_GROUP = "run"  # the top-level keys (project, recipe, resume, overwrite)
README_BEGIN = "<!-- options:begin -->"
README_END = "<!-- options:end -->"
REGENERATE = ".venv/bin/atelier options --readme README.md"


@dataclass(frozen=True)
class ConfigOption:
    key: str  # dotted, as given on the command line: "network.dim", "project"
    group: str  # "network"; RUN_GROUP for top-level keys
    type: str  # "int", "float | None", "sd1 | sd2 | sdxl"
    default: str  # YAML spelling: "8", "null", "???" (must be given), "${dataset.resolution}"
    doc: str
    flag: str | None  # sd-scripts' name (see atelier.config.schema.fields.option)
    ss: tuple[str, ...]
    kohya: str


@cache
def schema_fields() -> dict[str, dataclasses.Field]:
    """Dotted key -> the schema field, every leaf option of AtelierConfig in schema order."""
    found: dict[str, dataclasses.Field] = {}
    for field in dataclasses.fields(AtelierConfig):
        if field.name in SCHEMAS:  # a group: its own schema's fields
            found.update({f"{field.name}.{f.name}": f for f in dataclasses.fields(SCHEMAS[field.name])})
        else:
            found[field.name] = field
    return found


def groups() -> list[str]:
    return [RUN_GROUP, *(name for name in SCHEMAS if name != "atelier")]


def _group_of(key: str) -> str:
    return key.split(".")[0] if "." in key else RUN_GROUP


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Enum):
        return " | ".join(str(member.value) for member in hint)
    if isinstance(hint, type):
        return hint.__name__
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        return " | ".join([*map(_type_name, args), "None"])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return "any" if hint is Any else str(hint)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if value == "":
        return '""'
    return str(value)


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return _yaml(field.default_factory())
    return _yaml(field.default)


@cache
def _hints() -> dict[str, dict[str, Any]]:
    return {name: typing.get_type_hints(schema) for name, schema in SCHEMAS.items()}


def all_options(group: str | None = None) -> list[ConfigOption]:
    """Every option (of one group), in schema order; ValueError names the groups for an unknown one."""
    if group is not None and group not in groups():
        raise ValueError(f"no option group '{group}'; the groups are: {', '.join(groups())}")
    found = []
    for key, field in schema_fields().items():
        if group is not None and _group_of(key) != group:
            continue
        schema = "atelier" if _group_of(key) == RUN_GROUP else _group_of(key)
        meta = field.metadata
        found.append(ConfigOption(key=key, group=_group_of(key), type=_type_name(_hints()[schema][field.name]),
                            default=_default(field), doc=meta.get("doc", ""), flag=meta.get("flag"),
                            ss=meta.get("ss", ()), kohya=meta.get("kohya", "")))  # fmt: skip
    return found


def sd_scripts_name(flag: str | None) -> str:
    """How a user writes it for sd-scripts: "--network_dim", "--network_args conv_dim=...", "--sample_prompts --w"."""
    if flag is None:
        return ""
    name, _, rest = flag.partition(" ")
    if rest and not rest.startswith("--"):
        rest += "=..."
    return f"--{name} {rest}".rstrip()


def render_text(options: list[ConfigOption]) -> str:
    """`atelier options`: one block per option."""
    blocks = []
    for o in options:
        lines = [f"{o.key}: {o.type} = {o.default}", textwrap.fill(o.doc, 100, initial_indent="    ",
                                                                   subsequent_indent="    ")]
        names = [f"sd-scripts: {sd_scripts_name(o.flag)}"] if o.flag else []
        names += [f"metadata: {', '.join(o.ss)}"] if o.ss else []
        if names:
            lines.append("    " + "; ".join(names))
        if o.kohya:
            lines.append(textwrap.fill(f"vs sd-scripts: {o.kohya}", 100, initial_indent="    ",
                                       subsequent_indent="      "))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _cell(text: str) -> str:
    """Table-cell text: a pipe would end the cell, <name> would vanish as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(options: list[ConfigOption]) -> str:
    """README's option table (between README_BEGIN and README_END): one table per group."""
    out = [f"<!-- generated from atelier/config/schema/ by `{REGENERATE}`; do not edit by hand -->"]
    for group in groups():
        rows = [o for o in options if o.group == group]
        if not rows:
            continue
        out += ["", f"#### `{group}`" if group != RUN_GROUP else "#### the run (top-level keys)", "",
                "| key | type | default | sd-scripts | ss_* metadata | what it does |",
                "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for o in rows:
            flag = f"`{sd_scripts_name(o.flag)}`" if o.flag else ""
            if o.kohya:
                flag = f"{flag} ({_cell(o.kohya)})" if flag else _cell(o.kohya)
            ss = ", ".join(f"`{k}`" for k in o.ss)
            out.append(f"| `{o.key}` | {_cell(o.type)} | `{o.default}` | {flag} | {ss} | {_cell(o.doc)} |")
    return "\n".join(out) + "\n"


def _table_span(readme: str) -> tuple[int, int]:
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"the README has no {README_BEGIN} ... {README_END} markers for the option table")
    return readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)


def with_readme_table(readme: str, table: str) -> str:
    """README text with `table` between the markers."""
    start, end = _table_span(readme)
    return readme[:start] + "\n" + table + readme[end:]
