"""The loop both trainers run: `train.loop.train` (the transformer) and `train.vae_trainer.run`.

A trainer brings its step, its batches, what a checkpoint of it holds and its log and eval hooks
(a `Job`); the skeleton owns what every run must get right, the same way for both:

  resume      `resume_step`: the run's latest committed checkpoint, if it was made with the same
              settings. If not (the config-mismatch rule): refuse, in one line naming the
              differing keys and the two fixes; or, with checkpoint.on_config_mismatch=restart,
              move the old checkpoints to checkpoints.stale/ and start fresh. Never silently.
  the loop    `run`: batch → step → progress bar → log every N steps → checkpoint every N, at the
              last step and on SIGTERM/SIGINT (`train/preemption.py`) → evaluators after the save
  exits       `checkpoints` / `closing`: every exit waits for the pending async saves (signals
              deferred meanwhile); a failed async save stops the run at the next step; a failure
              of the input pipeline first commits the steps already trained
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
from etils import epath
from tqdm.auto import tqdm

from tfx_jax.checkpoint import Checkpointer, latest_checkpoint, set_aside
from tfx_jax.config import CheckpointConfig, ConfigError
from tfx_jax.data.sources import RecordError
from tfx_jax.observability.metric_writers import MetricWriter
from tfx_jax.train.preemption import Preemption

log = logging.getLogger("tfx_jax")

STALE_DIR = "checkpoints.stale"  # where checkpoint.on_config_mismatch=restart moves old ones


class InputPipelineError(RuntimeError):
    """The input pipeline failed mid-run (e.g. a Grain worker process was killed); the steps
    trained so far were saved first where one process could do it alone."""


# ----------------------------------------------------------------------------- resume


def resume_step(
    ckpt_dir: epath.Path,
    differences: Callable[[dict[str, Any], int], list[str]],
    on_mismatch: str,
    *,
    elsewhere: str,
    say: Callable[[str], None],
) -> int | None:
    """The latest committed step in `ckpt_dir` if the run may resume from it, else None (fresh).

    The config-mismatch rule, the same for both trainers: a checkpoint whose settings differ
    from the run's is never resumed and never dropped silently. With `on_mismatch="refuse"`
    (the default) the run stops before anything compiles, naming the keys and the two fixes;
    with "restart" the checkpoints are moved to `checkpoints.stale/` beside them (replacing an
    older set) and the run starts fresh, saying so.

    Args:
      ckpt_dir: the run's checkpoint directory (created if missing).
      differences: (saved meta, its step) -> ["key: saved -> current", ...], what makes the
        checkpoint another run (empty: resume).
      on_mismatch: checkpoint.on_config_mismatch, "refuse" or "restart".
      elsewhere: the other fix, for the message ("another --workdir").
      say: reports the move aside.

    Raises:
      ConfigError: a mismatch with on_mismatch="refuse".
    """
    step, meta = latest_checkpoint(ckpt_dir, read_meta=True)
    if step is None:
        return None
    diffs = differences(meta, step)
    if not diffs:
        return step
    stale = ckpt_dir.parent / STALE_DIR
    found = f"checkpoint {ckpt_dir} step {step} was made with other settings ({'; '.join(diffs)})"
    if on_mismatch != "restart":
        raise ConfigError(
            f"{found}: resuming it would change the run. Use {elsewhere}, or --set "
            f"checkpoint.on_config_mismatch=restart to move these checkpoints to {stale} and "
            "start fresh."
        )
    say(f"{found}; checkpoint.on_config_mismatch=restart: moved to {stale}, starting fresh")
    set_aside(ckpt_dir, stale)
    return None


# ----------------------------------------------------------------------------- exits


@contextlib.contextmanager
def closing(closers: list[Callable[[], None]], preempt: Preemption):
    """Calls every closer on the way out, in order, even when the body raised. Closing waits
    for pending checkpoint writes, so signals are deferred meanwhile; when the body already
    failed, a closer's own error (e.g. the same full disk) is logged, not raised over it."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with preempt.saving():
            for close in closers:
                try:
                    close()
                except Exception as e:
                    if not failed:
                        raise
                    log.info("while stopping: %s: %s", type(e).__name__, e)


@contextlib.contextmanager
def checkpoints(
    ckpt_dir: epath.Path, cfg: CheckpointConfig, preempt: Preemption
) -> Iterator[Checkpointer]:
    """The run's `Checkpointer` (keep, keep_every and async as checkpoint.* say); every exit
    from the block waits until its pending saves are committed."""
    ckpt = Checkpointer(ckpt_dir, cfg.keep, cfg.keep_every, cfg.async_save)
    with closing([ckpt.close], preempt):
        yield ckpt


