"""Where training metrics go: a JSONL file, TensorBoard event files, or nowhere.

Every writer has the same four methods, so the loop writes once and `make_writers` decides:

    writer = make_writers(workdir, is_main_process=jax.process_index() == 0)
    writer.write_scalars(step, {"loss": 2.3, "lr": 3e-4})
    writer.write_images(step, {"samples": image_grid(samples_NHWC, cols=8)})
    writer.close()

Only process 0 writes; the others get a `NullWriter`, so multi-host runs do not race on files.
TensorBoard files are written with tensorboardX's protobuf classes, without TensorFlow or torch.
Every file goes through `etils.epath`, so the workdir may be local or `gs://` (see `_LogFile`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

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


def is_remote(path: str | os.PathLike) -> bool:
    """`gs://`, `s3://`, ...: an object store, whose files cannot be appended to."""
    return "://" in os.fspath(path)


class _LogFile:
    """A file that only grows, on a local disk or in a bucket (`gs://`), through `etils.epath`.

    Local: opened for appending; `flush` hands every byte to the OS (and to the disk with
    `sync`). Remote: an object cannot be appended to, so the content is kept in memory and
    `flush` rewrites the whole object, as TensorFlow's GCS file system and tensorboardX's GCS
    writer do. Logs stay small (~2 MB of JSONL after 10,000 logged steps), so rewriting costs
    little next to the training steps between two logs; a crash loses nothing flushed.

    Args:
      path: the file.
      keep: remote only: the content to start from (what a resumed run had written).
    """

    def __init__(self, path: epath.Path, keep: bytes = b""):
        self.path = path
        self.closed = False
        self._data = bytearray(keep)
        self._file = None if is_remote(path) else path.open("ab")

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ValueError(f"{self.path} is closed.")
        if self._file is None:
            self._data += data
        else:
            self._file.write(data)

    def flush(self, sync: bool = False) -> None:
        if self.closed:
            return
        if self._file is None:
            self.path.write_bytes(bytes(self._data))
        else:
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:  # closed even when the last flush fails (a full disk): no second attempt
            self.closed = True
            if self._file is not None:
                self._file.close()


def _complete_lines(path: epath.Path) -> bytes:
    """A run stopped mid-write (a full disk, SIGKILL) may leave half a record at the end; the
    resumed run appends after the last complete line instead of gluing onto it. Local files are
    cut in place (epath opens no read-write mode, hence pathlib) and b"" returned; for a remote
    file the complete lines are returned, to be rewritten with what follows."""
    if is_remote(path):
        data = path.read_bytes() if path.exists() else b""
        return data[: data.rfind(b"\n") + 1]
    local = Path(os.fspath(path))
    if local.exists() and local.stat().st_size:
        with local.open("rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return b""


class JsonlWriter(MetricWriter):
    """One JSON object per `write_scalars` call, `{"step": step, **scalars}`, one per line.

    The file is opened in append mode, so a resumed run continues it (steps after a restore may
    repeat ones logged before the crash: readers should keep the last record of each step).
    Every line is flushed to the OS as it is written, so a crashed or killed process loses
    nothing it logged. Images are not written here (see `TensorBoardWriter`).

    Args:
      path: the JSONL file (local or `gs://`); its directory is created if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _LogFile(self.path, keep=_complete_lines(self.path))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in scalars.items() if k != "step"})
        # allow_nan: a NaN loss must reach the log (Python's json reads NaN back).
        with _naming(self.path):
            self._file.write((json.dumps(record, allow_nan=True) + "\n").encode("utf-8"))
            self._file.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        with _naming(self.path):
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

    Events are framed here (TFRecord: length, CRCs) and written synchronously, rather than with
    tensorboardX's `SummaryWriter`: that one queues events for a background thread, and its
    `flush()` does not drain that queue, so the last events before a crash (or before a test
    reads the file) can be missing; and its writers open local files with `open()` (gs:// only
    through google-cloud-storage). A log step writes a few hundred bytes (an image a few kB of
    PNG), so writing inline costs nothing measurable; every call ends with a flush (fsync
    locally, an object rewrite on `gs://`) of the event file.

    Args:
      logdir: directory for `events.out.tfevents.*` files (created if missing; local or
        `gs://`). Point `tensorboard --logdir` at it or at a parent.
    """

    _opened = 0  # a per-process counter in the file name: two writers never share an object

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX.proto import event_pb2

        self.logdir = str(logdir)
        folder = epath.Path(logdir)
        folder.mkdir(parents=True, exist_ok=True)
        # Each writer opens a new file (timestamp + host in the name); TensorBoard merges the
        # files of one directory, so a resumed run simply adds one.
        TensorBoardWriter._opened += 1
        name = (
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            f".{os.getpid()}.{TensorBoardWriter._opened}"
        )
        self._file = _LogFile(folder / name)
        self._closed = False
        self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write_event(self, event: Any) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        with _naming(self.logdir):
            self._file.write(header + struct.pack("<I", masked_crc32c(header)))
            self._file.write(data + struct.pack("<I", masked_crc32c(data)))
            self._file.flush(sync=True)

    def _write(self, step: int, summary: Any) -> None:
        from tensorboardX.proto import event_pb2

        if self._closed:
            raise RuntimeError(f"TensorBoardWriter({self.logdir!r}) is closed.")
        self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

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
            with _naming(self.logdir):
                self._file.flush(sync=True)

    def close(self) -> None:
        if not self._closed:
            with _naming(self.logdir):
                self._file.close()
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
      workdir: the run directory (local or `gs://`).
      is_main_process: `jax.process_index() == 0`; other processes get a `NullWriter` and touch
        no files.

    Returns:
      A `MultiWriter` (process 0) or a `NullWriter`.
    """
    if not is_main_process:
        return NullWriter()
    workdir = epath.Path(workdir)
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
