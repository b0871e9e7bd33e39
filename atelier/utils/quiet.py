"""Silence known-harmless third-party warnings so logs show what the run does."""

from __future__ import annotations

import logging

# logger name -> why its warnings are noise here
HARMLESS = {
    # bitsandbytes looks for optional 4-bit CPU kernels we never use.
    "bitsandbytes.backends.cpu.ops": "optional 4-bit kernels",
    # transformers falls back to PIL image processors (no CPU torchvision wheel); we use none.
    "transformers.utils.import_utils": "torchvision fallback",
}


def quiet_third_party_warnings() -> None:
    for name in HARMLESS:
        logging.getLogger(name).setLevel(logging.ERROR)
