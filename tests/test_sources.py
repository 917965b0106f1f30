"""Tests for the file-backed data sources (tfds, folder, text) of tfx_jax.data.sources and
the registry.

The TFDS tests prepare three tiny fake datasets (a labelled digits set, a coco-like captions
set and a wikipedia-like text corpus) into a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import socket
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from tfx_jax.config import Config, ConfigError, validate
from tfx_jax.data import sources
from tfx_jax.data.config import DataConfig
from tfx_jax.data.sources import images
from tfx_jax.data.sources import text as text_source
from tfx_jax.data.sources.base import sample_indices
from tfx_jax.data.sources.synthetic import SyntheticIterator

DIGIT_NAMES = ["zero", "one", "two"]
TFDS, FOLDER, TEXT = (sources.get(name) for name in ("tfds", "folder", "text"))


def _png(image: np.ndarray) -> bytes:
    """PNG bytes (TFDS encodes numpy images with TensorFlow, which is not installed)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _digit(i: int) -> np.ndarray:
    image = np.zeros((28, 28, 1), np.uint8)
    image[4:24, 4:24] = 20 * (i + 1)
    return image


def _wide(i: int) -> np.ndarray:
    """30 x 40 RGB: red and blue 5-column borders that a centre crop removes, green inside."""
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :5], image[:, 35:], image[:, 5:35] = (255, 0, 0), (0, 0, 255), (0, 10 * i, 200)
    return image


def _info(builder, **features) -> tfds.core.DatasetInfo:
    """A builder outside a package must make its DatasetInfo itself (TFDS looks up the package's
    checksums and metadata otherwise)."""
    return tfds.core.DatasetInfo(
        builder=builder, features=tfds.features.FeaturesDict(features), disable_shuffling=True
    )


class TfxFakeDigits(tfds.core.GeneratorBasedBuilder):
    """MNIST-like: grey 28 x 28 images with a ClassLabel; splits train (6) and test (3)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            image=tfds.features.Image(shape=(28, 28, 1)),
            label=tfds.features.ClassLabel(names=DIGIT_NAMES),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

    def _generate_examples(self, n: int):
        for i in range(n):
            yield i, {"image": _png(_digit(i)), "label": i % 3}


class TfxFakeCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions-like: 30 x 40 RGB images; record i has i + 1 captions "cap i j" (the last
    train record has none); splits train (5) and validation (2)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(
            self,
            image=tfds.features.Image(shape=(30, 40, 3)),
            captions=tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(5, "train"),
            "validation": self._generate_examples(2, "val"),
        }

    def _generate_examples(self, n: int, prefix: str):
        for i in range(n):
            count = 0 if prefix == "train" and i == n - 1 else i + 1
            texts = [f"{prefix} cap {i} {j}" for j in range(count)]
            yield (
                i,
                {
                    "image": _png(_wide(i)),
                    "captions": {"text": texts, "id": list(range(count))},
                },
            )


CORPUS_LONG = " ".join(f"word{i % 50}" for i in range(900))  # ~6 KB: longer than seq_len


class TfxFakeCorpus(tfds.core.GeneratorBasedBuilder):
    """wikipedia-like: a title and a text document per record, no image; record 3 is one long
    document, record 5 is empty; splits train (8) and validation (2)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, title=tfds.features.Text(), text=tfds.features.Text())

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(8), "validation": self._generate_examples(2)}

    def _generate_examples(self, n: int):
        for i in range(n):
            text = {3: CORPUS_LONG, 5: ""}.get(i, f"Document {i} says plain things.\n\nEnd {i}.")
            yield i, {"title": f"title {i}", "text": text}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for cls in (TfxFakeDigits, TfxFakeCaptions, TfxFakeCorpus):
        cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _cfg(**data) -> Config:
    return Config(data=DataConfig(**data))


