"""`atelier report --live`: rewrite a sweep's report while it runs, until every job is over.

The page carries a meta refresh while live, so a browser left open on report.html follows
the sweep; the last report, written once the sweep is over (or on Ctrl-C), has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from atelier.report.collect import NotASweepError, Sweep, collect_sweep
from atelier.report.write import write_sweep_report

# A job in one of these will not change any more.
FINAL_STATUSES = ("completed", "pruned", "failed", "interrupted", "not started")


def sweep_is_over(sweep: Sweep) -> bool:
    """The sweeper recorded its end in sweep.json; without a plan, every job found is over."""
    if sweep.state is not None:
        return sweep.state != "running"
    return all(run.status in FINAL_STATUSES for run in sweep.runs)


def watch(
    sweep_dir: Path,
    interval: float,
    say: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    on_first_report: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write the report every `interval` seconds until the sweep is over or Ctrl-C; the last report's path.

    A sweep folder that does not hold a job yet is waited for (the sweep may still be starting).
    """
    report, waiting_said = None, False
    try:
        while True:
            try:
                sweep = collect_sweep(sweep_dir)
            except NotASweepError as error:
                if not waiting_said:
                    say(f"waiting for the sweep to start ({error})")
                    waiting_said = True
                sleep(interval)
                continue
            over = sweep_is_over(sweep)
            first = report is None
            report = write_sweep_report(sweep, refresh_seconds=None if over else max(1, round(interval)))
            if first and on_first_report is not None:
                on_first_report(report)
            if over:
                say(f"sweep over: final report {report}")
                return report
            done = sum(run.status in FINAL_STATUSES for run in sweep.runs)
            say(f"{time.strftime('%H:%M:%S')} report updated: {done}/{len(sweep.runs)} jobs over ({report})")
            sleep(interval)
    except KeyboardInterrupt:
        # The page must stop reloading: write it once more, without the refresh.
        try:
            report = write_sweep_report(collect_sweep(sweep_dir))
            say(f"stopped watching; report {report}")
        except NotASweepError:
            say("stopped watching before the sweep started")
        return report
