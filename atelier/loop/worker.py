"""One process of a data-parallel run: `python -m atelier.loop.worker <run_dir>`.

Started by atelier.launch.data_parallel with the torch.distributed environment set.
It trains the run dir's resolved config.yaml (written by the job before it started
the processes), so every process trains exactly the recorded config.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import atelier.config
from atelier.config.typed import load_run_config
from atelier.errors import UserError, one_line
from atelier.runtime import phases
from atelier.runtime.distributed import process_rank
from atelier.runtime.signals import StopRequested
from atelier.utils.lean_imports import hide_peft_and_bitsandbytes_from_diffusers
from atelier.utils.quiet import quiet_third_party_warnings

log = logging.getLogger("atelier.loop.worker")

# Hydra's log file of the job (hydra.job.name is "train"): the main process appends to it.
JOB_LOG = "train.log"


def _setup_logging(run_dir: Path, rank: int) -> None:
    fmt = f"[%(asctime)s][%(name)s][%(levelname)s][rank {rank}] - %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / JOB_LOG))
    # The other processes train the same steps: their warnings and errors are enough.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, handlers=handlers)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m atelier.loop.worker <run_dir>", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    rank = process_rank()
    _setup_logging(run_dir, rank)
    quiet_third_party_warnings()
    atelier.config.register()
    with phases.timing_imports():
        hide_peft_and_bitsandbytes_from_diffusers()
        from atelier.loop.run import run_training  # torch and friends: after logging is set up

    try:
        run_training(load_run_config(run_dir), run_dir)
    except StopRequested as stop:
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: run_training has said so
        return 128 + signal.SIGINT
    except UserError as err:  # the message says it all: no traceback
        log.error("process %d: %s", rank, one_line(err))
        return 1
    except Exception:
        log.exception("training failed in process %d", rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
