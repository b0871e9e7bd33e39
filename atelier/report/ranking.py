"""Which run of a sweep is best, and how much that choice can be trusted.

Validation loss ranks runs when any finished run logged one: it is measured on held-out
images with fixed noise, so it compares runs fairly. Otherwise the training loss does, as
the mean of each run's last steps; a diffusion loss swings from step to step with the
sampled timestep, so a gap smaller than that noise says nothing and the page says so.
A sweep too short to tell anything (a smoke test) names no best run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atelier.report.collect import RECENT_STEPS, RunRecord, Sweep

# Fewer logged steps than this (e.g. debug=smoke's 2) is a check that the sweep runs, not a comparison.
MIN_STEPS_TO_RANK = 20
# A gap under this many standard errors of the difference of two means counts as noise.
NOISE_SIGMAS = 2.0

METRICS = ("val_loss_last", "recent_loss")


@dataclass(frozen=True)
class Ranking:
    metric: str  # "val_loss_last" | "recent_loss"
    best: RunRecord | None
    runner_up: RunRecord | None
    note: str  # one sentence for the page: how runs were ranked, and any caveat
    within_noise: bool = False  # best and runner-up differ by less than the noise


def metric_title(metric: str) -> str:
    if metric == "val_loss_last":
        return "validation loss"
    return f"training loss (mean of the last {RECENT_STEPS} steps)"


def ranking_metric(sweep: Sweep) -> str:
    """"val_loss_last" when any finished run logged validation loss, else "recent_loss"."""
    if any(run.status == "completed" and _finite(run.val_loss_last) for run in sweep.runs):
        return "val_loss_last"
    return "recent_loss"


def rank(sweep: Sweep) -> Ranking:
    metric = ranking_metric(sweep)
    candidates = sorted(
        (run for run in sweep.runs if run.status == "completed" and _finite(getattr(run, metric))),
        key=lambda run: getattr(run, metric),
    )
    if not candidates:
        return Ranking(metric, None, None, "No run has finished yet, so there is no best run.")
    steps = max(run.steps or 0 for run in candidates)
    if steps < MIN_STEPS_TO_RANK:
        return Ranking(
            metric, None, None,
            f"No best run: the runs trained {steps} step{'s' if steps != 1 else ''}, too few to compare "
            f"(at least {MIN_STEPS_TO_RANK} needed; a debug=smoke sweep only checks that every job runs).",
        )
    best = candidates[0]
    runner_up = candidates[1] if len(candidates) > 1 else None
    how = (
        "Ranked by validation loss (held-out images, the same noise for every run)."
        if metric == "val_loss_last"
        else f"Ranked by training loss, the mean of each run's last {RECENT_STEPS} steps (no validation loss "
        "was logged: set dataset.validation_split to rank by held-out loss)."
    )
    noise = noise_of_difference(best, runner_up) if metric == "recent_loss" and runner_up else None
    if noise is not None and runner_up.recent_loss - best.recent_loss < noise:
        return Ranking(
            metric, best, runner_up,
            f"{how} The gap to the next run ({runner_up.recent_loss - best.recent_loss:.4f}) is below the noise "
            f"of the step losses (±{noise:.4f}), so the order may be chance.",
            within_noise=True,
        )
    return Ranking(metric, best, runner_up, how)


def noise_of_difference(a: RunRecord, b: RunRecord) -> float | None:
    """NOISE_SIGMAS standard errors of the difference between the two runs' recent-loss means."""
    if a.recent_std is None or b.recent_std is None or not a.recent_steps or not b.recent_steps:
        return None
    return NOISE_SIGMAS * math.sqrt(a.recent_std**2 / a.recent_steps + b.recent_std**2 / b.recent_steps)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
