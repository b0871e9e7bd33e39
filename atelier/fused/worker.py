"""One fused group of a sweep: `python -m atelier.fused.worker <run_dir> <run_dir> ...`.

Started by the fused launcher (atelier.launch.fused), which has written each job's run
dir as a run alone would have it (.hydra/, config.yaml, command.sh). Each lane trains its
run dir's config.yaml; each run dir gets its own train.log and summary.json.

Exit code: 0 when the group ran (each lane's own outcome is in its summary.json, a
failed lane included), 128+signal when stopped by a signal (states saved), 1 when the
group could not run at all (every lane without a summary says why).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import atelier.config
from atelier.fused.lane_logs import FORMAT, lane_log_files
from atelier.outputs.lock import DirLockedError, lock_dir
from atelier.outputs.summary import read_summary, write_summary
from atelier.runtime import phases
from atelier.runtime.signals import SECOND_CTRL_C, StopRequested
from atelier.config.typed import load_run_config
from atelier.utils.lean_imports import hide_peft_and_bitsandbytes_from_diffusers
from atelier.utils.quiet import quiet_third_party_warnings

log = logging.getLogger("atelier.fused.worker")


def main(argv: list[str] | None = None) -> int:
    run_dirs = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not run_dirs:
        print("usage: python -m atelier.fused.worker <run_dir> [<run_dir> ...]", file=sys.stderr)
        return 2
    started = time.time()
    try:  # one writer per run dir, as a run alone holds its own (atelier/outputs/lock.py)
        for run_dir in run_dirs:
            lock_dir(run_dir)
    except DirLockedError as err:
        print(f"Error: {err}", file=sys.stderr, flush=True)
        return 1
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=[logging.StreamHandler()])
    quiet_third_party_warnings()
    atelier.config.register()
    with phases.timing_imports():
        hide_peft_and_bitsandbytes_from_diffusers()
    with lane_log_files(run_dirs):
        log.info("training %d runs in one fused pass: %s", len(run_dirs), ", ".join(d.name for d in run_dirs))
        try:
            with phases.timing_imports():
                from atelier.fused.trainer import train_fused  # torch and friends: after logging is set up

            train_fused([load_run_config(d) for d in run_dirs], run_dirs)
        except StopRequested as stop:  # lanes stopped in setup (latent caching) have no summary yet
            log.warning("%s", stop)
            _summarise_lanes_without_one(run_dirs, "interrupted", str(stop), started)
            return stop.exit_code
        except KeyboardInterrupt:  # a second Ctrl-C
            _summarise_lanes_without_one(run_dirs, "interrupted", SECOND_CTRL_C, started)
            return 128 + signal.SIGINT
        except Exception as err:
            log.exception("the fused group failed")
            from atelier.loop.run import failure_reason

            _summarise_lanes_without_one(run_dirs, "failed", f"the fused group failed: {failure_reason(err)}", started)
            return 1
    return 0


def _summarise_lanes_without_one(run_dirs: list[Path], status: str, reason: str, started: float) -> None:
    """summary.json for each lane this process has not summarised (the group ended before it could)."""
    from atelier.loop.run import summarise

    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        if summary is None or summary.get("finished_at", 0) < started:  # none from this process
            write_summary(run_dir, summarise(status, None, started, reason))


if __name__ == "__main__":
    sys.exit(main())
