"""Metric writers read back from disk, the process-0 rule, image grids, the profiler window."""

import io
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from tfx_jax.observability.metric_writers import (
    JsonlWriter,
    MultiWriter,
    NullWriter,
    TensorBoardWriter,
    image_grid,
    make_writers,
)
from tfx_jax.observability.profiling import ProfileWindow


def _masked_crc(data: bytes) -> int:
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list[event_pb2.Event]:
    """Parses TFRecord-framed event files: u64 length, u32 crc(length), data, u32 crc(data)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            header = raw[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
            assert header_crc == _masked_crc(header), f"{path}: corrupt length at byte {pos}"
            data = raw[pos + 12 : pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
            assert data_crc == _masked_crc(data), f"{path}: corrupt record at byte {pos}"
            events.append(event_pb2.Event.FromString(data))
            pos += 16 + length
    return events


def test_tensorboard_scalars_and_image_read_back(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    writer = TensorBoardWriter(tmp_path)
    writer.write_scalars(10, {"loss": 2.5, "lr": np.float32(3e-4), "tokens": jnp.asarray(4096)})
    writer.write_scalars(20, {"loss": 1.25})
    writer.write_images(20, {"samples": image})
    # Readable before close: every write is flushed (a crash loses nothing already written).
    events = read_events(tmp_path)
    writer.close()

    assert events[0].file_version == "brain.Event:2"
    scalars = {
        (e.step, v.tag): v.simple_value
        for e in events
        for v in e.summary.value
        if v.HasField("simple_value")
    }
    assert scalars == {
        (10, "loss"): 2.5,
        (10, "lr"): pytest.approx(np.float32(3e-4)),
        (10, "tokens"): 4096.0,
        (20, "loss"): 1.25,
    }
    images = [(e.step, v) for e in events for v in e.summary.value if v.HasField("image")]
    assert len(images) == 1
    step, value = images[0]
    assert (step, value.tag, value.image.height, value.image.width) == (20, "samples", 12, 10)
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, image)  # PNG is lossless


def test_tensorboard_batch_becomes_grid_and_rejects_floats(tmp_path):
    batch = np.zeros((4, 5, 5, 1), np.uint8)
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_images(1, {"grid": batch})
        with pytest.raises(TypeError, match="uint8"):
            writer.write_images(1, {"bad": np.zeros((5, 5, 3), np.float32)})
    (value,) = [v for e in read_events(tmp_path) for v in e.summary.value if v.HasField("image")]
    # 4 images -> 2x2 grid with a 2-pixel gap; grey is expanded to RGB.
    assert (value.image.height, value.image.width, value.image.colorspace) == (12, 12, 3)


def test_jsonl_appends_across_writers(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    first = JsonlWriter(path)
    first.write_scalars(1, {"loss": 3.0, "tokens": np.int32(128)})
    first.write_scalars(2, {"loss": float("nan"), "step": 999})  # "step" is the argument's
    # Flushed per line: visible before close, as after a crash.
    assert len(path.read_text().splitlines()) == 2
    first.close()
    with JsonlWriter(path) as resumed:  # a resumed run reopens the same file
        resumed.write_scalars(3, {"loss": 2.0})
        resumed.write_images(3, {"samples": np.zeros((2, 2, 3), np.uint8)})  # ignored
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "loss": 3.0, "tokens": 128}
    assert isinstance(records[0]["tokens"], int)
    assert np.isnan(records[1]["loss"])
    assert records[2] == {"step": 3, "loss": 2.0}


def test_non_main_process_writes_nothing(tmp_path):
    writer = make_writers(tmp_path / "run", is_main_process=False)
    assert isinstance(writer, NullWriter)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.flush()
    writer.close()
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []


def test_make_writers_main_process_writes_both(tmp_path):
    writer = make_writers(tmp_path, is_main_process=True)
    assert isinstance(writer, MultiWriter)
    writer.write_scalars(5, {"loss": 0.5})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "loss": 0.5}
    events = read_events(tmp_path / "tensorboard")
    assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [
        (5, "loss", 0.5)
    ]


def test_image_grid_shape_and_placement():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 4, 3, 3), np.uint8)
    grid = image_grid(images, cols=3, pad=1, pad_value=255)
    assert grid.shape == (2 * 4 + 1, 3 * 3 + 2, 3) and grid.dtype == np.uint8
    assert (grid[0:4, 0:3] == 0).all() and (grid[0:4, 4:7] == 1).all()
    assert (grid[5:9, 4:7] == 4).all()  # 5th image: row 1, column 1
    assert (grid[5:9, 8:11] == 255).all()  # unused cell
    assert (grid[4, :] == 255).all()  # gap between rows
    assert image_grid(images, cols=5, pad=0).shape == (4, 15, 3)


def test_profile_window_writes_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64))
    window = ProfileWindow(tmp_path / "profile", start_step=2, num_steps=2, is_main_process=True)
    out = None
    for step in range(1, 6):
        window.on_step(step, pending=out)
        if step == 2:
            assert window.active
        if step == 4:
            assert not window.active  # stopped before step 4 ran: steps 2 and 3 traced
        out = f(x)
    window.close(pending=out)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_profile_window_close_stops_and_non_main_skips(tmp_path):
    window = ProfileWindow(tmp_path / "open", start_step=1, num_steps=100, is_main_process=True)
    window.on_step(1)
    jnp.ones(3).block_until_ready()
    window.close()  # the run ended inside the window
    assert not window.active
    assert list((tmp_path / "open").rglob("*.xplane.pb"))

    idle = ProfileWindow(tmp_path / "other", start_step=1, num_steps=2, is_main_process=False)
    for step in range(1, 4):
        idle.on_step(step)
    idle.close()
    assert not (tmp_path / "other").exists()
