"""Preemption, shared by both training loops (`train.loop.train` and `train.vae_trainer.run`).

SIGTERM (TPU maintenance events, spot/preemptible VM reclaim) or SIGINT (Ctrl-C) only sets a
flag; the loop checks it at every step boundary, saves a checkpoint of the step it is at and
stops (a second signal: see `Preemption`):

    with Preemption() as preempt:
        while step < steps:
            ...one step...
            if step % every == 0 or preempt.requested:
                ckpt.save(step, ...)
            if preempt.requested:
                break

Each process acts on its own signal (preemption notices reach every host of a slice together).
The main loop then returns normally; a loop whose caller must not mistake a half-finished result
for a finished one (the VAE's) raises `Preempted`, which exits the process with code 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """A second SIGTERM/SIGINT outside a save: stop at once, without a checkpoint of the current
    step (the committed ones are intact). Exits with 128 + the signal number, as a shell does."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class Preemption:
    """Context manager: SIGTERM or SIGINT (Ctrl-C) sets `requested`; the loop saves at its next
    step boundary (or, before the first step, stops with nothing new to save) and exits 0.

    A second signal while a checkpoint is being written (inside `saving()`) is logged and
    ignored: the save commits, then the process exits. A second signal anywhere else raises
    `Interrupted` (exit 128 + signal): stop now, the last committed checkpoint is kept. Once the
    loop has said its step is committed (`committed(step)`), a second signal ends the process at
    once (exit 128 + signal) with a line naming that step: nothing is left to save or unwind,
    and an exception raised there could land in a finalizer (an "Exception ignored" traceback
    that does not even stop the process). The previous handlers are restored on exit. Installs
    nothing outside the main thread (signals go to the main thread only).

    Args:
      what: what the loop saves, for the log lines ("a checkpoint", "a VAE checkpoint").
    """

    def __init__(self, what: str = "a checkpoint"):
        self.what = what
        self.requested = False
        self.signum: int | None = None
        self._saving = 0
        self._previous: dict[int, object] = {}
        self.committed_step: int | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and self.committed_step is not None:
            print(
                f"{name} again: stopped at once; the checkpoint for step {self.committed_step} "
                "is committed (resume with the same command).",
                file=sys.stderr,
            )
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(128 + signum)
        if not self.requested:
            self.requested, self.signum = True, signum
            log.warning(
                "%s: saving %s at the next step boundary, then exiting (send it again to stop "
                "at once without saving)",
                name,
                self.what,
            )
            return
        if self._saving:
            log.warning(
                "%s again: %s is being written and is committed before exiting (SIGKILL would "
                "abort it; the previous checkpoint stays intact)",
                name,
                self.what,
            )
            return
        print(
            f"{name} again: stopped at once without saving; the last committed checkpoint is "
            "kept (resume with the same command).",
            file=sys.stderr,
        )
        raise Interrupted(signum)

    def committed(self, step: int) -> None:
        """Records that the requested checkpoint (of `step`) is committed and the loop is only
        exiting now: a second signal from here on stops the process at once, saying so."""
        self.committed_step = step

    @contextlib.contextmanager
    def saving(self):
        """Marks a checkpoint write: signals inside are deferred to its end."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def __enter__(self) -> Preemption:
        for signum in SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to install
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class Preempted(SystemExit):
    """Raised once the checkpoint of the current step is durable, after SIGTERM.

    A `SystemExit` with code 0, so the command exits cleanly (as `train` does) and the next run
    resumes from the checkpoint; catch it to do otherwise.

    Attributes:
      step: the step that was saved.
    """

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step
