"""Train a LoRA: `python train.py [overrides]`, or sweep: `python train.py -m a=1,2 b=x,y`."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import atelier.config
from atelier.errors import user_errors_as_one_line
from atelier.runtime import phases
from atelier.runtime.signals import StopRequested, stop_on_signals
from atelier.utils.lean_imports import hide_peft_and_bitsandbytes_from_diffusers
from atelier.utils.quiet import quiet_third_party_warnings

atelier.config.register()
quiet_third_party_warnings()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # From here on Ctrl-C and SIGTERM only set a flag (atelier.runtime.signals): the job
    # stops at its next check, its state saved and its summary.json written.
    with stop_on_signals():
        return _job(cfg)


def _job(cfg: DictConfig) -> dict:
    # Imported here, not above, so --help and config errors stay fast; diffusers is told
    # first that peft and bitsandbytes are missing (see atelier.utils.lean_imports).
    with phases.timing_imports():
        hide_peft_and_bitsandbytes_from_diffusers()
        from atelier.runtime.reuse import freeze_startup_objects
        from atelier.launch.job import run_job

    freeze_startup_objects()

    hydra_cfg = HydraConfig.get()
    user_config_dirs = [s.path for s in hydra_cfg.runtime.config_sources if s.provider == "command-line"]
    job = lambda: run_job(  # noqa: E731
        cfg,
        Path(hydra_cfg.runtime.output_dir),
        list(hydra_cfg.overrides.task),
        hydra_cfg.job.config_name,
        user_config_dirs[0] if user_config_dirs else None,
    )
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return job()  # the sweeper reports each failed job on one line and goes on
    # A single run: an error the user can fix is one line, not Hydra's traceback.
    with user_errors_as_one_line():
        return job()


if __name__ == "__main__":
    try:
        main()
    except StopRequested as stop:  # already logged; the state is saved
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before a job started; already logged
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        # The process ends here: spare it the garbage collector's passes over the ~600k objects
        # that importing torch, transformers and diffusers made (~1 s of each exit on 2 cores).
        # atexit handlers still run (logging flushes its files, child processes are joined).
        gc.freeze()
