"""report.html: one self-contained page (inline CSS, no scripts, relative image links)."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from urllib.parse import quote

from atelier.report.collect import RunRecord, Sweep
from atelier.report.grids import PromptGrid
from atelier.report.table import best_run, ranking_metric

STATUS_ORDER = {"completed": 0, "running": 1, "interrupted": 2, "pending": 3, "failed": 4}
METRIC_TITLES = {"final_loss": "final loss", "val_loss_last": "validation loss"}

CSS = """
:root { --ink:#1f2430; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --card:#fff;
  --ok:#067647; --ok-bg:#ecfdf3; --bad:#b42318; --bad-bg:#fef3f2; --run:#175cd3; --run-bg:#eff8ff;
  --best-bg:#fffaeb; --best:#b54708; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width:1320px; margin:0 auto; padding:28px 32px 48px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:0 0 12px; }
code { font:13px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; background:#eef0f4;
  padding:1px 5px; border-radius:4px; }
.meta { color:var(--muted); margin:0 0 4px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px;
  padding:20px 22px; margin-top:20px; }
.best { background:var(--best-bg); border-color:#fedf89; padding:14px 22px; }
.best p { margin:0; }
.best strong { color:var(--best); }
.note { color:var(--muted); font-size:13px; margin:-6px 0 12px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { padding:7px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top;
  white-space:nowrap; }
th { background:#f2f4f7; font-weight:600; position:sticky; top:0; }
th.sorted::after { content:" \\25B2"; font-size:10px; color:var(--muted); }
th.swept { color:#3e4784; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.reason td { white-space:normal; color:var(--bad); font-size:13px; padding-top:0; }
tr.reason .reason-label { font-weight:600; }
tr.failed:has(+ tr.reason) td { border-bottom:none; }
tbody tr:hover { background:#f9fafb; }
tr.failed { background:var(--bad-bg); box-shadow:inset 4px 0 var(--bad); }
tr.is-best { background:var(--best-bg); box-shadow:inset 4px 0 #f79009; font-weight:600; }
.badge { display:inline-block; padding:1px 9px; border-radius:999px; font-size:12px; font-weight:600; }
.badge.completed { color:var(--ok); background:var(--ok-bg); }
.badge.failed { color:var(--bad); background:#fee4e2; }
.badge.running { color:var(--run); background:var(--run-bg); }
.badge.pending { color:var(--muted); background:#f2f4f7; }
.badge.interrupted { color:#b54708; background:#fef0c7; }
.star { color:#f79009; }
figure { margin:0 0 22px; }
figure img { display:block; max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px;
  background:#fff; }
figcaption { color:var(--muted); font-size:14px; margin-top:6px; }
figcaption q { color:var(--ink); font-weight:600; }
a { color:#175cd3; }
footer { color:var(--muted); font-size:13px; margin-top:24px; }
"""


def render_report(
    sweep: Sweep,
    loss_plot: Path,
    grids: Sequence[PromptGrid],
    data_files: Sequence[Path],
) -> str:
    """The page's HTML; every link is relative to the sweep folder, where it is written."""
    best = best_run(sweep)
    metric = ranking_metric(sweep)
    parts = [
        _header(sweep),
        _best_section(best, metric),
        _runs_section(sweep, best, metric),
        _loss_section(sweep, loss_plot),
        _samples_section(sweep, grids),
        _footer(sweep, data_files),
    ]
    title = f"Sweep report: {sweep.path.name}"
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(part for part in parts if part)
        + "\n</main>\n</body>\n</html>\n"
    )


def _header(sweep: Sweep) -> str:
    counts = Counter(run.status for run in sweep.runs)
    status_text = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])
    swept = ", ".join(
        f"<code>{escape(key)}</code> ({len({run.swept[key] for run in sweep.runs})} values)" for key in sweep.swept_keys
    )
    fixed = " ".join(f"<code>{escape(f'{k}={v}')}</code>" for k, v in sweep.constant.items())
    generated = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "<header>",
        "<h1>Sweep report</h1>",
        f"<p class=\"meta\"><code>{escape(str(sweep.path.resolve()))}</code> &middot; generated {generated}</p>",
        f"<p class=\"meta\">{len(sweep.runs)} jobs: {status_text}</p>",
        f"<p class=\"meta\">Swept: {swept or 'nothing (a single configuration)'}"
        + (f" &middot; same in every job: {fixed}" if fixed else "")
        + "</p>",
        "</header>",
    ]
    return "\n".join(lines)


def _best_section(best: RunRecord | None, metric: str) -> str:
    if best is None:
        return "<section class=\"best\"><p>No run has finished yet, so there is no best run.</p></section>"
    value = getattr(best, metric)
    return (
        "<section class=\"best\"><p><span class=\"star\">&#9733;</span> Best run by "
        f"{METRIC_TITLES[metric]}: <strong>{escape(best.label)}</strong> &mdash; {_loss(value)}"
        f" (job <code>{escape(best.name)}</code>)</p></section>"
    )


Column = tuple[str, str, Callable[[RunRecord], str]]  # header, CSS class, <td> of a run


def _table_columns(sweep: Sweep, best: RunRecord | None, metric: str) -> list[Column]:
    def sorted_if(name: str) -> str:
        return "num sorted" if metric == name else "num"

    def job_cell(run: RunRecord) -> str:
        star = "<span class=\"star\">&#9733;</span> " if run is best else ""
        return f"<td>{star}<code>{escape(run.name)}</code></td>"

    columns: list[Column] = [("job", "", job_cell)]
    columns += [(key, "swept", lambda run, key=key: f"<td>{escape(run.swept[key])}</td>") for key in sweep.swept_keys]
    columns += [
        ("status", "", lambda run: f"<td><span class=\"badge {escape(run.status)}\">{escape(run.status)}</span></td>"),
        ("steps", "num", lambda run: _num(run.steps)),
        ("final loss", sorted_if("final_loss"), lambda run: _num(_loss(run.final_loss))),
        ("best loss", "num", lambda run: _num(_loss(run.best_loss))),
    ]
    if any(run.val_loss_last is not None for run in sweep.runs):
        columns += [
            ("val loss (last)", sorted_if("val_loss_last"), lambda run: _num(_loss(run.val_loss_last))),
            ("val loss (best)", "num", lambda run: _num(_loss(run.val_loss_best))),
        ]
    columns += [
        ("wall time", "num", lambda run: _num(_duration(run.wall_seconds))),
        ("s/step", "num", lambda run: _num(_fixed(run.seconds_per_step, 3))),
        ("peak RAM", "num", lambda run: _num(_megabytes(run.peak_ram_mb))),
    ]
    if any(run.peak_vram_mb is not None for run in sweep.runs):
        columns += [("peak VRAM", "num", lambda run: _num(_megabytes(run.peak_vram_mb)))]
    columns += [("LoRA file", "", lambda run: _file_link(sweep, run))]
    return columns


def _runs_section(sweep: Sweep, best: RunRecord | None, metric: str) -> str:
    columns = _table_columns(sweep, best, metric)
    head = "".join(f"<th class=\"{css}\">{escape(title)}</th>" for title, css, _ in columns)
    rows = []
    for run in sorted(sweep.runs, key=lambda run: _sort_key(run, metric)):
        classes = " ".join([run.status] + (["is-best"] if run is best else []))
        cells = "".join(cell(run) for _, _, cell in columns)
        rows.append(
            f"<tr class=\"{classes}\" data-job=\"{escape(run.name)}\" data-status=\"{escape(run.status)}\">{cells}</tr>"
        )
        if run.reason:
            # A row of its own under the run: error messages are long and would stretch the table.
            rows.append(
                f"<tr class=\"reason {escape(run.status)}\"><td colspan=\"{len(columns)}\">"
                f"<span class=\"reason-label\">why:</span> {escape(run.reason)}</td></tr>"
            )
    return (
        "<section>\n<h2>Runs</h2>\n"
        f"<p class=\"note\">Sorted by {METRIC_TITLES[metric]}, lowest first; unfinished and failed runs last. "
        "Swept settings are in blue; the same rows are in <a href=\"runs.csv\">runs.csv</a> and "
        "<a href=\"runs.json\">runs.json</a>.</p>\n"
        f"<div class=\"scroll\"><table id=\"runs\"><thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></div>\n</section>"
    )


def _loss_section(sweep: Sweep, loss_plot: Path) -> str:
    return (
        "<section>\n<h2>Loss curves</h2>\n"
        f"<figure><img src=\"{_href(sweep, loss_plot)}\" alt=\"training loss of every run by step\">"
        "<figcaption>Training loss per step; each line is a run, named by its swept settings.</figcaption>"
        "</figure>\n</section>"
    )


def _samples_section(sweep: Sweep, grids: Sequence[PromptGrid]) -> str:
    if not grids:
        return "<section>\n<h2>Samples</h2>\n<p class=\"note\">No sample images yet.</p>\n</section>"
    figures = []
    for grid in grids:
        prompt = escape(grid.prompt or "(empty prompt)")
        figures.append(
            f"<figure><a href=\"{_href(sweep, grid.path)}\"><img src=\"{_href(sweep, grid.path)}\" "
            f"alt=\"samples of prompt {grid.prompt_index} for every run\"></a>"
            f"<figcaption>Prompt {grid.prompt_index}: <q>{prompt}</q> &mdash; one row per run, "
            f"one column per {_columns_word(grid.columns)}.</figcaption></figure>"
        )
    return "<section>\n<h2>Samples</h2>\n" + "\n".join(figures) + "\n</section>"


def _footer(sweep: Sweep, data_files: Sequence[Path]) -> str:
    links = " &middot; ".join(f"<a href=\"{_href(sweep, path)}\">{escape(path.name)}</a>" for path in data_files)
    return f"<footer>Written by <code>atelier report</code>. Data: {links}</footer>"


def _sort_key(run: RunRecord, metric: str) -> tuple:
    value = getattr(run, metric)
    finite = value is not None and math.isfinite(value)
    return (STATUS_ORDER.get(run.status, 9), not finite, value if finite else 0.0, run.job_num or 0, run.name)


def _file_link(sweep: Sweep, run: RunRecord) -> str:
    if run.output_file is None:
        return "<td></td>"
    return f"<td><a href=\"{_href(sweep, run.output_file)}\">{escape(run.output_file.name)}</a></td>"


def _href(sweep: Sweep, path: Path) -> str:
    return escape(quote(path.relative_to(sweep.path).as_posix()))


def _columns_word(columns: Sequence[str]) -> str:
    kinds = {label.split(" ", 1)[0] for label in columns}
    return "saved epoch" if kinds == {"epoch"} else "sampling point"


def _num(value: object) -> str:
    return f"<td class=\"num\">{escape('' if value is None else str(value))}</td>"


def _loss(value: float | None) -> str | None:
    if value is None:
        return None
    return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"


def _fixed(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _megabytes(value: float | None) -> str | None:
    return None if value is None else f"{value:,.0f} MB"


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"
