"""Nothing silent, nothing hung: every way the data can be lost, wrong or empty is counted and
reported, or stops with one line that says how many, why, and which settings fix it.

    pipeline  a source that can yield nothing (every example over-long, unfittable, unreadable,
              or none at all) raises within seconds instead of hanging; losing more than
              data.max_lost_fraction stops it
    stages    `data encode` reports over-long examples per split and stops on losses;
              data.on_error=raise holds in the tokenizer and VAE stages; an image that cannot be
              used gives nothing anywhere (not even its caption to the tokenizer); a vocabulary
              too small for the text's characters is one config error
    images    one preparation for training and `generate --image` (16-bit, alpha, palette,
              bilevel, CMYK, crop, too small)
    folder    caption files without an image are counted and named by `data build`
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pytest
from PIL import Image

from tfx_jax import artifacts, cli, stages
from tfx_jax.config import ConfigError, validate
from tfx_jax.data import encoded, pipeline, sequence, sources
from tfx_jax.data.sources import images
from tfx_jax.data.sources.folder import FolderExamples
from tfx_jax.generate import command

SPEC = sequence.SequenceSpec(seq_len=24, patch_size=2, latent_channels=2)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def text_record(n_words: int) -> encoded.Record:
    return encoded.encode_example(
        {"kind": "text", "text": words(n_words)}, lambda t: [7] * len(t.split()), (4, 4, 2)
    )


def caption_record(n_words: int) -> encoded.Record:
    latents = np.ones((1, 4, 4, 2), np.float32)
    example = {"kind": "caption", "text": words(n_words), "latents": latents}
    return encoded.encode_example(example, lambda t: [7] * len(t.split()), (4, 4, 2))


def first_batch_error(source, spec, **kw) -> tuple[Exception, float]:
    """Builds the packed dataset, asks for one batch; returns the error and how long it took."""
    start = time.perf_counter()
    with pytest.raises(sources.DataLossError) as error:
        it = iter(pipeline.packed_dataset(source, spec, batch_size=2, seed=0, **kw))
        next(it)
    message = str(error.value)
    assert "\n" not in message, message  # One line, for the CLI's "data error: ..."
    return error.value, time.perf_counter() - start


# ----------------------------------------------------------------------------- pipeline


def test_only_dropped_examples_raise_within_seconds_instead_of_hanging():
    spec = sequence.SequenceSpec(24, 2, 2, overlong="drop")
    error, seconds = first_batch_error([text_record(40) for _ in range(30)], spec)
    assert seconds < 20
    message = str(error)
    assert "none of the last 30 can be packed" in message
    assert "are longer than data.seq_len=24" in message and "dropped" in message
    assert "data.overlong=split" in message and "raise data.seq_len (now 24)" in message
    # The same documents under the default policy continue across rows: batches come.
    batch = next(iter(pipeline.packed_dataset([text_record(40)] * 30, SPEC, batch_size=2)))
    assert batch["tokens"].shape == (2, 24) and (batch["segment_ids"] > 0).mean() > 0.5


def test_unfittable_images_raise_under_every_policy():
    for policy in ("split", "truncate", "drop"):
        spec = sequence.SequenceSpec(6, 2, 2, overlong=policy)  # an image block needs 6 + 2
        error, _ = first_batch_error([caption_record(3) for _ in range(10)], spec)
        assert "cannot fit" in str(error) and "model.patch_size" in str(error)


class Unreadable:
    def __len__(self):
        return 12

    def __getitem__(self, index):
        raise OSError(f"corrupt block {index}")

    def __repr__(self):
        return "Unreadable()"


def test_only_unreadable_records_raise_naming_the_last_error():
    error, seconds = first_batch_error(Unreadable(), SPEC)
    assert seconds < 20
    message = str(error)
    assert "none of the last 12 can be packed" in message and "of Unreadable()" in message
    assert "unreadable; last error: record " in message and "corrupt block" in message
    assert "fix or remove the unreadable records" in message


def test_an_empty_source_or_an_uneven_batch_raises_at_once():
    with pytest.raises(sources.DataLossError, match="has no examples"):
        pipeline.packed_dataset([], SPEC, batch_size=2)
    with pytest.raises(ValueError, match="global_batch_size=3 does not split over 2 processes"):
        pipeline.packed_dataset([text_record(3)], SPEC, batch_size=3, process_index=1,
                                process_count=2)  # fmt: skip


def test_losing_more_than_max_lost_fraction_stops_after_a_pass():
    source = [text_record(40 if i % 10 == 0 else 5) for i in range(50)]  # 10% over-long
    spec = sequence.SequenceSpec(24, 2, 2, overlong="drop", max_lost_fraction=0.01)
    with pytest.raises(sources.DataLossError) as error:
        it = iter(pipeline.packed_dataset(source, spec, batch_size=2))
        for _ in range(100):
            next(it)
    message = str(error.value)
    assert "examples of a list of 50 records" in message
    assert "would be lost, more than data.max_lost_fraction=0.01" in message
    assert "longer than data.seq_len=24 and dropped by data.overlong=drop" in message
    assert "raise data.max_lost_fraction (now 0.01)" in message
    # Allowed to lose 20%: it trains on, and the counters say what happened.
    counters = sequence.Counters()
    lenient = sequence.SequenceSpec(24, 2, 2, overlong="drop", max_lost_fraction=0.2)
    it = iter(pipeline.packed_dataset(source, lenient, batch_size=2, counters=counters))
    for _ in range(30):
        next(it)
    assert counters.examples >= 50 and counters.overlong == counters.overlong_dropped > 0


def test_large_losses_stop_early_on_a_large_shard(monkeypatch):
    monkeypatch.setattr(pipeline._PlanBlock, "EARLY", 128)
    source = [text_record(40 if i % 2 else 5) for i in range(5000)]
    spec = sequence.SequenceSpec(24, 2, 2, overlong="drop")
    counters = sequence.Counters()
    with pytest.raises(sources.DataLossError, match="of the first examples read of"):
        it = iter(pipeline.packed_dataset(source, spec, batch_size=2, counters=counters))
        for _ in range(1000):
            next(it)
    assert 128 <= counters.examples < 5000  # before a whole pass


# ----------------------------------------------------------------------------- images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    want = np.rint(grey / 257).astype(np.uint8)
    path = tmp_path / "deep.png"
    path.write_bytes(_png(Image.fromarray(grey)))
    assert Image.open(path).mode == "I;16"
    out = images.read_image(path, 8)
    np.testing.assert_array_equal(out, np.repeat(want[..., None], 3, -1))
    assert (out < 255).mean() > 0.25  # Pillow's own convert("RGB") gives almost all 255
    tiff = tmp_path / "deep.tif"
    Image.fromarray(grey.astype(np.int32)).save(tiff)  # mode "I"
    np.testing.assert_array_equal(images.read_image(tiff, 8)[..., 0], want)
    np.testing.assert_array_equal(images.array_to_image(grey).convert("L"), want)
    floats = Image.fromarray((grey / 65535).astype(np.float32))  # mode "F", 0..1
    out = images.prepare_image(floats, 8)[..., 0].astype(int)
    assert np.abs(out - want).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[:3] = (200, 0, 0, 255)  # opaque red on top, fully transparent black below
    image = Image.fromarray(rgba)
    if mode == "LA":
        image = image.convert("LA")
    elif mode in ("P", "PA"):
        image = Image.fromarray(rgba[..., :3]).convert("P")
        if mode == "P":
            image.info["transparency"] = image.getpixel((0, 5))  # the black index
        else:
            image = image.convert("PA")
            image.putalpha(Image.fromarray(rgba[..., 3]))
    if mode == "PA":  # Pillow cannot write PA files: prepared in memory
        out = images.prepare_image(image, 6)
    else:
        path = tmp_path / f"alpha_{mode}.{'gif' if mode == 'P' else 'png'}"
        image.save(path)
        out = images.read_image(path, 6)
    assert (out[3:] == 255).all(), out[3:, :, 0]  # transparent -> white, not black
    assert (out[:3] != 255).any()


def test_other_modes_crop_and_resize(tmp_path):
    bilevel = Image.fromarray(np.eye(8, dtype=bool))
    np.testing.assert_array_equal(images.prepare_image(bilevel, 8)[..., 0], np.eye(8) * 255)
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # red in CMYK
    r, g, b = images.read_image(path, 8).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (0, 0, 250)  # only the centre square is blue
    out = images.prepare_image(Image.fromarray(wide), 5)
    assert out.shape == (5, 5, 3) and (out.reshape(-1, 3) == (0, 0, 250)).all()


def test_too_small_images_are_refused_by_name(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(path)
    with pytest.raises(sources.ImageTooSmallError, match=r"dot\.png: 1x1 pixels .* "):
        images.read_image(path, 32, min_size=8)
    assert (images.read_image(path, 32, min_size=1) == 9).all()  # accepted when allowed
    assert sources.ImageTooSmallError("x").reason == "too small"


class FakeCodec:
    def __init__(self, *parts):
        pass

    def encode(self, pixels):
        return pixels


def test_generate_prepares_images_as_training_does(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(command, "Codec", FakeCodec)
    cfg = tiny_config()  # image_size 32, min_image_size 0 -> 8
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, 25:35] = (10, 200, 10, 255)  # a green stripe in the middle, transparent around it
    path = tmp_path / "logo.png"
    Image.fromarray(rgba).save(path)
    (got,) = command.encode_image_files(cfg.data, (None, None, 1.0), [str(path)])
    np.testing.assert_array_equal(got, images.read_image(path, 32, cfg.data.min_image_side))
    assert (got[:, 0] == 255).all()  # transparent: white; cropped, not squashed
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=rf"--image {bad}: cannot decode the image"):
        command.encode_image_files(cfg.data, (None, None, 1.0), [str(path), str(bad)])
    dot = tmp_path / "dot.png"
    Image.new("RGB", (2, 2)).save(dot)
    with pytest.raises(ConfigError, match=r"dot\.png: 2x2 pixels is smaller than data.min_image"):
        command.encode_image_files(cfg.data, (None, None, 1.0), [str(dot)])


# ----------------------------------------------------------------------------- stages


def _cfg(tiny_config, tmp_path, *overrides):
    return tiny_config(overrides=[f"data.data_dir={tmp_path / 'data'}", *overrides])


def _folder(root):
    """Three good images, one undecodable, one 1x1, one uncaptioned, one orphan caption."""
    root.mkdir(parents=True)
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (40, 36), color).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"a plain colour number {i}")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("zebra caption of the broken image")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    (root / "tiny.txt").write_text("quokka caption of a one pixel image")
    Image.new("RGB", (40, 40)).save(root / "uncaptioned.png")
    (root / "orphan.txt").write_text("a caption whose image is gone")
    return root


def test_unusable_images_give_nothing_anywhere(tiny_config, tmp_path, monkeypatch, capsys):
    folder = _folder(tmp_path / "pics")
    cfg = _cfg(tiny_config, tmp_path, "data.source=folder", f"data.path={folder}")
    assert not hasattr(FolderExamples, "text")  # no caption-only path that skips the image
    seen = {}

    def capture(texts, vocab_size, **kw):
        seen["texts"], seen["kw"] = list(texts), kw
        raise RuntimeError("captured")

    monkeypatch.setattr(stages, "train_tokenizer", capture)
    with pytest.raises(RuntimeError, match="captured"):
        stages.build_tokenizer(cfg)
    texts = seen["texts"]
    assert sum("plain colour" in t for t in texts) == 3
    assert not any("zebra" in t or "quokka" in t for t in texts)
    assert seen["kw"]["character_coverage"] == 1.0
    out = capsys.readouterr().out
    assert "tokenizer: skipped 3 examples (2 unreadable, 1 too small;" in out
    assert len(stages._images(cfg, "train")) == 3

    for stage in (stages.build_tokenizer, stages.train_vae):
        strict = _cfg(
            tiny_config, tmp_path, "data.source=folder", f"data.path={folder}",
            "data.on_error=raise",
        )  # fmt: skip
        with pytest.raises(sources.RecordError, match=r"broken\.png: cannot decode") as error:
            stage(strict)
        assert "data.on_error=skip" in str(error.value)


def _truncated_png(path, size=(40, 36)) -> None:
    """A PNG whose header (format, size) parses but whose pixel data stops half way."""
    noise = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), np.uint8)
    data = _png(Image.fromarray(noise))
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        assert image.size == size  # the header is fine


def test_an_image_whose_pixels_are_corrupt_gives_no_tokenizer_text(
    tiny_config, tmp_path, monkeypatch
):
    """The tokenizer's sample and encode / the VAE make one decision per image: a file whose
    header parses but whose pixels do not decode is unreadable for all of them."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (60 * i, 0, 0)).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"a plain colour number {i}")
    _truncated_png(folder / "cut.png")
    (folder / "cut.txt").write_text("wombat caption of a truncated image")
    cfg = _cfg(tiny_config, tmp_path, "data.source=folder", f"data.path={folder}")
    examples = sources.of(cfg).open_limited(cfg, "train")
    usable = []
    for i in range(len(examples)):
        try:
            usable.append(examples[i]["text"])
        except sources.RecordError as e:
            assert "cut.png: cannot decode" in str(e)
    assert len(usable) == 3 and not any("wombat" in t for t in usable)  # encode and the VAE
    texts = list(sources.of(cfg).texts(cfg, "train", limit=100))
    captions = [t for t in texts if isinstance(t, str)]
    assert sorted(captions) == sorted(usable), texts  # the tokenizer: the same three
    (error,) = [t for t in texts if isinstance(t, sources.RecordError)]
    assert "cut.png: cannot decode" in str(error)


