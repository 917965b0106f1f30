"""A profiler trace of a few training steps, on process 0 only.

    profile = ProfileWindow(workdir / "profile", start_step=10, num_steps=3)
    for step in range(1, steps + 1):
        profile.on_step(step, pending=metrics)   # before running `step`
        metrics = train_step(...)
    profile.close(pending=metrics)

The trace (`plugins/profile/<run>/<host>.xplane.pb`) opens in TensorBoard's profile plugin or
XProf. Start after the first steps: step 1 includes compilation and would swamp the trace.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from etils import epath

log = logging.getLogger("tfx_jax")


class ProfileWindow:
    """Traces steps [start_step, start_step + num_steps) with `jax.profiler`.

    JAX dispatches asynchronously: when the loop reaches step K+n, the device may still be running
    step K+n-1. Pass that step's outputs as `pending` and they are waited for before the trace
    stops, so the window holds the device work of all n steps, not just their dispatch.

    A profiler that cannot start (another trace already running, say) logs a warning and the
    window is skipped: profiling must never stop a training run.

    Args:
      logdir: where `jax.profiler` writes (created if missing).
      start_step: the first traced step (the window starts when `on_step(start_step)` is called;
        a run resumed past it never traces). `num_steps <= 0` disables the window.
      num_steps: how many steps to trace.
      is_main_process: trace only when True; default `jax.process_index() == 0`.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        start_step: int,
        num_steps: int,
        is_main_process: bool | None = None,
    ):
        self.logdir = str(logdir)
        self.start_step = start_step
        self.num_steps = num_steps
        if is_main_process is None:
            is_main_process = jax.process_index() == 0
        self.enabled = is_main_process and num_steps > 0
        self.active = False

    def on_step(self, step: int, pending: Any = None) -> None:
        """Call at the top of every loop iteration, before step `step` runs.

        Args:
          step: the step about to run.
          pending: outputs of the previous step (any pytree of arrays); blocked on before the
            trace stops.
        """
        if not self.enabled:
            return
        if step == self.start_step and not self.active:
            try:
                epath.Path(self.logdir).mkdir(parents=True, exist_ok=True)  # may be gs://
                jax.profiler.start_trace(self.logdir)
            except RuntimeError as e:  # e.g. "Profile has already been started"
                log.warning("profiler did not start at step %d: %s", step, e)
                self.enabled = False
                return
            self.active = True
            log.info("profiling steps %d..%d into %s", step, step + self.num_steps - 1, self.logdir)
        elif step == self.start_step + self.num_steps and self.active:
            self._stop(pending)

    def close(self, pending: Any = None) -> None:
        """Stops a trace still running (a run that ended inside the window).

        Args:
          pending: outputs of the last step, blocked on before the trace stops.
        """
        if self.active:
            self._stop(pending)

    def _stop(self, pending: Any) -> None:
        if pending is not None:
            jax.block_until_ready(pending)
        jax.profiler.stop_trace()
        self.active = False
        self.enabled = False  # one window per run
        log.info("profile written to %s", self.logdir)
