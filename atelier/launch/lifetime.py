"""Child processes that end when their launcher dies.

A launcher (local GPUs, fused groups, data-parallel ranks) starts its jobs in their own
session so that a terminal's Ctrl-C reaches the launcher only. Without more, a launcher
killed with SIGKILL would leave them training, unseen, while a resume starts a second
writer on the same run dirs. Linux's PR_SET_PDEATHSIG sends each child SIGTERM when its
parent dies; SIGTERM makes a training job save its state and stop, as a stop from the
launcher does. Elsewhere (no prctl) this is a no-op and the launcher's own stop path is
the only one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child gets SIGTERM when this process dies.
    None where the OS has no such call."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