def test_too_small_images_are_counted_when_encoding(tmp_path):
    class Raw:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise sources.ImageTooSmallError("tiny.png: 1x1 pixels is smaller than ...")
            if i == 2:
                raise sources.RecordError("bad.png: cannot decode the image")
            return {"kind": "text", "text": "some words", "images": []}

    stats = encoded.write_encoded(
        tmp_path / "x.array_record", Raw(), lambda t: [7, 8], None, (4, 4, 2), progress=False
    )
    assert (stats.examples, stats.skipped, stats.too_small) == (1, 2, 1)
    assert stats.skipped_summary() == ", 2 skipped (1 unreadable, 1 too small)"


def test_build_reports_captions_without_images(tiny_config, tmp_path, capsys):
    folder = _folder(tmp_path / "pics")
    cfg = _cfg(tiny_config, tmp_path, "data.source=folder", f"data.path={folder}")
    stages.build_dataset(cfg)
    out = capsys.readouterr().out
    assert "1 caption files have no image beside them and are not used" in out
    assert "orphan.txt" in out and "1 images without a .txt caption" in out
    stats = sources.of(cfg).stats(cfg)
    assert [p.rsplit("/", 1)[-1] for p in stats.orphan_captions] == ["orphan.txt"]
    assert [p.rsplit("/", 1)[-1] for p in stats.uncaptioned] == ["uncaptioned.png"]
    assert sum(stats.images.values()) == 6