def _digits(tfds_dir: str, **data) -> Config:
    """The fake digits set, captioned "a digit <name>", at 16 px (`data` overrides)."""
    fields = dict(
        source="tfds",
        tfds_name="tfx_fake_digits",
        tfds_data_dir=tfds_dir,
        label_key="label",
        caption_template="a digit {label}",
        image_size=16,
    )
    return _cfg(**fields | data)


def _captions(tfds_dir: str, **data) -> Config:
    """The fake captions set at 16 px (`data` overrides)."""
    fields = dict(
        source="tfds",
        tfds_name="tfx_fake_captions",
        tfds_data_dir=tfds_dir,
        caption_key="captions/text",
        image_size=16,
    )
    return _cfg(**fields | data)


# ---------------------------------------------------------------------------------------------
# source=tfds.
# ---------------------------------------------------------------------------------------------


def test_label_dataset_gives_template_captions_and_rgb_images(tfds_dir):
    cfg = _digits(tfds_dir)
    TFDS.build(cfg)
    assert TFDS.splits(cfg) == ("train", "validation")  # No validation split: test is used.
    train, validation = TFDS.open_split(cfg, "train"), TFDS.open_split(cfg, "validation")
    assert (len(train), len(validation)) == (6, 3)
    example = train[4]
    assert example["kind"] == "caption" and example["text"] == "a digit one"
    (image,) = example["images"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image[8, 8, 0] == 100 and image[0, 0, 0] == 0  # The digit's square, on black.
    assert [train[i]["text"] for i in range(3)] == [f"a digit {n}" for n in DIGIT_NAMES]
    with pytest.raises(IndexError):
        train[6]


def test_nested_caption_key_picks_one_caption_per_record(tfds_dir):
    cfg = _captions(tfds_dir)
    assert TFDS.splits(cfg) == ("train", "validation")
    train = TFDS.open_split(cfg, "train")
    # Record i has i + 1 captions; it uses caption i % (i + 1) = i.
    assert [train[i]["text"] for i in range(4)] == [f"train cap {i} {i}" for i in range(4)]
    image = train[2]["images"][0]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    # The centre crop dropped the red and blue borders; only the inner colour is left.
    assert (image.reshape(-1, 3) == (0, 20, 200)).all()
    with pytest.raises(sources.RecordError, match=r"tfx_fake_captions.*record 4.*captions/text"):
        train[4]  # No captions at all.
    assert TFDS.open_split(cfg, "validation")[1]["text"] == "val cap 1 1"


def test_split_mapping(tfds_dir):
    cfg = _digits(tfds_dir, tfds_splits="train=train[:4], validation=train[4:], heldout=test")
    assert TFDS.splits(cfg) == ("train", "validation", "heldout")
    lengths = [len(TFDS.open_split(cfg, split)) for split in sources.SPLITS]
    assert lengths == [4, 2, 3]
    assert TFDS.open_split(cfg, "validation")[0]["text"] == "a digit one"  # Record 4.

    only_train = _digits(tfds_dir, tfds_splits="train=train+test")
    assert TFDS.splits(only_train) == ("train",)
    assert len(TFDS.open_split(only_train, "train")) == 9
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \('train',\)"):
        TFDS.open_split(only_train, "validation")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("validation=test", "must map 'train'"),
        ("train=nope", r"has no split 'nope'; it has \['train', 'test'\]"),
        ("train", "must look like ours=theirs"),
        ("train=train,test=test", "split 'test' is not one of"),
        ("train=train,train=test", "split 'train' is given twice"),
    ],
)
def test_bad_split_mapping_names_the_setting(tfds_dir, spec, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        TFDS.splits(_digits(tfds_dir, tfds_splits=spec))
    assert "data.tfds_splits=" in str(error.value)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path, no_network):
    cfg = _cfg(source="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path), label_key="label")
    with pytest.raises(FileNotFoundError) as error:
        TFDS.build(cfg)
    message = str(error.value)
    assert f"not prepared in {tmp_path}" in message
    assert (
        f"tfds.builder('mnist', data_dir='{tmp_path}', file_format='array_record')"
        ".download_and_prepare()" in message
    )
    assert f"tfds build mnist --file_format=array_record --data_dir={tmp_path}" in message


def test_unknown_dataset_name(tmp_path, no_network):
    cfg = _cfg(source="tfds", tfds_name="fashion_mnistt", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="TFDS has no dataset 'fashion_mnistt'.*'fashion_mnist'"):
        TFDS.splits(cfg)


def test_dataset_not_in_array_record_format(tfds_dir, tmp_path):
    copy = tmp_path / "tfds"
    shutil.copytree(epath.Path(tfds_dir) / "tfx_fake_digits", copy / "tfx_fake_digits")
    info_path = copy / "tfx_fake_digits" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match=r"prepared as \['tfrecord'\].*needs array_record"):
        TFDS.build(_digits(str(copy)))


