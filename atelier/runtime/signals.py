"""Stop requests from the outside: Ctrl-C (SIGINT), SIGTERM (a launcher stopping the
job, SLURM's kill), SIGUSR1/SIGUSR2 (SLURM's warning before a timeout or preemption).

The handler only sets a flag; the training loop checks it between optimizer steps,
saves its state there and raises StopRequested, so the run dir stays consistent. Long
work outside the steps checks it between its units (`raise_if_stop_asked`: latents
between batches; sampling between images), so a stop takes seconds, not minutes.
A second Ctrl-C does not wait: it raises KeyboardInterrupt at once (the steps since the
last saved state are lost), the way out of a step that hangs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "no signal"

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            log.warning("received %s: saving the training state at the end of this step%s",
                        signal.Signals(signum).name, " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else "")  # fmt: skip
            self.signal = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt(SECOND_CTRL_C)

    def pass_on(self) -> None:
        """Once the state is saved, run the handler that was there before ours.

        submitit's SIGUSR2 handler, for one, requeues the job and exits.
        """
        handler = self.previous.get(self.signal)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signal, None)


class StopRequested(BaseException):
    """The job was asked to stop by a signal; its state is saved and it can be continued.

    A BaseException, like KeyboardInterrupt: nothing that isolates a failing job
    (Hydra's job runner, a sweep) may swallow it and carry on with the next job.
    """

    def __init__(self, flag: StopFlag, message: str):
        super().__init__(message)
        self.flag = flag

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + (self.flag.signal or 0)


SECOND_CTRL_C = "a second Ctrl-C: stopped at once, without saving the steps since the last training state"

# The flag of the outermost stop_on_signals block open in this process (main thread).
_open: StopFlag | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Within the block, STOP_SIGNALS set the returned flag instead of killing the process.

    Handlers installed before (e.g. submitit's SIGUSR2 requeue handler) are kept
    for `StopFlag.pass_on`, called once the state is saved. A block opened inside
    another one shares its flag, so a signal that came during setup (a job's start,
    latent caching) is still seen by the training loop.
    """
    global _open
    if _open is not None:
        yield _open
        return
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals can only be handled in the main thread
        return
    for sig in STOP_SIGNALS:
        flag.previous[sig] = signal.signal(sig, flag._handle)
    _open = flag
    try:
        yield flag
    finally:
        _open = None
        for sig, old in flag.previous.items():
            signal.signal(sig, old)


def stop_asked() -> StopFlag | None:
    """The open block's flag once a stop signal came; None before, or outside any block."""
    return _open if _open else None


def raise_if_stop_asked(doing: str) -> None:
    """For long work outside the training steps, between two of its units: stop now if asked.

    `doing` completes "stopped by SIGTERM while ...", e.g. "caching latents (40 of 900 done)".
    """
    flag = stop_asked()
    if flag:
        raise StopRequested(flag, f"stopped by {flag.name} while {doing}")