def stopped_before_start(preempt: Preemption, ckpt_dir: epath.Path, phase: str) -> None:
    """Logs that a signal during `phase` stopped the run before its first step."""
    step, _ = latest_checkpoint(ckpt_dir)
    where = f"checkpoint {step} is the latest" if step is not None else "no checkpoint yet"
    log.warning(
        "%s during %s: stopped before the first step, nothing new to save (%s)",
        preempt.signal_name,
        phase,
        where,
    )


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Job:
    """What a trainer brings to `run`: its batches, step, checkpoint items and hooks.

    The hooks close over the trainer's own state; `train_step` advances it. Metrics stay on the
    devices until `log` reads them, so steps between log and save steps queue without a sync.
    """

    name: str  # the progress bar's label
    steps: int  # train up to this step
    log_every: int
    checkpoint_every: int  # also saved at the last step and on SIGTERM/SIGINT
    batches: Iterator[Any]
    train_step: Callable[[int, Any], Any]  # (step being made, batch) -> its metrics (on device)
    checkpoint: Callable[[int], tuple[Any, Any, dict]]  # step -> (state, data iterator, meta)
    log: Callable[[int, Any], dict[str, float]]  # log steps: (step, metrics) -> scalars written
    line: Callable[[int, dict[str, float]], str]  # the printed line of a log step
    postfix: Callable[[dict[str, float]], str]  # the progress bar's postfix at a log step
    eval_every: int = 0  # 0: never
    evaluate: Callable[[int], dict[str, float]] | None = None  # after the step's checkpoint
    after_step: Callable[[int], None] | None = None  # after the step's checkpoint and eval
    say: Callable[[str], None] = print  # the log lines, on process 0
    data_hint: str = ""  # ends the InputPipelineError message


@dataclasses.dataclass
class Outcome:
    """How `run` ended: the last step trained, the logged scalars (eval merged into the record
    before it), and whether a signal stopped it (its step then committed)."""

    step: int
    history: list[dict[str, float]]
    preempted: bool


def run(
    job: Job,
    ckpt: Checkpointer,
    writer: MetricWriter,
    preempt: Preemption,
    start: int,
    closers: tuple[Callable[[], None], ...] = (),
) -> Outcome:
    """Trains `job` from step `start` to `job.steps`.

    Each step: the next batch (a failure commits the steps done first, then raises
    `InputPipelineError`, or the `RecordError` naming a bad record), `train_step`, the progress
    bar, `Checkpointer.check` (a failed async save stops the run here, naming the path); every
    `log_every` steps, at the last and on a signal: `log` → the writer, the history, one line;
    every `checkpoint_every` steps, at the last and on a signal: a save (signals deferred); on
    a signal: wait for the save to commit, log it and return; every `eval_every` steps and at
    the last: `evaluate` (after the save: an evaluator's failure never costs the checkpoint).
    `closers` (e.g. a profiler's) run on every exit, after the progress bar's.
    """
    is_main = jax.process_index() == 0
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=job.steps, initial=start, desc=job.name, disable=not is_main, dynamic_ncols=True
    )
    step = start
    with closing([bar.close, *closers], preempt):
        if preempt.requested:  # a signal while the trainer set up its data and evaluators
            stopped_before_start(preempt, ckpt.directory, "start-up")
            return Outcome(step, history, preempted=True)
        while step < job.steps:
            step += 1
            try:
                batch = next(job.batches)
            except Exception as e:  # the steps done so far are saved before the run stops
                saved = _save_before_data_failure(job, ckpt, step - 1)
                if isinstance(e, RecordError):  # names the record (data.on_error=raise)
                    log.warning("input pipeline stopped the run: %s", saved)
                    raise
                raise InputPipelineError(
                    f"the input pipeline failed before step {step}: {e} — {saved}{job.data_hint}"
                ) from e
            metrics = job.train_step(step, batch)
            bar.update(1)
            last = step == job.steps
            ckpt.check()  # a failed async save stops the run here, naming the path
            if step % job.log_every == 0 or last or preempt.requested:
                scalars = job.log(step, metrics)
                writer.write_scalars(step, scalars)
                history.append({"step": step, **scalars})
                bar.set_postfix_str(job.postfix(scalars))
                if is_main:
                    with tqdm.external_write_mode():
                        job.say(job.line(step, scalars))
            # Re-read the flag: a signal during `log` (an eval) still saves this step.
            if step % job.checkpoint_every == 0 or last or preempt.requested:
                with preempt.saving():
                    ckpt.save(step, *job.checkpoint(step))
            if preempt.requested:
                with preempt.saving():
                    ckpt.wait()  # the message below only once the step is committed
                    preempt.committed(step)
                log.warning(
                    "%s: checkpoint for step %d committed; exiting (resume with the same command)",
                    preempt.signal_name,
                    step,
                )
                return Outcome(step, history, preempted=True)
            if job.evaluate is not None and (step % job.eval_every == 0 or last):
                ev = job.evaluate(step)
                if history:
                    history[-1].update(ev)
            if job.after_step is not None:
                job.after_step(step)
    return Outcome(step, history, preempted=False)


def _save_before_data_failure(job: Job, ckpt: Checkpointer, step: int) -> str:
    """Commits `step` (the last one trained) when the data fails mid-run; says what was kept.

    Only a single-process run saves here: a checkpoint is collective, and the other processes
    are still in their train step, so one process saving alone would hang them all.
    """
    latest = ckpt.latest_step()
    kept = "no checkpoint yet" if latest is None else f"the last checkpoint is step {latest}"
    if jax.process_count() > 1:
        return f"{kept} (the processes of a multi-process run save only together)."
    if step <= 0 or step == latest:
        return f"nothing new to save ({kept}); resume with the same command."
    try:
        ckpt.save(step, *job.checkpoint(step))
        ckpt.wait()
    except Exception as e:  # the data iterator may be too broken to save its position
        log.warning("could not save step %d after the input pipeline failed: %s", step, e)
        return f"step {step} could not be saved ({e}); {kept}."
    return f"step {step} is saved; resume with the same command."