@pytest.mark.parametrize(
    "make, key, fragment",
    [
        (_digits, {"image_key": "img"}, r"data.image_key='img' is not a feature"),
        (_captions, {"caption_key": "captions/txt"}, r"data.caption_key='captions/txt' is not"),
        (_captions, {"caption_key": "captions/id"}, r"is a Tensor, not a Text feature"),
        (_digits, {"label_key": "image"}, r"data.label_key='image' .* is a Image, not"),
    ],
)
def test_bad_feature_key_lists_the_features(tfds_dir, make, key, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        TFDS.build(make(tfds_dir, **key))
    message = str(error.value)
    if make is _captions:
        assert "captions/text (Text)" in message and "captions/id (Tensor)" in message
    else:
        assert "image (Image)" in message and "label (ClassLabel)" in message


def _corpus(tfds_dir: str, **data) -> Config:
    fields = dict(source="tfds", tfds_name="tfx_fake_corpus", tfds_data_dir=tfds_dir)
    return _cfg(**fields | dict(text_key="text") | data)


def test_tfds_text_corpus_gives_text_documents_and_no_images(tfds_dir):
    cfg = _corpus(tfds_dir)
    source = sources.of(cfg)
    assert not source.has_images and TFDS.has_images  # bound to the config: a text corpus
    assert sources.of(_captions(tfds_dir)).has_images
    source.build(cfg)
    assert source.splits(cfg) == ("train", "validation")
    train = source.open_split(cfg, "train")
    assert len(train) == 8 and source.prompts(cfg, 3) == []
    assert train[0] == {
        "kind": "text",
        "text": "Document 0 says plain things.\n\nEnd 0.",
        "images": [],
    }
    assert train[3]["text"] == CORPUS_LONG
    with pytest.raises(sources.RecordError, match=r"tfx_fake_corpus.*record 5: empty text"):
        train[5]
    texts = list(source.texts(cfg, "train", limit=100))
    assert texts[3] == CORPUS_LONG and isinstance(texts[5], sources.RecordError)
    assert [t for i, t in enumerate(texts) if i != 5] == [
        train[i]["text"] for i in (0, 1, 2, 3, 4, 6, 7)
    ]
    assert re.fullmatch(r"tfds_tfx_fake_corpus_text_[0-9a-f]{8}", source.source_id(cfg))
    assert source.source_id(_corpus(tfds_dir, text_key="title")) != source.source_id(cfg)
    with pytest.raises(
        ValueError, match=r"data.text_key='image' is not a feature .* text \(Text\)"
    ):
        source.open_split(_corpus(tfds_dir, text_key="image"), "train")


def test_tfds_texts_refuse_what_training_refuses(tfds_dir, monkeypatch):
    """The tokenizer's texts of an image dataset come from the records as training reads them
    (the image decoded: one that fails to decode fails its caption too), so a too-small
    image's caption is refused as training refuses the example."""
    from tfx_jax.data.sources import tfds as tfds_module

    cfg = _captions(tfds_dir)
    prepare = tfds_module.prepare_image
    calls = []
    monkeypatch.setattr(
        tfds_module, "prepare_image", lambda *a, **k: calls.append(1) or prepare(*a, **k)
    )
    texts = list(TFDS.texts(cfg, "train", limit=10))
    assert len(calls) == len(texts)  # every image of the sample decoded, as encode decodes it
    monkeypatch.setattr(tfds_module, "prepare_image", prepare)
    assert texts[:4] == [f"train cap {i} {i}" for i in range(4)]
    assert isinstance(texts[4], sources.RecordError) and "no captions/text" in str(texts[4])
    big = list(TFDS.texts(_captions(tfds_dir, min_image_size=31), "train", limit=10))
    assert all(isinstance(t, sources.ImageTooSmallError) for t in big)  # 30 x 40 < 31
    # More examples than the limit: a seeded sample, in index order; max_examples bounds it.
    labels = _digits(tfds_dir)
    sample = list(TFDS.texts(labels, "train", limit=3, seed=1))
    assert sample == list(TFDS.texts(labels, "train", limit=3, seed=1)) and len(sample) == 3
    assert set(sample) <= {f"a digit {n}" for n in DIGIT_NAMES}
    assert sample_indices(6, 3, seed=1).tolist() == sorted(sample_indices(6, 3, seed=1).tolist())
    first = _digits(tfds_dir, max_examples=2)
    assert list(TFDS.texts(first, "train", limit=10)) == ["a digit zero", "a digit one"]
    assert len(TFDS.open_limited(first, "train")) == 2


class TfxFakeCutImages(tfds.core.GeneratorBasedBuilder):
    """4 train records of 30 x 40 images captioned "cut i"; record 2's PNG stops half way (its
    header parses, its pixels do not decode)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, image=tfds.features.Image(shape=(30, 40, 3)), text=tfds.features.Text())

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
        for i in range(4):
            data = _png(noise if i == 2 else _wide(i))
            yield i, {"image": data[: len(data) // 2] if i == 2 else data, "text": f"cut {i}"}


def test_tfds_image_whose_pixels_are_corrupt_gives_no_tokenizer_text(tmp_path):
    """A record whose image header parses but whose pixels do not decode: refused by the
    examples encode and the VAE read, and by the tokenizer's texts alike."""
    TfxFakeCutImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _cfg(source="tfds", tfds_name="tfx_fake_cut_images", tfds_data_dir=str(tmp_path),
               caption_key="text", image_size=16, tfds_splits="train=train")  # fmt: skip
    train = TFDS.open_split(cfg, "train")
    with pytest.raises(sources.RecordError, match="record 2"):
        train[2]
    texts = list(TFDS.texts(cfg, "train", limit=10))
    assert texts[:2] == ["cut 0", "cut 1"] and texts[3] == "cut 3"
    assert isinstance(texts[2], sources.RecordError) and "record 2" in str(texts[2])


def test_tfds_source_pickles(tfds_dir):
    source = TFDS.open_split(_captions(tfds_dir), "validation")
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == 2 and copy[1]["text"] == source[1]["text"]
    np.testing.assert_array_equal(copy[1]["images"][0], source[1]["images"][0])


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------


def test_images_become_rgb_squares():
    """`prepare_image`, the one preparation (every mode: tests/test_data_errors.py)."""
    rgba = np.zeros((8, 12, 4), np.uint8)  # Fully transparent black: composited onto white.
    out = images.prepare_image(images.array_to_image(rgba), 4)
    assert out.shape == (4, 4, 3) and (out == 255).all()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = images.prepare_image(images.array_to_image(grey), 8)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=-1))
    tall = np.zeros((20, 10, 3), np.uint8)
    tall[:5], tall[15:], tall[5:15] = 255, 255, (1, 2, 3)
    assert (images.prepare_image(Image.fromarray(tall), 5).reshape(-1, 3) == (1, 2, 3)).all()
    with pytest.raises(sources.ImageTooSmallError, match="3x2 pixels is smaller"):
        images.prepare_image(Image.new("RGB", (3, 2)), 8, min_size=4, name="x")