def _long_texts(root, n=6, words_per_doc=400):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda"]
    for i in range(n):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab, words_per_doc)))
    return root


def test_encode_reports_overlong_and_stops_when_too_much_would_be_lost(
    tiny_config, tmp_path, capsys
):
    docs = _long_texts(tmp_path / "docs")
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    stages.prepare_all(cfg)  # default overlong=split: every document continues across rows
    out = capsys.readouterr().out
    assert "6 of 6 examples are longer than data.seq_len=128: 6 continued across rows" in out
    made_by = json.loads(artifacts.made_by_path(cfg).read_text())
    assert made_by["stats"]["train"]["overlong"]["split"] == 6
    batch = next(artifacts.batches(cfg))
    assert (batch["segment_ids"] > 0).mean() > 0.9

    drop = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}",
                "data.overlong=drop")  # fmt: skip
    with pytest.raises(sources.DataLossError) as error:
        stages.encode(drop)
    message = str(error.value)
    assert "6 of 6 examples of encoded/train (100.0%) would be lost" in message
    assert "data.overlong=split" in message and "raise data.seq_len (now 128)" in message
    assert artifacts.encoded_is_current(drop)  # recorded: changing a setting needs no re-encode
    start = time.perf_counter()
    with pytest.raises(sources.DataLossError, match="none of the last 6 can be packed"):
        next(artifacts.batches(drop))  # used to hang (5+ minutes at full CPU)
    assert time.perf_counter() - start < 30


