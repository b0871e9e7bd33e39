"""`write_report`: every report file, written atomically into the sweep folder."""

from __future__ import annotations

from pathlib import Path

from atelier.report.collect import Sweep, collect_sweep
from atelier.report.grids import write_prompt_grids
from atelier.report.page import render_report
from atelier.report.plots import SEARCH_PLOT, plot_loss_curves, plot_run_losses, plot_search_history
from atelier.report.search import read_search
from atelier.report.table import write_runs_csv, write_runs_json
from atelier.utils.atomic import write_text

REPORT = "report.html"
RUNS_CSV = "runs.csv"
RUNS_JSON = "runs.json"
LOSS_PLOT = "loss_curves.png"


def write_report(sweep_dir: str | Path, refresh_seconds: int | None = None) -> Path:
    """Write runs.csv, runs.json, loss_curves.png, <job>/report_loss.png, samples_prompt<NN>.png,
    search_history.png (a sweep with a study) and report.html into `sweep_dir`; returns the path
    of report.html. Safe to run while the sweep runs; `refresh_seconds` makes the page reload
    itself (live reports)."""
    return write_sweep_report(collect_sweep(sweep_dir), refresh_seconds)


def write_sweep_report(sweep: Sweep, refresh_seconds: int | None = None) -> Path:
    out = sweep.path
    search = read_search(out)
    data_files = [write_runs_csv(sweep, out / RUNS_CSV, search), write_runs_json(sweep, out / RUNS_JSON, search)]
    search_plot = plot_search_history(search, out / SEARCH_PLOT) if search else None
    loss_plot = plot_loss_curves(sweep.runs, out / LOSS_PLOT)
    run_plots = plot_run_losses(sweep.runs)
    grids = write_prompt_grids(sweep.runs, out)
    report = out / REPORT
    write_text(report, render_report(sweep, loss_plot, grids, data_files, run_plots, refresh_seconds,
                                      search, search_plot))
    return report
