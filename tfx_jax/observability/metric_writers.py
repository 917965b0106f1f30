"""Where training metrics go: a JSONL file, TensorBoard event files, or nowhere.

Every writer has the same four methods, so the loop writes once and `make_writers` decides:

    writer = make_writers(workdir, is_main_process=jax.process_index() == 0)
    writer.write_scalars(step, {"loss": 2.3, "lr": 3e-4})
    writer.write_images(step, {"samples": image_grid(samples_NHWC, cols=8)})
    writer.close()

Only process 0 writes; the others get a `NullWriter`, so multi-host runs do not race on files.
TensorBoard files are written with tensorboardX's protobuf classes, without TensorFlow or torch.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@contextlib.contextmanager
def _naming(path: str | os.PathLike):
    """An OSError from writing (a full disk: errors from flush carry no file name) names `path`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


class MetricWriter(abc.ABC):
    """The interface: scalars and images keyed by name, at an integer step."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `{name: number}` at `step` (numbers may be numpy / 0-d jax arrays)."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Records `{name: uint8 [H,W,3] image or [N,H,W,3] batch (tiled into a grid)}`."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Makes everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases files. Writing after close is an error."""

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullWriter(MetricWriter):
    """Writes nothing: what every process except process 0 gets."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _to_python(value: Any) -> Any:
    """A number from a Python / numpy / 0-d jax value, keeping ints as ints for JSON."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"scalar metrics must have one element, got shape {arr.shape}.")
    return arr.reshape(()).item()


def _drop_partial_last_line(path: Path) -> None:
    """A run stopped mid-write (a full disk, SIGKILL) may leave half a record at the end; the
    resumed run appends after the last complete line instead of gluing onto it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class JsonlWriter(MetricWriter):
    """One JSON object per `write_scalars` call, `{"step": step, **scalars}`, one per line.

    The file is opened in append mode, so a resumed run continues it (steps after a restore may
    repeat ones logged before the crash: readers should keep the last record of each step).
    Every line is flushed to the OS as it is written, so a crashed or killed process loses
    nothing it logged. Images are not written here (see `TensorBoardWriter`).

    Args:
      path: the JSONL file; its directory is created if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in scalars.items() if k != "step"})
        # allow_nan: a NaN loss must reach the log (Python's json reads NaN back).
        with _naming(self.path):
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _as_rgb_image(name: str, image: np.ndarray) -> np.ndarray:
    """uint8 [H,W], [H,W,1|3] or [N,H,W,1|3] -> uint8 [H,W,3] (a batch becomes a square grid)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(
            f"image {name!r} has dtype {image.dtype}: pass uint8 in [0, 255] "
            "(e.g. np.clip(x * 255, 0, 255).astype(np.uint8))."
        )
    if image.ndim == 4:
        image = image_grid(image, cols=math.ceil(math.sqrt(image.shape[0])))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"image {name!r} has shape {image.shape}: expected [H,W,3] or [N,H,W,3] "
            "(1 channel is also accepted)."
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files (scalars as `simple_value`, images as PNG) via tensorboardX.

    Events are written synchronously with tensorboardX's `EventsWriter` rather than its
    `SummaryWriter`: the latter queues events for a background thread, and its `flush()` does not
    drain that queue, so the last events before a crash (or before a test reads the file) can be
    missing. A log step writes a few hundred bytes (an image a few kB of PNG), so writing inline
    costs nothing measurable; every call ends with a flush (fsync) of the event file.

    Args:
      logdir: directory for `events.out.tfevents.*` files (created if missing). Point
        `tensorboard --logdir` at it or at a parent.
    """

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = str(logdir)
        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        # Each writer opens a new file (timestamp + host in the name); TensorBoard merges the
        # files of one directory, so a resumed run simply adds one.
        self._writer = EventsWriter(os.path.join(self.logdir, "events"))
        self._closed = False

    def _write(self, step: int, summary: Any) -> None:
        from tensorboardX.proto import event_pb2

        if self._closed:
            raise RuntimeError(f"TensorBoardWriter({self.logdir!r}) is closed.")
        with _naming(self.logdir):
            self._writer.write_event(
                event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            )
            self._writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboardX import summary as tbx_summary
        from tensorboardX.proto import summary_pb2

        values = []
        for name, value in scalars.items():
            values.extend(tbx_summary.scalar(name, float(_to_python(value))).value)
        if values:
            self._write(step, summary_pb2.Summary(value=values))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from tensorboardX import summary as tbx_summary
        from tensorboardX.proto import summary_pb2

        values = []
        for name, image in images.items():
            rgb = _as_rgb_image(name, image)
            values.extend(tbx_summary.image(name, rgb, dataformats="HWC").value)
        if values:
            self._write(step, summary_pb2.Summary(value=values))

    def flush(self) -> None:
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True


class MultiWriter(MetricWriter):
    """Sends every call to each of `writers`, in order.

    Args:
      writers: the writers to fan out to.
    """

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def make_writers(workdir: str | os.PathLike, is_main_process: bool) -> MetricWriter:
    """The run's writers: `workdir/metrics.jsonl` + `workdir/tensorboard/` on process 0 only.

    Args:
      workdir: the run directory (local path).
      is_main_process: `jax.process_index() == 0`; other processes get a `NullWriter` and touch
        no files.

    Returns:
      A `MultiWriter` (process 0) or a `NullWriter`.
    """
    if not is_main_process:
        return NullWriter()
    workdir = Path(workdir)
    return MultiWriter(
        [JsonlWriter(workdir / JSONL_NAME), TensorBoardWriter(workdir / TENSORBOARD_DIR)]
    )


def image_grid(
    images_NHWC: np.ndarray, cols: int, pad: int = 2, pad_value: int | float = 255
) -> np.ndarray:
    """Tiles a batch of images into one image, row-major, `cols` per row.

    Args:
      images_NHWC: [N, H, W, C] images (any dtype; sample grids are uint8).
      cols: images per row (rows = ceil(N / cols); unused cells are `pad_value`).
      pad: pixels between neighbouring tiles (none around the outside).
      pad_value: fill for the gaps and unused cells (255 = white for uint8).

    Returns:
      [rows*H + (rows-1)*pad, cols*W + (cols-1)*pad, C] array of the input dtype.
    """
    images_NHWC = np.asarray(images_NHWC)
    if images_NHWC.ndim != 4:
        raise ValueError(f"image_grid expects [N,H,W,C], got shape {images_NHWC.shape}.")
    if cols < 1:
        raise ValueError(f"image_grid: cols={cols} must be >= 1.")
    N, H, W, C = images_NHWC.shape
    rows = max(math.ceil(N / cols), 1)
    grid = np.full(
        (rows * H + (rows - 1) * pad, cols * W + (cols - 1) * pad, C),
        pad_value,
        dtype=images_NHWC.dtype,
    )
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = r * (H + pad), c * (W + pad)
        grid[y : y + H, x : x + W] = images_NHWC[i]
    return grid