def test_the_cli_says_it_in_one_line(tiny_config, tmp_path, capsys):
    docs = _long_texts(tmp_path / "docs")
    base = ["--config", "experiments/tiny.py", "--set", f"data.data_dir={tmp_path / 'data'}"]
    base += ["--set", "data.source=text", "--set", f"data.path={docs}"]
    handlers = logging.root.handlers[:]  # cli.main points logging at this test's stderr
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["data", "all", *base, "--set", "data.overlong=drop"])
    finally:
        logging.root.handlers[:] = handlers
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert last.startswith("data error: 6 of 6 examples of encoded/train"), last


def test_a_vocabulary_too_small_for_the_characters_is_one_config_error(tiny_config, tmp_path):
    docs = tmp_path / "cjk"
    docs.mkdir()
    chars = [chr(0x4E00 + i) for i in range(700)]
    (docs / "a.txt").write_text("\n\n".join("".join(chars[j::7]) for j in range(7)))
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    with pytest.raises(ConfigError) as error:
        stages.build_tokenizer(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert "model.vocab_size=512 is too small for the tokenizer's text" in message
    assert "distinct characters at data.character_coverage=1.0" in message
    assert "set model.vocab_size >=" in message and "lower data.character_coverage" in message


def test_character_coverage_is_recorded_only_when_set(tiny_config, tmp_path):
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", "data.path=x")
    assert "character_coverage" not in artifacts.tokenizer_settings(cfg)
    other = _cfg(tiny_config, tmp_path, "data.source=text", "data.path=x",
                 "data.character_coverage=0.9995")  # fmt: skip
    assert artifacts.tokenizer_settings(other)["character_coverage"] == 0.9995


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.overlong=wrap", "data.overlong='wrap': split | truncate | drop"),
        ("data.max_lost_fraction=1.5", "data.max_lost_fraction=1.5 must be in [0, 1]"),
        ("data.character_coverage=0", "data.character_coverage=0"),
        ("data.min_image_size=-1", "data.min_image_size=-1 must be >= 0"),
    ],
)
def test_new_settings_are_validated(tiny_config, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate(tiny_config(overrides=[override]), num_devices=8)


def test_a_split_with_nothing_usable_stops_encode_and_training(tiny_config, tmp_path):
    docs = tmp_path / "latin1"
    docs.mkdir()
    for name in ("a", "b", "c"):  # all three in the train split (by their hash)
        (docs / f"{name}.txt").write_bytes(b"caf\xe9 cr\xe8me " * 20)  # not UTF-8
    cfg = _cfg(tiny_config, tmp_path, "data.source=text", f"data.path={docs}")
    stages.build_tokenizer(cfg)  # the stdlib docstrings alone; the 3 files are counted
    with pytest.raises(sources.DataLossError, match=r"encoded/train has no examples: all 3 were "
                       r"skipped \(3 unreadable; the log names them"):  # fmt: skip
        stages.encode(cfg)
    with pytest.raises(sources.DataLossError, match="has no examples"):
        artifacts.batches(cfg)
