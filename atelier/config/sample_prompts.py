"""Sample prompts in kohya sd-scripts syntax.

One prompt per line::

    a photo of sks dog --n blurry, lowres --w 512 --h 768 --s 28 --l 7.5 --d 1234 --ss euler_a

Options may come in any order and are case-insensitive: ``--n`` negative prompt,
``--w``/``--h`` size, ``--s`` steps, ``--l`` CFG scale, ``--d`` seed, ``--ss`` sampler for
this prompt only, ``--g`` FLUX's distilled guidance. Lines starting with ``#`` are comments;
blank lines are skipped.

The prompt and the negative prompt may weight words A1111-style, as sd-scripts' sampler reads
them (always, with or without weighted captions): ``(word)`` x1.1, ``[word]`` /1.1,
``(word:1.3)``, nesting multiplies, ``\(`` for a literal bracket. They are kept here as
written; the sampler reads them (atelier.sampling.prompt_text).

A prompt file is read as sd-scripts' load_prompts reads it: a .txt of such lines; a .toml
whose ``[prompt]`` table holds the defaults and each ``[[prompt.subset]]`` one prompt; or a
.json list whose items are such lines or tables. A table's keys are sd-scripts' (prompt,
negative_prompt, width, height, sample_steps, scale, seed, sample_sampler, guidance_scale).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier.config.samplers import normalize_sampler

logger = logging.getLogger(__name__)

# Seeds of prompts without --d and without a default seed: fixed, so that the samples of
# every epoch (and of every run in a sweep) start from the same noise and stay comparable.
FALLBACK_SEED_BASE = 1000

# sd-scripts clamps steps to this range instead of failing.
MIN_STEPS, MAX_STEPS = 1, 1000

# The VAE works on multiples of 8 px; sd-scripts also never goes below 64 px.
SIZE_MULTIPLE = 8
MIN_SIZE = 64

# Only " --" followed by a letter starts an option, so a prompt like "a -- b" stays intact.
_OPTION_SPLIT = re.compile(r"(?:^|\s+)--(?=[A-Za-z])")

KNOWN_OPTIONS = ("n", "w", "h", "s", "l", "d", "ss", "g")

# A prompt table's keys in a .toml / .json prompt file (sd-scripts' names) -> the line option.
TABLE_KEYS = {
    "negative_prompt": "n", "width": "w", "height": "h", "sample_steps": "s", "scale": "l", "seed": "d",
    "sample_sampler": "ss", "guidance_scale": "g",
}  # fmt: skip
# Keys sd-scripts reads for models or features Atelier does not sample with: refused by name.
UNSUPPORTED_TABLE_KEYS = {
    "controlnet_image": "ControlNet samples", "cfg_trunc_ratio": "Lumina's CFG truncation",
    "renorm_cfg": "Lumina's CFG renormalisation", "flow_shift": "flow-matching models' shift",
}  # fmt: skip
PROMPT_FILE_SUFFIXES = (".txt", ".toml", ".json")


@dataclass
class SampleDefaults:
    """Values for options a prompt line leaves out."""

    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    negative_prompt: str = ""
    seed: int | None = None


@dataclass
class SamplePrompt:
    """One fully resolved sample request; `index` is its position among the prompts."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    index: int
    # sd-scripts' per-prompt --ss; None means the pipeline's sampler.
    sampler: str | None = None
    # --g: the distilled guidance of FLUX models (SD models have none: their CFG is cfg_scale).
    guidance: float | None = None


def parse_prompts(text_or_lines: str | list[str], defaults: SampleDefaults) -> list[SamplePrompt]:
    """Parse prompt lines (a text or a list of lines) into resolved sample prompts.

    Raises ValueError naming the line and the option for unknown options or bad numbers.
    """
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else list(text_or_lines)
    prompts: list[SamplePrompt] = []
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, defaults, index=len(prompts), line_no=line_no))
    return prompts


def parse_prompt_line(line: str, defaults: SampleDefaults, index: int, line_no: int | None = None) -> SamplePrompt:
    """Parse one non-comment prompt line; `line_no` only serves error messages."""
    where = f"sample prompt line {line_no if line_no is not None else index + 1} ({line!r})"
    prompt, *option_texts = _OPTION_SPLIT.split(line.strip())
    # A repeated option: the last one wins, as in sd-scripts.
    options = dict(_split_option(text, where) for text in option_texts)
    return _resolve(prompt, options, defaults, index, where)


def parse_prompt_table(table: Mapping[str, Any], defaults: SampleDefaults, index: int, where: str) -> SamplePrompt:
    """One prompt of a .toml / .json prompt file: a table of sd-scripts' keys (TABLE_KEYS)."""
    if not isinstance(table.get("prompt"), str):
        raise ValueError(f"{where}: needs a `prompt` string")
    options = {}
    for key, value in table.items():
        if key == "prompt":
            continue
        if key in UNSUPPORTED_TABLE_KEYS:
            raise ValueError(f"{where}: `{key}` is for {UNSUPPORTED_TABLE_KEYS[key]}, which Atelier does not sample; remove it")
        if key not in TABLE_KEYS:
            raise ValueError(f"{where}: unknown key `{key}`; known keys: prompt, {', '.join(TABLE_KEYS)}")
        if isinstance(value, (dict, list)) or isinstance(value, bool):
            raise ValueError(f"{where}: `{key}` needs a {'text' if key in ('negative_prompt', 'sample_sampler') else 'number'}, got {value!r}")
        options[TABLE_KEYS[key]] = str(value)
    return _resolve(table["prompt"], options, defaults, index, where)


