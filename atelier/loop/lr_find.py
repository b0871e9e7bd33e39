"""A learning rate for AdamW from a short run of an adaptive optimizer (experiment=lr_find).

The kohya_ss tutorial method: Prodigy / D-Adaptation estimate their own step size d*lr;
once it has settled, that value is a good constant learning rate for AdamW on the same
data and network. This reads the d*lr the run logged to metrics.jsonl (lr/d*lr/<group>),
takes its median over the last part of the run, and writes lr_suggestion.json.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from atelier.loop.metrics import METRICS
from atelier.config.schema.optimizer import LrFindError
from atelier.optim.optimizers import optimizer_type as typed_optimizer
from atelier.utils.atomic import write_text

log = logging.getLogger(__name__)

SUGGESTION_FILE = "lr_suggestion.json"
PREFIX = "lr/d*lr/"
# The settled value is the median of the last TAIL_FRACTION of the logged steps.
TAIL_FRACTION = 0.25
# Over that window d*lr should move less than this (relative); otherwise: train longer.
SETTLED_SPREAD = 0.10


def read_effective_lrs(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Group name ("unet", "text_encoder") -> [(step, d*lr)] from the run's metrics.jsonl."""
    path = run_dir / METRICS
    if not path.is_file():
        raise LrFindError(f"{path} does not exist: the run logged no metrics")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith(PREFIX) and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key[len(PREFIX) :], []).append((int(record["step"]), float(value)))
    return series


def settled_value(points: list[tuple[int, float]], tail_fraction: float = TAIL_FRACTION) -> dict[str, Any]:
    """Median of the last `tail_fraction` of the points, and how much they still moved."""
    if not points:
        raise LrFindError("no d*lr values to read")
    tail = points[-max(1, math.ceil(len(points) * tail_fraction)) :]
    values = [v for _, v in tail]
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median > 0 else math.inf
    return {
        "value": median,
        "from_step": tail[0][0],
        "to_step": tail[-1][0],
        "spread": spread,
        "settled": spread <= SETTLED_SPREAD,
        "final": points[-1][1],
    }


def suggest_learning_rate(run_dir: Path, optimizer_type: str | None = None) -> dict[str, Any]:
    """The suggestion as a dict (written by `write_suggestion`); optimizer_type is recorded in it."""
    source = typed_optimizer(optimizer_type) if optimizer_type else ""
    series = read_effective_lrs(run_dir)
    if not series:
        raise LrFindError(
            f"{run_dir / METRICS} has no {PREFIX}* values: train with an adaptive optimizer "
            "(optimizer=prodigy or dadapt_adam) for the lr finder"
        )
    groups = {name: settled_value(points) for name, points in sorted(series.items())}
    main = groups.get("unet") or next(iter(groups.values()))
    suggestion = {
        "method": f"median of {PREFIX}<group> over the last {TAIL_FRACTION:.0%} of the logged steps",
        "source_optimizer": source,
        "learning_rate": main["value"],
        "unet_lr": groups["unet"]["value"] if "unet" in groups else None,
        "text_encoder_lr": groups["text_encoder"]["value"] if "text_encoder" in groups else None,
        "settled": all(g["settled"] for g in groups.values()),
        "groups": groups,
    }
    overrides = ["optimizer=adamw", f"optimizer.learning_rate={main['value']:.3g}"]
    for key in ("unet_lr", "text_encoder_lr"):
        # Per-part rates only where they differ (Prodigy's d is shared; the groups' lr may not be).
        if suggestion[key] is not None and f"{suggestion[key]:.3g}" != f"{main['value']:.3g}":
            overrides.append(f"optimizer.{key}={suggestion[key]:.3g}")
    suggestion["overrides"] = " ".join(overrides)
    return suggestion


def write_suggestion(run_dir: Path, suggestion: dict[str, Any]) -> Path:
    path = run_dir / SUGGESTION_FILE
    write_text(path, json.dumps(suggestion, indent=2) + "\n")
    return path


def suggest_and_report(run_dir: Path, optimizer_type: str | None = None) -> dict[str, Any]:
    """Read the run's metrics, write lr_suggestion.json, print and log the suggestion."""
    suggestion = suggest_learning_rate(run_dir, optimizer_type)
    path = write_suggestion(run_dir, suggestion)
    lines = [f"lr finder: suggested AdamW learning rate {suggestion['learning_rate']:.3g} ({path})"]
    for name, group in suggestion["groups"].items():
        lines.append(
            f"  {name}: d*lr {group['value']:.3g} over steps {group['from_step']}-{group['to_step']} "
            f"(moved {group['spread']:.0%})"
        )
    if not suggestion["settled"]:
        lines.append(
            f"  d*lr was still moving more than {SETTLED_SPREAD:.0%} at the end: train longer "
            "(training.max_train_steps) for a steadier value"
        )
    lines.append(f"  next: python train.py {suggestion['overrides']}")
    print("\n".join(lines), flush=True)
    log.info("lr suggestion written to %s", path)
    return suggestion
