"""`write_report`: every report file, written atomically into the sweep folder."""

from __future__ import annotations

from pathlib import Path

from atelier.report.collect import Sweep, collect_sweep
from atelier.report.grids import write_prompt_grids
from atelier.report.page import render_report
from atelier.report.plots import plot_loss_curves
from atelier.report.table import write_runs_csv, write_runs_json
from atelier.utils.atomic import write_text

REPORT = "report.html"
RUNS_CSV = "runs.csv"
RUNS_JSON = "runs.json"
LOSS_PLOT = "loss_curves.png"


def write_report(sweep_dir: str | Path) -> Path:
    """Write runs.csv, runs.json, loss_curves.png, samples_prompt<NN>.png and report.html
    into `sweep_dir`; returns the path of report.html. Safe to run while the sweep runs."""
    return write_sweep_report(collect_sweep(sweep_dir))


def write_sweep_report(sweep: Sweep) -> Path:
    out = sweep.path
    data_files = [write_runs_csv(sweep, out / RUNS_CSV), write_runs_json(sweep, out / RUNS_JSON)]
    loss_plot = plot_loss_curves(sweep.runs, out / LOSS_PLOT)
    grids = write_prompt_grids(sweep.runs, out)
    report = out / REPORT
    write_text(report, render_report(sweep, loss_plot, grids, data_files))
    return report