def _resolve(prompt: str, options: dict[str, str], defaults: SampleDefaults, index: int, where: str) -> SamplePrompt:
    return SamplePrompt(
        prompt=prompt.strip(),
        negative_prompt=options.get("n", defaults.negative_prompt).strip(),
        width=_parse_size(options.get("w"), defaults.width, "w", where),
        height=_parse_size(options.get("h"), defaults.height, "h", where),
        steps=_parse_steps(options.get("s"), defaults.steps, where),
        cfg_scale=_parse_float(options["l"], "l", where) if "l" in options else float(defaults.cfg_scale),
        seed=_parse_seed(options["d"], where) if "d" in options else default_seed(index, defaults),
        index=index,
        sampler=_parse_sampler(options["ss"], where) if "ss" in options else None,
        guidance=_parse_float(options["g"], "g", where) if "g" in options else None,
    )


def default_seed(index: int, defaults: SampleDefaults) -> int:
    """The fixed seed of a prompt without --d (never random, see FALLBACK_SEED_BASE)."""
    base = defaults.seed if defaults.seed is not None else FALLBACK_SEED_BASE
    return base + index


def load_prompt_file(path: str | Path, defaults: SampleDefaults | None = None) -> list[SamplePrompt]:
    """Read a prompt file as sd-scripts does (see the module docstring): .txt, .toml or .json."""
    path = Path(path)
    defaults = defaults or SampleDefaults()
    if not path.is_file():
        raise FileNotFoundError(f"sampling.prompt_file: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise ValueError(f"{path} is not a prompt file sd-scripts reads "
                         f"({', '.join(PROMPT_FILE_SUFFIXES)})")  # fmt: skip
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return parse_prompts(text, defaults)
    entries = _toml_prompts(text, path) if suffix == ".toml" else _json_prompts(text, path)
    prompts: list[SamplePrompt] = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: prompt {number}"
        if isinstance(entry, str):
            if entry.strip() and not entry.strip().startswith("#"):
                prompts.append(parse_prompt_line(entry, defaults, index=len(prompts), line_no=number))
        elif isinstance(entry, Mapping):
            prompts.append(parse_prompt_table(entry, defaults, len(prompts), where))
        else:
            raise ValueError(f"{where}: expected a prompt line or a table, got {entry!r}")
    return prompts


def _toml_prompts(text: str, path: Path) -> list[dict[str, Any]]:
    """[prompt] holds the defaults, each [[prompt.subset]] one prompt (a subset's keys win)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise ValueError(f"{path} needs a [prompt] table with [[prompt.subset]] entries, "
                         "one per prompt (sd-scripts' layout)")  # fmt: skip
    shared = {key: value for key, value in table.items() if key != "subset"}
    return [{**shared, **subset} if isinstance(subset, dict) else subset for subset in table["subset"]]


def _json_prompts(text: str, path: Path) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of prompt lines or tables")
    return data


def _split_option(text: str, where: str) -> tuple[str, str]:
    """'w 512' -> ('w', '512'); the split pattern guarantees `text` starts with a letter."""
    key, *value = text.strip().split(maxsplit=1)
    if key.lower() not in KNOWN_OPTIONS:
        known = ", ".join("--" + k for k in KNOWN_OPTIONS)
        raise ValueError(f"{where}: unknown option --{key}; known options: {known}")
    return key.lower(), value[0].strip() if value else ""


def _parse_int(value: str, key: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: option --{key} needs an integer, got {value!r}") from None


def _parse_seed(value: str, where: str) -> int:
    seed = _parse_int(value, "d", where)
    if not 0 <= seed < 2**64:  # the range torch.Generator.manual_seed accepts
        raise ValueError(f"{where}: option --d needs an integer from 0 to 2**64-1, got {value!r}")
    return seed


def _parse_float(value: str, key: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{where}: option --{key} needs a number, got {value!r}")
    return number


def _parse_size(value: str | None, default: int, key: str, where: str) -> int:
    size = _parse_int(value, key, where) if value is not None else int(default)
    rounded = max(MIN_SIZE, size - size % SIZE_MULTIPLE)
    if rounded != size:
        logger.warning(
            "%s: --%s %d is not a multiple of %d (min %d); using %d", where, key, size, SIZE_MULTIPLE, MIN_SIZE, rounded
        )
    return rounded


def _parse_steps(value: str | None, default: int, where: str) -> int:
    steps = _parse_int(value, "s", where) if value is not None else int(default)
    clamped = min(MAX_STEPS, max(MIN_STEPS, steps))
    if clamped != steps:
        logger.warning("%s: --s %d is outside %d..%d; using %d", where, steps, MIN_STEPS, MAX_STEPS, clamped)
    return clamped


def _parse_sampler(value: str, where: str) -> str:
    try:
        return normalize_sampler(value)
    except ValueError as error:
        raise ValueError(f"{where}: option --ss: {error}") from None
