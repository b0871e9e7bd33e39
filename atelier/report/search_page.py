"""The report's Search section (a sweep with an Optuna study): the best trial as a command line
to copy, every trial and how it ended, the optimisation history and the parameter importances."""

from __future__ import annotations

import math
from collections import Counter
from html import escape
from typing import Any

from atelier.report.search import SearchReport, TrialRecord

# Added to the page's CSS when it has a Search section (badges of trial states are the page's).
SEARCH_CSS = """
pre.command { margin:8px 0 16px; padding:10px 12px; background:#eef0f4; border-radius:6px; overflow-x:auto;
  white-space:pre-wrap; overflow-wrap:anywhere; user-select:all; }
pre.command code { background:none; padding:0; }
h3 { font-size:16px; margin:18px 0 8px; }
table.importances { width:auto; min-width:50%; }
tr.trial-failed { background:var(--bad-bg); box-shadow:inset 4px 0 var(--bad); }
tr.trial-failed:has(+ tr.reason) td { border-bottom:none; }
tr.trial-pruned td { color:var(--muted); }
.bar { display:inline-block; height:10px; background:#175cd3; border-radius:2px; vertical-align:middle; }
"""
STATE_ORDER = ("complete", "pruned", "failed", "running", "waiting")


def search_section(search: SearchReport, plot_href: str | None) -> str:
    counts = Counter(trial.state for trial in search.trials)
    states = ", ".join(f"{counts[s]} {s}" for s in [*STATE_ORDER, *sorted(set(counts) - set(STATE_ORDER))] if counts[s])
    what = "An Optuna search" if search.kind == "search" else "A grid with pruning (hydra.sweeper.prune=true)"
    parts = [
        "<section id=\"search\">\n<h2>Search</h2>",
        (f"<p class=\"note\">{what}: {len(search.trials)} trials ({states or 'none yet'}); objective "
         f"<code>{escape(search.objective)}</code> ({escape(search.direction)}).</p>"),
        _best(search),
        _trials_table(search),
    ]
    if plot_href:
        parts.append(
            f"<figure><img src=\"{plot_href}\" alt=\"optimisation history: objective by trial\">"
            f"<figcaption>Optimisation history: each complete trial's {escape(search.objective)} by trial number, "
            "the best so far (orange line); pruned trials at the last validation loss they reported.</figcaption>"
            "</figure>"
        )
    parts += [_importances(search), "</section>"]
    return "\n".join(parts)


def _best(search: SearchReport) -> str:
    best = search.best
    if best is None:
        return "<p>No trial has completed yet, so there is no best configuration.</p>"
    text = (f"<p><span class=\"star\">&#9733;</span> Best trial: <strong>{best.number}</strong> "
            f"(<code>{escape(best.name)}</code>), {escape(search.objective)} = {_value(best.value)}.")
    if search.command is None:
        return text + "</p>"
    return text + " To train it again:</p>\n" f"<pre class=\"command\"><code>{escape(search.command)}</code></pre>"


def _trials_table(search: SearchReport) -> str:
    keys: list[str] = []
    for trial in search.trials:
        keys += [key for key in trial.params if key not in keys]
    head = "".join(
        ["<th class=\"num\">trial</th><th>run</th><th>state</th>",
         f"<th class=\"num\">{escape(search.objective)}</th><th class=\"num\">last report</th>",
         *(f"<th class=\"swept\">{escape(key)}</th>" for key in keys)]
    )
    width = 5 + len(keys)
    rows = []
    for trial in search.trials:
        is_best = trial is search.best
        star = "<span class=\"star\">&#9733;</span> " if is_best else ""
        report = f"step {trial.last_report[0]}: {_value(trial.last_report[1])}" if trial.last_report else ""
        cells = (
            f"<td class=\"num\">{star}{trial.number}</td><td><code>{escape(trial.name)}</code></td>"
            f"<td><span class=\"badge {escape(trial.state)}\">{escape(trial.state)}</span></td>"
            f"<td class=\"num\">{_value(trial.value)}</td><td class=\"num\">{escape(report)}</td>"
            + "".join(_param_cell(trial, key) for key in keys)
        )
        classes = " ".join([f"trial-{trial.state}"] + (["is-best"] if is_best else []))
        rows.append(f"<tr class=\"{escape(classes)}\" data-trial=\"{trial.number}\">{cells}</tr>")
        if trial.reason:
            rows.append(f"<tr class=\"reason\"><td colspan=\"{width}\"><span class=\"reason-label\">why:</span> "
                        f"{escape(str(trial.reason))}</td></tr>")
    return (
        "<h3>Trials</h3>\n<p class=\"note\">Each trial is one run of the sweep (<code>run</code>: its folder); "
        "last report: the validation loss it last told its trial while training.</p>\n"
        f"<table id=\"trials\"><thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    )


def _importances(search: SearchReport) -> str:
    if not search.importances:
        return f"<h3>Parameter importances</h3>\n<p class=\"note\">{escape(search.importances_note or 'None.')}</p>"
    top = max(search.importances.values()) or 1.0
    rows = "".join(
        f"<tr data-param=\"{escape(key)}\"><td><code>{escape(key)}</code></td><td class=\"num\">{share:.1%}</td>"
        f"<td><span class=\"bar\" style=\"width:{max(1, round(200 * share / top))}px\"></span></td></tr>"
        for key, share in search.importances.items()
    )
    return (
        "<h3>Parameter importances</h3>\n<p class=\"note\">How much of the objective's variation over the complete "
        "trials each parameter explains (Optuna's default importance evaluator); shares add up to 100%.</p>\n"
        f"<table class=\"importances\"><thead><tr><th>parameter</th><th class=\"num\">share</th><th></th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _param_cell(trial: TrialRecord, key: str) -> str:
    if key not in trial.params:
        return "<td></td>"
    value = trial.params[key]
    shown = _value(value) if isinstance(value, float) else escape(str(value))
    title = f" title=\"{escape(repr(value))}\"" if isinstance(value, float) else ""
    return f"<td><span class=\"short\"{title}>{shown}</span></td>"


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return escape(str(value))
    return escape(f"{value:.4g}")
