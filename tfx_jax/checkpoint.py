"""Checkpoints (Orbax): train state, data iterator, config and provenance, saved together.

A checkpoint step directory holds three items:
  state/  the TrainState (params fp32, optimizer state, step), sharded arrays written per shard
  data/   the input iterator's position, one file per process (Grain's checkpoint handler)
  meta/   JSON: the resolved config, the RNG seed, the tokenizer and VAE references, counters

Orbax writes each step into a temporary directory and renames it when complete, so a crash or
SIGTERM mid-save leaves the previous checkpoints intact and the half-written step invisible:
`latest_step()` only ever returns finalized steps. Saves are asynchronous; `wait()` blocks until
the last one is durable (done before exit).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from tfx_jax.config import Config, from_dict

log = logging.getLogger(__name__)

# Config fields that may differ between a checkpoint and the run resuming it. Everything else
# (the model's structure, the diffusion objective, the data layout, the optimizer recipe) must
# match, or resuming would silently train a different experiment.
RESUMABLE_DIFFERENCES = (
    "name",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.eval_samples",
    "train.peak_tflops",
    "train.profile_start",
    "train.profile_steps",
    "train.nan_policy",
    "train.strict_eval",
    "checkpoint.",
    "mesh.",
    "model.attention_impl",
    "model.remat_policy",
    # Not data.worker_count: Grain's workers each pack their own slice of the examples, so the
    # batches (and the iterator state) depend on it — fixed for a run, like the data layout.
    "data.read_threads",
    "data.latents",  # both modes give the same records
    "data.data_dir",
    "optimizer.decay_steps",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Keys whose values differ in ways that make resuming unsafe, as 'key: saved -> current'.
    A key the saved config lacks (written before the setting existed) reads as the value that
    run had: `_OLD_DEFAULTS`' where the default changed since, else today's default (a new
    setting's default is the behaviour from before it). So an upgrade alone refuses no run."""
    return differences(
        of_its_time(saved), _jsonable(current.to_dict()), ignore=RESUMABLE_DIFFERENCES
    )