# ---------------------------------------------------------------------------------------------
# source=folder.
# ---------------------------------------------------------------------------------------------


def _save_image(path, size=(12, 10), mode="RGB", color=(10, 20, 30), caption="a caption"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "L" else color[0]).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"  {caption}\n")


def _is_validation(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % 100 < 5


def test_folder_split_by_file_name_hash(tmp_path):
    names = [f"{d}/img{i}.{ext}" for i in range(40) for d, ext in [("a", "png"), ("b/c", "jpg")]]
    for i, name in enumerate(names):
        _save_image(tmp_path / name, caption=f"caption {name}", color=(i, 2 * i, 3 * i))
    _save_image(tmp_path / ".hidden" / "x.png")  # Hidden: ignored.
    (tmp_path / "notes.md").write_text("not an image")
    expected = {"train": [], "validation": []}
    for name in sorted(names):
        expected["validation" if _is_validation(name) else "train"].append(name)
    assert expected["validation"] and expected["train"]  # Both splits are exercised.

    cfg = _cfg(source="folder", path=str(tmp_path), image_size=8)
    FOLDER.build(cfg)
    assert FOLDER.splits(cfg) == ("train", "validation")
    for split, files in expected.items():
        source = FOLDER.open_split(cfg, split)
        assert len(source) == len(files)
        texts = [source[i]["text"] for i in range(len(source))]
        assert texts == [f"caption {name}" for name in files]
    example = FOLDER.open_split(cfg, "validation")[0]
    assert example["kind"] == "caption" and example["images"][0].shape == (8, 8, 3)
    assert FOLDER.prompts(cfg, 3) == [f"caption {n}" for n in expected["validation"] * 3][:3]


def test_folder_with_split_directories(tmp_path):
    _save_image(tmp_path / "train" / "a.png", caption="first")
    _save_image(tmp_path / "train" / "sub" / "b.jpeg", size=(40, 20), caption="second")
    _save_image(tmp_path / "train" / "c.gif", mode="P", caption="third")
    _save_image(tmp_path / "train" / "d.webp", mode="L", caption="fourth")
    _save_image(tmp_path / "validation" / "e.bmp", caption="held")
    cfg = _cfg(source="folder", path=str(tmp_path), image_size=8)
    assert FOLDER.splits(cfg) == ("train", "validation")
    train = FOLDER.open_split(cfg, "train")
    assert [train[i]["text"] for i in range(len(train))] == ["first", "third", "fourth", "second"]
    for i in range(len(train)):
        image = train[i]["images"][0]
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert FOLDER.open_split(cfg, "validation")[0]["text"] == "held"
    assert FOLDER.prompts(cfg, 2) == ["held", "held"]

    # Without a validation directory there is only train.
    shutil.rmtree(tmp_path / "validation")
    assert FOLDER.splits(cfg) == ("train",)
    assert FOLDER.prompts(cfg, 2) == ["first", "third"]


def test_folder_bad_records_raise_record_errors(tmp_path):
    _save_image(tmp_path / "train" / "a.png")
    (tmp_path / "train" / "b.png").write_bytes(b"not a png")
    (tmp_path / "train" / "b.txt").write_text("caption of a broken image")
    _save_image(tmp_path / "train" / "c.png", caption=None)
    _save_image(tmp_path / "train" / "d.png", caption="   ")
    train = FOLDER.open_split(_cfg(source="folder", path=str(tmp_path)), "train")
    assert train[0]["text"] == "a caption"
    with pytest.raises(sources.RecordError, match=r"b\.png: cannot decode the image"):
        train[1]
    with pytest.raises(sources.RecordError, match=r"c\.png: no caption file c\.txt"):
        train[2]
    with pytest.raises(sources.RecordError, match=r"d\.png: its caption file d\.txt is empty"):
        train[3]


def test_folder_texts_refuse_what_training_refuses(tmp_path):
    """The tokenizer's captions refuse the examples training refuses (undecodable, too small,
    uncaptioned): they are read through the same examples (tests/test_data_errors.py: an image
    whose header parses but whose pixels do not)."""
    _save_image(tmp_path / "a.png", caption="first")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("caption of a broken image")
    _save_image(tmp_path / "c.png", caption=None)
    _save_image(tmp_path / "d.png", size=(2, 2), caption="too small")
    _save_image(tmp_path / "e.png", caption="last")
    cfg = _cfg(source="folder", path=str(tmp_path), image_size=16)
    train = FOLDER.open_split(cfg, "train")
    want = []
    for i in range(len(train)):
        try:
            want.append(train[i]["text"])
        except sources.RecordError as e:
            want.append(type(e))
    got = [t if isinstance(t, str) else type(t) for t in FOLDER.texts(cfg, "train", limit=9)]
    assert got == want == ["first", sources.RecordError, sources.RecordError,
                           sources.ImageTooSmallError, "last"]  # fmt: skip
    assert list(FOLDER.texts(_cfg(source="folder", path=str(tmp_path), max_examples=1),
                             "train", limit=9)) == ["first"]  # fmt: skip


def test_folder_build_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FOLDER.build(_cfg(source="folder", path=str(tmp_path / "missing")))
    (tmp_path / "a.txt").write_text("a caption without an image")
    with pytest.raises(FileNotFoundError, match="has no training images"):
        FOLDER.build(_cfg(source="folder", path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# source=text.
# ---------------------------------------------------------------------------------------------


def test_cut_documents_groups_paragraphs():
    paragraphs = ["a" * 900, "b" * 900, "c" * 900, "d" * 2500, "    indented\n  code", "e"]
    text = "\n\n".join(paragraphs[:3]) + "\n \n\n" + "\n\n".join(paragraphs[3:]) + "\n"
    documents = text_source.cut_documents(text)
    assert documents == [
        "a" * 900 + "\n\n" + "b" * 900,
        "c" * 900,
        "d" * 2500,  # A long paragraph stays whole.
        "    indented\n  code\n\ne",
    ]
    assert text_source.cut_documents("\n \n") == []


def test_text_source(tmp_path):
    names = [f"dir{i % 3}/file{i}.{'md' if i % 2 else 'txt'}" for i in range(60)]
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name} one{'.' * 80}\n\n{'x' * 1950}\n\n{name} three\n")
    (tmp_path / "dir0" / "skip.rst").write_text("not a text suffix")
    expected = {"train": [], "validation": []}
    for name in sorted(names):
        expected["validation" if _is_validation(name) else "train"].append(name)
    assert expected["validation"] and expected["train"]

    cfg = _cfg(source="text", path=str(tmp_path))
    TEXT.build(cfg)
    assert TEXT.splits(cfg) == ("train", "validation")
    assert TEXT.prompts(cfg, 4) == []
    for split, files in expected.items():
        source = TEXT.open_split(cfg, split)
        assert len(source) == 2 * len(files)  # "one" alone (+ x would pass 2000), x + "three".
        one = f"{files[0]} one{'.' * 80}"
        assert source[0] == {"kind": "text", "text": one, "images": []}
        assert source[3]["text"] == "x" * 1950 + f"\n\n{files[1]} three"
        copy = pickle.loads(pickle.dumps(source))
        assert copy[len(copy) - 1] == source[-1]

    glob = _cfg(source="text", path=f"{tmp_path}/dir1/*.md")
    in_dir1 = [n for n in sorted(names) if n.startswith("dir1/") and n.endswith(".md")]
    total = sum(len(TEXT.open_split(glob, split)) for split in TEXT.splits(glob))
    assert total == 2 * len(in_dir1)


def test_text_texts_sample_whole_files_and_max_examples_reads_only_what_it_needs(
    tmp_path, monkeypatch
):
    for i in range(20):  # 3 documents per file (a paragraph of ~1500 characters each)
        (tmp_path / f"f{i:02d}.txt").write_text(
            "\n\n".join(f"{i}-{j} " + "y" * 1500 for j in range(3))
        )
    cfg = _cfg(source="text", path=str(tmp_path))
    train = TEXT.open_split(cfg, "train")
    everything = [train[i]["text"] for i in range(len(train))]
    assert list(TEXT.texts(cfg, "train", limit=10_000)) == everything  # all, in order
    sample = list(TEXT.texts(cfg, "train", limit=7, seed=3))
    assert len(sample) == 7 and sample == list(TEXT.texts(cfg, "train", limit=7, seed=3))
    assert [everything.index(t) for t in sample] == sorted(everything.index(t) for t in sample)
    files = {t.split("-")[0] for t in sample}
    assert len(files) == 3 and sample != everything[:7]  # 2 whole files + 1 document of a third
    # max_examples: the first documents, reading only the files that hold them.
    read = []
    real = text_source.cut_documents
    monkeypatch.setattr(text_source, "cut_documents", lambda t: read.append(t) or real(t))
    first = TEXT.open_limited(_cfg(source="text", path=str(tmp_path), max_examples=4), "train")
    assert [first[i]["text"] for i in range(len(first))] == everything[:4] and len(read) == 2
    with pytest.raises(IndexError):
        first[4]


def test_text_source_bad_file(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nsecond")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "c.txt").write_text("third")
    assert not any(_is_validation(name) for name in ("a.txt", "b.txt", "c.txt"))
    train = TEXT.open_split(_cfg(source="text", path=str(tmp_path / "*.txt")), "train")
    assert len(train) == 3  # The undecodable file keeps one slot, which raises.
    assert [train[i]["text"] for i in (0, 2)] == ["first\n\nsecond", "third"]
    with pytest.raises(sources.RecordError, match=r"b\.txt: not UTF-8"):
        train[1]


# ---------------------------------------------------------------------------------------------
# source_id and prompts.
# ---------------------------------------------------------------------------------------------


def test_source_id_is_safe_and_changes_with_settings(tfds_dir):
    base = _digits(tfds_dir)
    variants = [
        base,
        _digits(tfds_dir, caption_template="a photo of {label}"),
        _digits(tfds_dir, image_size=32),
        _digits(tfds_dir, tfds_splits="train=train"),
        _digits(tfds_dir, tfds_name="mnist:3.0.1"),
        _captions(tfds_dir),
        _cfg(source="folder", path="/data/imgs"),
        _cfg(source="folder", path="gs://bucket/data/imgs/"),
        _cfg(source="folder", path="/data/imgs", image_size=64),
        _cfg(source="text", path="/data/corpus"),
        _cfg(source="text", path="/data/corpus/*.md"),
    ]
    ids = [sources.of(cfg).source_id(cfg) for cfg in variants]
    assert len(set(ids)) == len(ids), ids
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids), ids
    assert re.fullmatch(r"tfds_tfx_fake_digits_16px_[0-9a-f]{8}", ids[0])
    assert ids[6] == f"folder_imgs_{zlib.crc32(b'/data/imgs'):08x}_32px"
    assert ids[9] == f"text_corpus_{zlib.crc32(b'/data/corpus'):08x}"
    # The data directory is where a dataset is, not what it holds.
    assert TFDS.source_id(_digits(tfds_dir + "/other")) == ids[0]


def test_prompts(tfds_dir):
    assert TFDS.prompts(_digits(tfds_dir), 4) == [
        "a digit zero",
        "a digit one",
        "a digit two",
        "a digit zero",
    ]
    assert TFDS.prompts(_captions(tfds_dir), 3) == ["val cap 0 0", "val cap 1 1", "val cap 0 0"]
    assert len(sources.get("shapes").prompts(_cfg(source="shapes"), 5)) == 5


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------


def test_registry_names_the_choices_and_knows_each_source():
    assert set(sources.names()) == {"synthetic", "shapes", "tfds", "folder", "text", "mixture"}
    with pytest.raises(sources.DataConfigError, match=r"data.source='tfsd': use one of folder \|"):
        sources.get("tfsd")
    assert [n for n in sources.names() if sources.get(n).has_images] == ["folder", "shapes", "tfds"]
    assert [n for n in sources.names() if sources.get(n).makes_batches] == ["synthetic"]
    judged = [n for n in sources.names() if n != "mixture" and sources.get(n).judge(_cfg(source=n))]
    assert judged == ["shapes"]
    with pytest.raises(ValueError, match=r"'synthetic' has no files \(use folder, mixture, shapes"):
        sources.get("synthetic").build(_cfg(source="synthetic"))


def test_a_new_source_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(sources.base, "_REGISTRY", dict(sources.base._REGISTRY))

    @sources.register
    class Letters(sources.Source):
        name = "letters"

        def splits(self, cfg):
            return ("train",)

        def open_split(self, cfg, split):
            return [{"kind": "text", "text": c, "images": []} for c in "abc"]

    assert isinstance(sources.get("letters"), Letters)
    assert sources.of(_cfg(source="letters")).prompts(_cfg(source="letters"), 4) == list("abca")
    with pytest.raises(ValueError, match="name 'letters' is empty or taken"):
        sources.register(Letters)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.source=nope"], "data.source='nope': use one of"),
        (["data.source=tfds"], "data.source=tfds needs data.tfds_name"),
        (["data.source=tfds", "data.tfds_name=mnist"], "needs exactly one of data.caption_key"),
        (["data.source=folder"], "data.source=folder needs data.path"),
        (["data.source=text"], "data.source=text needs data.path"),
        (["data.source=shapes", "data.image_size=64"], "data.image_size=64 / vae.downsample=4"),
        (["data.overlong=wrap"], "data.overlong='wrap': split | truncate | drop"),
        (
            ["data.source=tfds", "data.tfds_name=wiki", "data.text_key=text", "data.label_key=l"],
            "data.text_key='text' makes data.source=tfds a text corpus: leave",
        ),
        (["data.tokenizer_sample=0"], "data.tokenizer_sample=0 must be > 0"),
        (["data.max_examples=-1"], "data.max_examples=-1 must be >= 1 when set"),
        (["data.encode_shard_size=0"], "data.encode_shard_size=0 must be > 0"),
    ],
)
def test_config_validation_asks_the_source(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validate(tiny_config(overrides=overrides), num_devices=8)
    # Sources without images leave the VAE's geometry alone.
    for source in ("synthetic", "text"):
        settings = [f"data.source={source}", "data.path=x", "data.image_size=64"]
        validate(tiny_config(overrides=settings), num_devices=8)


def test_synthetic_batches_come_from_the_config_and_are_global(tiny_config):
    cfg = tiny_config()
    it = sources.of(cfg).batches(cfg, "train")
    assert sources.of(cfg).position_is_global  # the contract is declared on the Source
    first = next(it)
    assert first["tokens"].shape == (8, 128) and first["patches"].shape == (8, 128, 16)
    state = it.get_state()
    second = next(it)
    # Two processes' rows of a global batch are the rows of the one-process batch.
    halves = [SyntheticIterator(cfg, cfg.data.seed, i, 2) for i in range(2)]
    for half in halves:
        half.set_state(state)
    np.testing.assert_array_equal(
        np.concatenate([next(h)["tokens"] for h in halves]), second["tokens"]
    )
    held_out = next(sources.of(cfg).batches(cfg, "validation"))
    assert not np.array_equal(held_out["tokens"], first["tokens"])
