"""`atelier report <sweep_dir>`: write the comparison report of a sweep."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path

from atelier.report.collect import NotASweepError

EPILOG = """\
example:
  python train.py -m optimizer=adamw,prodigy network.dim=4,8 hydra.sweep.dir=multirun/dims
  atelier report multirun/dims
  -> multirun/dims/report.html (open it in any browser; it works offline), plus runs.csv,
     runs.json, loss_curves.png and samples_prompt<NN>.png beside it

Run it again at any time: on a sweep still running, unfinished jobs show as running or pending.
To follow a long sweep in a browser, keep it running beside the sweep:
  atelier report --live multirun/dims     # rewrites the report every 30 s; the page reloads itself
It stops when every job is over (or on Ctrl-C).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="compare the jobs of a sweep: runs table, loss curves, sample grids",
        description="Write report.html (runs table, loss curves, sample grids per prompt) and "
        "runs.csv/runs.json into a Hydra multirun folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir), holding one folder per job")
    parser.add_argument(
        "--open-browser",
        choices=["yes", "no"],
        default="no",
        help="open report.html in the default web browser afterwards (default: no)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="keep rewriting the report while the sweep runs (the page reloads itself) until every job "
        "is over or Ctrl-C",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="with --live: seconds between two reports (default: 30)",
    )
    parser.set_defaults(func=run)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from atelier.report.write import write_report  # matplotlib: only loaded when a report is made

    if args.live:
        from atelier.report.live import watch

        def open_browser(report: Path) -> None:
            if args.open_browser == "yes":
                webbrowser.open(report.resolve().as_uri())

        watch(args.sweep_dir, args.interval, on_first_report=open_browser)
        return 0
    try:
        report = write_report(args.sweep_dir)
    except NotASweepError as error:
        print(f"atelier report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    if args.open_browser == "yes":
        webbrowser.open(report.resolve().as_uri())
    return 0