def of_its_time(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (flattened) with every key it lacks filled as `config_differences` says."""
    flat = _flatten(saved)
    for key, value in _flatten(_jsonable(Config().to_dict())).items():
        section, _, name = key.partition(".")
        flat.setdefault(key, _OLD_DEFAULTS.get((section, name), value))
    return flat


def differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()
) -> list[str]:
    """'key: saved -> current' for every (dotted, flattened) key whose values differ; a missing
    key reads as None. `ignore`: keys, or prefixes ending in "." for whole sections, to skip."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in ignore):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions, a vanished bucket). The
    message names the directory and the OS error; committed checkpoints are untouched."""


def _os_error(error: BaseException) -> BaseException:
    """The OSError behind `error` (it may be wrapped by Orbax or TensorStore), else `error`."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return error


def _late_write_of_a_failed_save(unraisable: Any) -> bool:
    """Whether an unraisable exception is TensorStore finishing a write of a save that already
    failed. When one array's write fails, Orbax's `asyncio.gather` raises and its `run_sync`
    closes the event loop while the other arrays' TensorStore writes are still in flight; each
    of those, on completing, calls `loop.call_soon_threadsafe` from a TensorStore thread, which
    raises "Event loop is closed" (reported through `sys.unraisablehook`, one traceback each)."""
    error = unraisable.exc_value
    if type(error) is not RuntimeError or str(error) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    # Called from native code: the outermost frame is asyncio's own method, no Python caller.
    return (
        bool(frames)
        and frames[0].name == "call_soon_threadsafe"
        and (frames[0].filename.endswith(os.path.join("asyncio", "base_events.py")))
    )


def _abandoned_task_of_a_failed_save(record: logging.LogRecord) -> bool:
    """Whether an `asyncio` log record is about one of Orbax's write tasks abandoned by a failed
    save: the `gather` raised the first error and the loop was closed, so asyncio reports each
    other task when it is garbage-collected ("Task exception was never retrieved" for one that
    failed too, "Task was destroyed but it is pending!" for one the closed loop never ran)."""
    message = record.getMessage()
    if not message.startswith(_ABANDONED_TASK_MESSAGES):
        return False
    # The task's own error, when it has one: its repr leaves out an OSError's file name.
    error = record.exc_info[1] if record.exc_info else None
    target = getattr(_os_error(error), "filename", None) if error is not None else None
    return (
        f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in message  # an Orbax coroutine
        or _TMP_MARK in message  # or one writing a save's temporary directory,
        or _TMP_MARK in str(target or "")  # or failing on a file in one
    )


_TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes a save here and renames it on commit


_ABANDONED_TASK_MESSAGES = ("Task exception was never retrieved", "Task was destroyed but it is")
# Orbax's per-array write coroutines that a closed loop never started (Python warns when they
# are garbage-collected, often at exit): `async_serialize_from_host.<locals>.write_fragment`.
_ABANDONED_COROUTINE_WARNING = r"coroutine 'async_serialize[\w.<>]*' was never awaited"


class _AbandonedSaveTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _abandoned_task_of_a_failed_save(record):
            log.debug("a write task of the failed checkpoint save: %s", record.getMessage())
            return False
        return True


def _drop_late_writes_of_failed_saves() -> None:
    """The abandoned writes of a failed save (reported once, as `CheckpointWriteError`) are
    logged at debug level instead of printing a traceback or an asyncio error each: their late
    completions (`sys.unraisablehook`), their unretrieved or never-run tasks (the `asyncio`
    logger) and their never-started coroutines (a warning filter). Every other unraisable
    exception, asyncio record and warning passes as before. Installed once per process, before
    any save: the writes can finish before the failure is noticed."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedSaveTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedSaveTasks())
        warnings.filterwarnings("ignore", _ABANDONED_COROUTINE_WARNING, RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_tfx_late_writes", False):
        return

    def hook(unraisable):
        if _late_write_of_a_failed_save(unraisable):
            log.debug("a write of the failed checkpoint save completed after its event loop")
        else:
            previous(unraisable)

    hook._tfx_late_writes = True
    sys.unraisablehook = hook


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with this project's three items.

    A failed save is reported once, naming its step (`CheckpointWriteError`): an asynchronous
    save's failure surfaces later (at `check`, `wait` or the next `save`), and is attributed to
    the save that was in flight, not to the call that noticed it; `close` after a reported
    failure only releases the manager.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        create: bool = True,
    ):
        import grain  # lazily: accelerator images without grain can still train and restore

        directory = str(directory)
        if "://" not in directory:  # Orbax/TensorStore need absolute local paths
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self._closed = False
        self._in_flight: int | None = None  # the step of the last save started
        self._failed = False  # a write error was raised: close() does not raise it again
        _drop_late_writes_of_failed_saves()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=create,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> None:
        import grain

        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if hasattr(data_iter, "get_state"):  # plain generators (tests, ad-hoc feeds) have no state
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:  # Orbax's save waits for the previous one anyway: its error names its own step
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            self._raise_write_error(e, self._in_flight)
        self._in_flight = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # the synchronous part of this save
            self._raise_write_error(e, step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, dict]:
        """Restores onto the shardings carried by `abstract_state` (any mesh, any device count).

        Args:
          step: the step to restore.
          abstract_state: a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
          data_iter: an iterator whose position is restored in place (None: params/opt only).

        Returns:
          (state, meta).
        """
        import grain

        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only `state.params` (Orbax partial restore): every other leaf of the saved
        state (optimizer moments, counters) is a placeholder and is never read.

        Args:
          step: the step to restore.
          abstract_params: the params tree as `jax.ShapeDtypeStruct`s with shardings.
        """
        # The state item was written by StandardCheckpointHandler, a thin layer over the PyTree
        # handler; only the latter takes `partial_restore` (leaves left out are never read).
        reader = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(create=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
        target = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        try:
            out = reader.restore(step, args=ocp.args.Composite(state=restore))
        finally:
            reader.close()
        return out["state"]["params"]

    def _raise_write_error(self, error: Exception, step: int | None = None) -> None:
        self._failed = True
        try:  # Orbax still lists the failed step (it was in flight): read what is committed
            self.manager.reload()
        except Exception as e:
            log.debug("re-reading the committed steps: %s", e)
        cause = _os_error(error)
        what = f"step {step}" if step is not None else "a checkpoint"
        raise CheckpointWriteError(
            f"writing {what} to {self.directory} failed: {cause}. Committed checkpoints "
            f"({self.all_steps() or 'none'}) are intact; fix the cause and rerun to resume."
        ) from error

    def check(self) -> None:
        """Raises `CheckpointWriteError` if an asynchronous save has failed (cheap: no wait)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            self._raise_write_error(e, self._in_flight)

    def wait(self) -> None:
        """Blocks until the last save is committed; raises `CheckpointWriteError` if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except CheckpointWriteError:
            raise
        except Exception as e:
            self._raise_write_error(e, self._in_flight)

    def close(self) -> None:
        """Waits for pending saves to commit, then releases the manager (idempotent). After a
        write error was raised, the same failure is not raised (or logged) a second time."""
        if self._closed:
            return
        self._closed = True
        if self._failed:
            try:
                self.manager.close()
            except Exception as e:  # the failure already reported
                log.debug("closing after a failed save: %s", e)
            return
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings: the restore target for any mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_checkpoint(
    directory: str | epath.PathLike, *, create: bool = True, read_meta: bool = False
) -> tuple[int | None, dict[str, Any]]:
    """(newest finalized step, its meta if `read_meta` else {}) in `directory`; (None, {}) if it
    holds none. Opens a manager for the look and closes it again."""
    probe = Checkpointer(directory, async_save=False, create=create)
    try:
        step = probe.latest_step()
        return step, (probe.read_meta(step) if read_meta and step is not None else {})
    finally:
        probe.close()


def set_aside(directory: epath.Path, stale: epath.Path) -> None:
    """Moves a checkpoint directory to `stale` (replacing an older one) rather than deleting it:
    process 0 renames, every process waits until it has."""
    if jax.process_index() == 0:
        if stale.exists():
            stale.rmtree()
        directory.rename(stale)
    multihost_utils.sync_global_devices("tfx_jax.checkpoint.set_aside")


# Settings whose default changed after checkpoints had been written without the key: such a
# checkpoint was made with the old value, and what reads its config (the sampler reads the
# context level) must see that one, not today's default.
_OLD_DEFAULTS = {("diffusion", "rolling_context_noise"): 0.0}


def saved_config(meta: dict[str, Any]) -> Config:
    """The config a checkpoint was made with; keys it lacks as `config_differences` reads them
    (`from_dict` gives today's defaults, `_OLD_DEFAULTS` the changed ones)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in meta["config"].items()}
    for (section, key), old in _OLD_DEFAULTS.items():
        if isinstance(d.get(section), dict):
            d[section].setdefault(key, old)
    return from_dict(d)


@dataclasses.dataclass
class ResumeDecision:
    """Where a run starts from (resume order: workdir → --resume → --init-from → fresh)."""

    kind: str  # "workdir" | "resume" | "init_from" | "fresh"
    path: epath.Path | None = None
    step: int | None = None


def decide_resume(
    workdir: epath.Path, resume: str | None = None, init_from: str | None = None
) -> ResumeDecision:
    step, _ = latest_checkpoint(workdir / "checkpoints")
    if step is not None:
        return ResumeDecision("workdir", workdir / "checkpoints", step)
    for kind, path in (("resume", resume), ("init_from", init_from)):
        if path:
            path = epath.Path(path)
            root = path / "checkpoints" if (path / "checkpoints").exists() else path
            step, _ = latest_checkpoint(root, create=False)
            if step is None:
                raise FileNotFoundError(
                    f"--{kind.replace('_', '-')} {path}: no complete checkpoint found there."
                )
            return ResumeDecision(kind, root, step)
    return ResumeDecision("fresh")
