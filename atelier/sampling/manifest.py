"""The samples manifest: ``samples.json`` in a samples folder, a JSON list of records.

One record per sample image, oldest first::

    {"file": "run_e000001_00_20250101120000_1000.png",  # relative to the folder
     "index": 0, "prompt": "...", "negative_prompt": "...", "seed": 1000,
     "epoch": 1,  # None for samples taken every N steps
     "step": 120, "width": 512, "height": 512, "steps": 20, "cfg_scale": 7.0,
     "sampler": "euler_a", "created": "2025-01-01T12:00:00"}

FLUX samples also hold "guidance" (the distilled guidance, --g); their "sampler" is "euler"
(flow-match Euler, FLUX's one sampler) and "cfg_scale" 1.0 means no CFG (sd-scripts' FLUX default).

Kept free of torch and diffusers so that reports can read it cheaply.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atelier.config.sample_prompts import SamplePrompt
from atelier.utils.atomic import write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "samples.json"
# The run dir's folder of sample images (and their manifest).
SAMPLES_DIR = "samples"


def manifest_record(
    path: Path, prompt: SamplePrompt, epoch: int | None, step: int, sampler: str, guidance: float | None = None
) -> dict[str, Any]:
    """One sample's record; `guidance` (FLUX's) is recorded when given, so SD records stay as they were."""
    record = {
        "file": path.name,
        "index": prompt.index,
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative_prompt,
        "seed": prompt.seed,
        "epoch": epoch,
        "step": step,
        "width": prompt.width,
        "height": prompt.height,
        "steps": prompt.steps,
        "cfg_scale": prompt.cfg_scale,
        "sampler": sampler,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if guidance is not None:
        record["guidance"] = guidance
    return record


def read_manifest(samples_dir: str | Path) -> list[dict[str, Any]]:
    """The manifest's records, oldest first; [] when there is none."""
    path = Path(samples_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of sample records")
    return records


def append_manifest(samples_dir: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Read-modify-write of the manifest; the atomic write keeps it valid if training dies mid-way."""
    samples_dir = Path(samples_dir)
    try:
        existing = read_manifest(samples_dir)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        # A broken manifest must not stop training: keep it aside and start a new one.
        broken = samples_dir / f"{MANIFEST_NAME}.broken-{time.strftime('%Y%m%d%H%M%S')}"
        logger.warning("unreadable %s (%s); moved it to %s", MANIFEST_NAME, error, broken.name)
        (samples_dir / MANIFEST_NAME).replace(broken)
        existing = []
    write_text(samples_dir / MANIFEST_NAME, json.dumps([*existing, *map(dict, records)], indent=1) + "\n")


def drop_records_after(samples_dir: str | Path, step: int) -> None:
    """Forget the samples taken after `step` (a run continuing from there takes them again);
    their images stay on disk, only the manifest stops listing them."""
    samples_dir = Path(samples_dir)
    try:
        records = read_manifest(samples_dir)
    except ValueError:
        return  # append_manifest sets an unreadable manifest aside
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    if len(kept) != len(records):
        write_text(samples_dir / MANIFEST_NAME, json.dumps(kept, indent=1) + "\n")
