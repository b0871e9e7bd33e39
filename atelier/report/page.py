"""report.html: one self-contained page (inline CSS, no scripts, relative image links).

Laid out to fit 1280 px: long names are shortened (full text on hover), reasons wrap, and
loss curves are small multiples (one chart per run) so 16 runs stay readable.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from urllib.parse import quote

from atelier.report.collect import RECENT_STEPS, RunRecord, Sweep
from atelier.report.grids import PromptGrid
from atelier.report.ranking import Ranking, metric_title, rank
from atelier.report.search import SearchReport
from atelier.report.search_page import SEARCH_CSS, search_section
from atelier.report.table import lora_name

# pruned: its search trial stopped it early (its run is over, but not comparable with the completed ones).
STATUS_ORDER = {"completed": 0, "pruned": 1, "running": 2, "interrupted": 3, "pending": 4, "not started": 5,
                "failed": 6}
# Longer names are cut in the middle in the table; the full name is in the title (hover).
SHORT_NAME = 30

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
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { padding:6px 7px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top;
  overflow-wrap:anywhere; }
th { overflow-wrap:normal; }
td.num, .badge, td .short { white-space:nowrap; }
.spread { color:var(--muted); font-size:12px; }
th { background:#f2f4f7; font-weight:600; position:sticky; top:0; }
th.sorted::after { content:" \\25B2"; font-size:10px; color:var(--muted); }
th.swept { color:#3e4784; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.reason td { color:var(--bad); font-size:13px; padding-top:0; overflow-wrap:anywhere; }
tr.reason .reason-label { font-weight:600; }
tr.failed:has(+ tr.reason) td { border-bottom:none; }
tbody tr:hover { background:#f9fafb; }
tr.failed { background:var(--bad-bg); box-shadow:inset 4px 0 var(--bad); }
tr.is-best { background:var(--best-bg); box-shadow:inset 4px 0 #f79009; font-weight:600; }
.badge { display:inline-block; padding:1px 9px; border-radius:999px; font-size:12px; font-weight:600; }
.badge.completed, .badge.complete { color:var(--ok); background:var(--ok-bg); }
.badge.failed { color:var(--bad); background:#fee4e2; }
.badge.running { color:var(--run); background:var(--run-bg); }
.badge.pruned { color:#6941c6; background:#f4f3ff; }
.badge.pending, .badge.waiting { color:var(--muted); background:#f2f4f7; }
.badge.interrupted { color:#b54708; background:#fef0c7; }
.badge.not.started { color:var(--muted); background:#f2f4f7; }
.multiples { display:grid; grid-template-columns:repeat(auto-fill, minmax(270px, 1fr)); gap:12px; }
.multiples figure { margin:0; }
.multiples figcaption { font-size:12px; margin-top:2px; overflow-wrap:anywhere; }
details.epochs { margin:6px 0; }
details.epochs summary { cursor:pointer; }
details.epochs table { width:auto; min-width:50%; margin:6px 0 10px; }
tr.best-epoch { background:var(--best-bg); font-weight:600; }
.live { color:var(--run); font-weight:600; }
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
    run_plots: dict[str, Path] | None = None,
    refresh_seconds: int | None = None,
    search: SearchReport | None = None,
    search_plot: Path | None = None,
) -> str:
    """The page's HTML; every link is relative to the sweep folder, where it is written.

    `refresh_seconds`: the page reloads itself this often (`atelier report --live`).
    `search`, `search_plot`: the sweep's study and its history plot (a Search section).
    """
    ranking = rank(sweep)
    parts = [
        _header(sweep, refresh_seconds),
        _best_section(ranking),
        search_section(search, _href(sweep, search_plot) if search_plot else None) if search else "",
        _runs_section(sweep, ranking),
        _epochs_section(sweep, ranking),
        _loss_section(sweep, loss_plot, run_plots or {}),
        _samples_section(sweep, grids),
        _footer(sweep, data_files),
    ]
    title = f"Sweep report: {sweep.path.name}"
    refresh = f"<meta http-equiv=\"refresh\" content=\"{int(refresh_seconds)}\">\n" if refresh_seconds else ""
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"{refresh}<title>{escape(title)}</title>\n<style>{CSS}{SEARCH_CSS if search else ''}</style>\n"
        "</head>\n<body>\n<main>\n"
        + "\n".join(part for part in parts if part)
        + "\n</main>\n</body>\n</html>\n"
    )


def _header(sweep: Sweep, refresh_seconds: int | None = None) -> str:
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
        *([f"<p class=\"meta live\">Live: this page reloads every {int(refresh_seconds)} s while "
           "<code>atelier report --live</code> runs.</p>"] if refresh_seconds else []),
        f"<p class=\"meta\">Swept: {swept or 'nothing (a single configuration)'}"
        + (f" &middot; same in every job: {fixed}" if fixed else "")
        + "</p>",
        "</header>",
    ]
    return "\n".join(lines)


def _best_section(ranking: Ranking) -> str:
    note = f"<p class=\"note\">{escape(ranking.note)}</p>"
    best = ranking.best
    if best is None:
        return f"<section class=\"best\"><p>{escape(ranking.note)}</p></section>"
    epoch = best.best_epoch
    epoch_text = ""
    if epoch is not None and epoch.checkpoint is not None:
        epoch_text = (f"; its best saved epoch is {epoch.epoch}: "
                      f"<a href=\"{_href_path(best, epoch.checkpoint)}\">{escape(epoch.checkpoint.name)}</a>")
    return (
        "<section class=\"best\"><p><span class=\"star\">&#9733;</span> Best run by "
        f"{escape(metric_title(ranking.metric))}: <strong>{escape(best.label)}</strong> &mdash; "
        f"{_loss(getattr(best, ranking.metric))} (job <code>{escape(best.name)}</code>){epoch_text}</p>"
        f"{note}</section>"
    )


Column = tuple[str, str, Callable[[RunRecord], str]]  # header, CSS class, <td> of a run


def _table_columns(sweep: Sweep, ranking: Ranking) -> list[Column]:
    metric, best = ranking.metric, ranking.best

    def sorted_if(name: str) -> str:
        return "num sorted" if metric == name else "num"

    numbers = {run.name: i for i, run in enumerate(sweep.runs, 1)}

    def job_cell(run: RunRecord) -> str:
        star = "<span class=\"star\">&#9733;</span>" if run is best else ""
        if sweep.swept_keys:
            # The swept columns say what the job is: its folder name only on hover, to keep the table narrow.
            return f"<td class=\"num\">{star}<span title=\"{escape(run.name)}\">#{numbers[run.name]}</span></td>"
        return f"<td>{star} {_short(run.name, 'code')}</td>"

    def recent_cell(run: RunRecord) -> str:
        if run.recent_loss is None:
            return _num(None)
        spread = f" <span class=\"spread\">&plusmn;{run.recent_std:.3f}</span>" if run.recent_std is not None else ""
        return f"<td class=\"num\">{escape(_loss(run.recent_loss) or '')}{spread}</td>"

    columns: list[Column] = [("job", "", job_cell)]
    columns += [(key, "swept", lambda run, key=key: f"<td>{_short(run.swept[key])}</td>") for key in sweep.swept_keys]
    columns += [
        ("status", "", lambda run: f"<td><span class=\"badge {escape(run.status)}\">{escape(run.status)}</span></td>"),
        ("steps", "num", lambda run: _num(run.steps)),
        (f"train loss (last {RECENT_STEPS}) &plusmn; sd", sorted_if("recent_loss"), recent_cell),
        ("final loss", "num", lambda run: _num(_loss(run.final_loss))),
    ]
    if any(run.val_loss_last is not None for run in sweep.runs):
        columns += [
            ("val loss", sorted_if("val_loss_last"), lambda run: _num(_loss(run.val_loss_last))),
        ]
    columns += [
        ("wall time", "num", lambda run: _num(_duration(run.wall_seconds))),
        ("s/step", "num", lambda run: _num(_fixed(run.seconds_per_step, 3))),
        ("peak RAM", "num", lambda run: _num(_megabytes(run.peak_ram_mb))),
    ]
    if any(run.peak_vram_mb is not None for run in sweep.runs):
        columns += [("peak VRAM", "num", lambda run: _num(_megabytes(run.peak_vram_mb)))]
    columns += [
        ("best epoch", "num", lambda run: _num(run.best_epoch.epoch if run.best_epoch else None)),
        ("LoRA file", "", lambda run: _file_link(sweep, run)),
    ]
    return columns


def _runs_section(sweep: Sweep, ranking: Ranking) -> str:
    metric, best = ranking.metric, ranking.best
    columns = _table_columns(sweep, ranking)
    # Titles are trusted text (with entities); swept keys come from the user and are escaped.
    head = "".join(
        f"<th class=\"{css}\">{_breakable(title) if css == 'swept' else title}</th>" for title, css, _ in columns
    )
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
        f"<p class=\"note\">Sorted by {escape(metric_title(metric))}, lowest first; unfinished and failed runs "
        "last. &plusmn; is the standard deviation of those step losses. Swept settings are in blue; the same rows "
        "are in <a href=\"runs.csv\">runs.csv</a> and <a href=\"runs.json\">runs.json</a>.</p>\n"
        f"<table id=\"runs\"><thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>\n</section>"
    )


def _epochs_section(sweep: Sweep, ranking: Ranking) -> str:
    """Per run: the loss at each epoch and the file saved then, the best saved epoch starred."""
    runs = [run for run in sorted(sweep.runs, key=lambda run: _sort_key(run, ranking.metric)) if run.epoch_records]
    if not runs:
        return ""
    blocks = []
    for run in runs:
        best = run.best_epoch
        has_val = any(e.val_loss is not None for e in run.epoch_records)
        head = "<th class=\"num\">epoch</th><th class=\"num\">step</th><th class=\"num\">train loss</th>"
        head += "<th class=\"num\">val loss</th>" if has_val else ""
        head += "<th>LoRA file</th>"
        rows = []
        for e in run.epoch_records:
            star = "<span class=\"star\">&#9733;</span> " if e is best else ""
            cells = (f"<td class=\"num\">{star}{e.epoch}</td>{_num(e.step)}{_num(_loss(e.train_loss))}"
                     + (_num(_loss(e.val_loss)) if has_val else ""))
            link = f"<a href=\"{_href(sweep, e.checkpoint)}\">{escape(e.checkpoint.name)}</a>" if e.checkpoint else ""
            rows.append(f"<tr class=\"{'best-epoch' if e is best else ''}\">{cells}<td>{link}</td></tr>")
        by = "validation loss" if has_val else "training loss of the epoch"
        summary = f"{escape(run.label)} <span class=\"spread\">({len(run.saved_epochs)} saved"
        summary += f"; best: epoch {best.epoch}, by {by})</span>" if best else ")</span>"
        is_open = " open" if run is ranking.best or len(runs) == 1 else ""
        blocks.append(
            f"<details class=\"epochs\" data-job=\"{escape(run.name)}\"{is_open}><summary>{summary}</summary>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
        )
    return (
        "<section>\n<h2>Epochs</h2>\n<p class=\"note\">Loss per epoch of each run and the LoRA file saved at its "
        "end (output.save_every_n_epochs). &#9733; marks the best saved epoch: lowest validation loss when logged, "
        "else lowest training loss; the sample grids frame the same epoch.</p>\n" + "\n".join(blocks) + "\n</section>"
    )


def _loss_section(sweep: Sweep, loss_plot: Path, run_plots: dict[str, Path]) -> str:
    figures = []
    for run in sweep.runs:
        if run.name in run_plots:
            figures.append(
                f"<figure data-job=\"{escape(run.name)}\"><img src=\"{_href(sweep, run_plots[run.name])}\" "
                f"alt=\"loss of {escape(run.label)}\"><figcaption>{escape(run.label)}"
                + ("" if run.status == "completed" else f" ({escape(run.status)})")
                + "</figcaption></figure>"
            )
    multiples = (
        "<p class=\"note\">One chart per run, all on the same axes: training loss (blue, moving average), "
        "validation loss (orange, dashed), best saved epoch (dotted line).</p>\n"
        f"<div class=\"multiples\">{''.join(figures)}</div>\n" if figures else ""
    )
    return (
        "<section>\n<h2>Loss curves</h2>\n" + multiples
        + f"<details><summary>All runs on one chart</summary><figure><img src=\"{_href(sweep, loss_plot)}\" "
        "alt=\"training loss of every run by step\">"
        "<figcaption>Training loss per step; each line is a run, named by its swept settings.</figcaption>"
        "</figure></details>\n</section>"
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
        planned = lora_name(run) if run.status in ("pending", "running") else None  # not written yet
        return f"<td class=\"spread\">{_short(planned)}</td>" if planned else "<td></td>"
    name = run.output_file.name
    # Without the extension (every one is .safetensors): the room goes to the swept values.
    shown = _shorten(run.output_file.stem)
    return f"<td><a href=\"{_href(sweep, run.output_file)}\" title=\"{escape(name)}\">{escape(shown)}</a></td>"


def _breakable(key: str) -> str:
    """A dotted key that may wrap after each dot (network.<wbr>dim), never inside a word."""
    return "<wbr>".join(escape(part) + "." for part in key.split(".")[:-1]) + (
        "<wbr>" if "." in key else "") + escape(key.split(".")[-1])


def _shorten(text: str, limit: int = SHORT_NAME) -> str:
    """Cut in the middle: both ends of a name tell runs apart (prefix and the swept values, extension)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep - keep // 2] + "\u2026" + text[len(text) - keep // 2 :]


def _short(text: str, tag: str = "span") -> str:
    """`text` shortened, the full text in the hover title when it was cut."""
    short = _shorten(text)
    title = f" title=\"{escape(text)}\"" if short != text else ""
    return f"<{tag} class=\"short\"{title}>{escape(short)}</{tag}>"


def _href_path(run: RunRecord, path: Path) -> str:
    # The best section links into a job folder; the page sits in the sweep folder above it.
    return escape(quote(f"{run.name}/{path.relative_to(run.path).as_posix()}"))


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
