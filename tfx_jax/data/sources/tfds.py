"""source=tfds: any TFDS dataset prepared in ArrayRecord format, read with TFDS's random-access
data source and never downloaded.

The dataset is `data.tfds_name`, prepared under `data.tfds_data_dir` (default
`<data_dir>/tfds`). `data.image_key` names the image; exactly one of `data.caption_key` (text,
or a list of texts of which record i uses text i % n) and `data.label_key` (a ClassLabel, put
through `data.caption_template`) names the caption. `data.tfds_splits` maps our splits to the
dataset's ("train=train,validation=test"; default: train, and validation or else test).
Images go through `images.prepare_image` (RGB, alpha on white, centre crop, resize to
`data.image_size`; smaller than `data.min_image_size` on a side: skipped as too small).

A text corpus (wikipedia, c4, ...) is `data.text_key` instead: a text feature (or a sequence of
them) whose record is one document; the source then has no images (`bind`: no VAE, no latents).
The tokenizer's text (`Tfds.texts`, a bounded sample) is read from the records as training
reads them, image decoded, so the same records are refused (unreadable, too small).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfx_jax.data.embedded import builders  # noqa: F401  (its import drops TFDS's OpenCV hint)
from tfx_jax.data.sources.base import (
    SPLITS,
    DataConfigError,
    RecordError,
    Source,
    check_split,
    checked_index,
    crc_hex,
    register,
    safe_name,
    sampled_texts,
)
from tfx_jax.data.sources.images import array_to_image, prepare_image

if TYPE_CHECKING:
    from tfx_jax.data.config import DataConfig, RunConfig


@register
class Tfds(Source):
    name = "tfds"
    has_images = True

    def bind(self, cfg: RunConfig) -> Source:
        """A text corpus (`data.text_key`) has no images: no VAE, no latents."""
        return _TEXT_ONLY if cfg.data.text_key else self

    def validate(self, cfg: RunConfig) -> None:
        d = cfg.data
        if not d.tfds_name:
            raise DataConfigError(
                "data.source=tfds needs data.tfds_name (e.g. mnist, cifar10, coco_captions)."
            )
        if d.text_key:
            if d.caption_key or d.label_key:
                raise DataConfigError(
                    f"data.text_key={d.text_key!r} makes data.source=tfds a text corpus: leave "
                    f"data.caption_key ({d.caption_key!r}) and data.label_key "
                    f"({d.label_key!r}) empty."
                )
            return
        if bool(d.caption_key) == bool(d.label_key):
            raise DataConfigError(
                "data.source=tfds needs exactly one of data.caption_key (a text feature) and "
                f"data.label_key (a ClassLabel feature); got caption_key={d.caption_key!r}, "
                f"label_key={d.label_key!r}."
            )

    def source_id(self, cfg: RunConfig) -> str:
        d = cfg.data
        if d.text_key:
            fields = (d.text_key, d.tfds_splits)
            return f"tfds_{safe_name(d.tfds_name)}_text_{crc_hex(repr(fields))}"
        fields = (d.image_key, d.caption_key, d.label_key, d.caption_template, d.tfds_splits)
        return f"tfds_{safe_name(d.tfds_name)}_{d.image_size}px_{crc_hex(repr(fields))}"

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in _tfds_split_map(cfg.data, _tfds_builder(cfg.data)))

    def build(self, cfg: RunConfig) -> None:
        builder = _tfds_builder(cfg.data)
        _tfds_fields(cfg.data, builder)
        split_map = _tfds_split_map(cfg.data, builder)
        counts = ", ".join(
            f"{ours} = {theirs} ({len(builder.as_data_source(theirs))} records)"
            for ours, theirs in split_map.items()
        )
        print(f"TFDS {builder.info.full_name} in {builder.data_dir}: {counts}")

    def open_split(self, cfg: RunConfig, split: str) -> Sequence[dict]:
        builder = _tfds_builder(cfg.data)
        fields = _tfds_fields(cfg.data, builder)
        split_map = _tfds_split_map(cfg.data, builder)
        check_split(cfg.data, split, split_map)
        name = f"{builder.info.full_name}[{split_map[split]}]"
        return TfdsExamples(builder.as_data_source(split_map[split]), fields, name)

    def texts(
        self, cfg: RunConfig, split: str, limit: int, seed: int = 0
    ) -> Iterator[str | RecordError]:
        """Captions (or documents) of a sample of `split`. A caption comes from the record as
        training reads it, image decoded (`TfdsExamples`; the sample is bounded), so a record
        is refused (unreadable, too small) exactly when encode and the VAE refuse it. A text
        corpus's documents are read alone (it has no images)."""
        builder = _tfds_builder(cfg.data)
        fields = _tfds_fields(cfg.data, builder)
        if not fields.text_key:
            return super().texts(cfg, split, limit, seed)
        split_map = _tfds_split_map(cfg.data, builder)
        check_split(cfg.data, split, split_map)
        source = builder.as_data_source(split_map[split])
        name = f"{builder.info.full_name}[{split_map[split]}]"
        n = len(source)
        if cfg.data.max_examples:
            n = min(n, cfg.data.max_examples)
        return sampled_texts(_TfdsTexts(source, fields, name, n), limit, seed)

    def prompts(self, cfg: RunConfig, num: int, seed: int = 0) -> list[str]:
        """Class names through `data.caption_template` for labelled data, else the captions of
        the first validation (else train) examples (none for a text corpus: nothing to draw)."""
        if cfg.data.text_key:
            return []
        fields = _tfds_fields(cfg.data, _tfds_builder(cfg.data))
        if fields.label_names:
            names = fields.label_names
            return [
                fields.template.format(label=names[(seed + i) % len(names)]) for i in range(num)
            ]
        return super().prompts(cfg, num, seed)


class _TfdsText(Tfds):
    """`source=tfds` bound to a text corpus (`data.text_key`): the same source without images.
    Not registered: `Tfds.bind` returns it."""

    has_images = False


_TEXT_ONLY = _TfdsText()


def _tfds_data_dir(d: DataConfig) -> str:
    return d.tfds_data_dir or str(epath.Path(d.data_dir) / "tfds")


def _prepare_command(name: str, data_dir: str) -> str:
    return (
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"\n"
        f"or\n  tfds build {name} --file_format=array_record --data_dir={data_dir}"
    )


def _tfds_builder(d: DataConfig):
    """The prepared dataset's read-only builder (from its dataset_info.json and features.json).

    Loading from files rather than the registered builder class never downloads anything,
    works for datasets whose builder code needs TensorFlow (coco_captions) or is not
    installed, and pickles by directory for Grain worker processes.
    """
    name = d.tfds_name
    data_dir = _tfds_data_dir(d)
    if not name:
        raise ValueError("data.source=tfds needs data.tfds_name (e.g. mnist, cifar10).")
    try:
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        _check_known_tfds_name(name, data_dir)
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (data.tfds_name) is not prepared in {data_dir} "
            f"({'data.tfds_data_dir' if d.tfds_data_dir else '<data.data_dir>/tfds'})."
            " Nothing is downloaded here. On a machine with internet access (and TensorFlow, "
            "which many TFDS builders need to prepare), run\n"
            f"{_prepare_command(name, data_dir)}\n"
            f"then copy that directory's contents to {data_dir} on this machine."
        ) from None
    random_access = tfds.core.FileFormat.with_random_access()
    formats = builder.info.available_file_formats()
    if not formats & random_access:
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
            f"{sorted(f.value for f in formats)}, but random access needs array_record. "
            f"Prepare it again into another directory (or delete {builder.data_dir} first):\n"
            f"{_prepare_command(name, data_dir)}"
        )
    return builder


def _check_known_tfds_name(name: str, data_dir: str) -> None:
    """Raises a ValueError if TFDS has no builder called `name` (nothing prepared either)."""
    dataset, _ = tfds.core.naming.parse_builder_name_kwargs(name)
    if dataset.namespace:  # Community datasets: cannot be checked offline.
        return
    try:
        tfds.builder_cls(dataset.name)
    except tfds.core.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(dataset.name, known, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"data.tfds_name={name!r}: TFDS has no dataset {dataset.name!r} and none is "
            f"prepared in {data_dir}.{hint} (tfds.list_builders() lists the known names.)"
        ) from None


def _feature_paths(features, prefix: str = "") -> dict[str, Any]:
    """Every leaf feature by its "/" path ("captions/text"), looking through Sequence wrappers
    (whose decoded value is a dict of lists, so the same path walks the decoded record)."""
    paths = {}
    for key, feature in features.items():
        inner = feature
        while isinstance(inner, tfds.features.Sequence):
            inner = inner.feature
        if isinstance(inner, tfds.features.FeaturesDict):
            paths.update(_feature_paths(inner, f"{prefix}{key}/"))
        else:
            paths[f"{prefix}{key}"] = feature
    return paths


def _leaf(feature):
    """(the feature inside any Sequence wrappers, whether it was wrapped)."""
    inner = feature
    while isinstance(inner, tfds.features.Sequence):
        inner = inner.feature
    return inner, inner is not feature


def _scalar_kind(feature) -> str:
    """numpy's dtype kind of a scalar feature ("i"/"u" integer, "O"/"S"/"U" text), else ""
    (an Image has a uint8 dtype too, but a shape)."""
    dtype = getattr(feature, "np_dtype", None)
    if dtype is None or tuple(getattr(feature, "shape", (None,))) != ():
        return ""
    return np.dtype(dtype).kind


def _is_text(feature) -> bool:
    return _scalar_kind(feature) in tuple("OSU")


def _is_int(feature) -> bool:
    return _scalar_kind(feature) in tuple("iu")


@dataclasses.dataclass(frozen=True)
class TfdsFields:
    """How a TFDS record maps to a caption example (picklable, for Grain workers).

    Attributes:
      image_key: "/" path of the image feature.
      caption_key: "/" path of a text feature (or list of texts), or "".
      label_key: "/" path of a label feature, or "".
      template: `data.caption_template`, applied to the label.
      label_names: the ClassLabel's names; () for a plain integer or text label.
      image_size: S.
      min_image_size: the smallest accepted shorter side (`data.min_image_side`).
      text_key: "/" path of a text feature (or sequence of them) of a text corpus, or "": the
        records are then text documents and the other keys are unused.
    """

    image_key: str
    caption_key: str
    label_key: str
    template: str
    label_names: tuple[str, ...]
    image_size: int
    min_image_size: int = 1
    text_key: str = ""


def _tfds_fields(d: DataConfig, builder) -> TfdsFields:
    """Checks data.image_key / caption_key / label_key (or text_key) against the dataset's
    features."""
    name = builder.info.full_name
    paths = _feature_paths(builder.info.features)
    listing = ", ".join(f"{path} ({type(_leaf(f)[0]).__name__})" for path, f in paths.items())

    def feature(setting: str, key: str, what: str, ok: Callable[[Any], bool]):
        if key not in paths:
            raise ValueError(
                f"data.{setting}={key!r} is not a feature of TFDS dataset {name}; its features "
                f"are: {listing}. Set data.{setting} to {what}."
            )
        leaf, _ = _leaf(paths[key])
        if not ok(leaf):
            raise ValueError(
                f"data.{setting}={key!r} of TFDS dataset {name} is a {type(leaf).__name__}, "
                f"not {what}; its features are: {listing}."
            )
        return paths[key]

    if d.text_key:
        feature("text_key", d.text_key, "a Text feature (or a sequence of them)", _is_text)
        return TfdsFields(
            image_key="",
            caption_key="",
            label_key="",
            template=d.caption_template,
            label_names=(),
            image_size=d.image_size,
            text_key=d.text_key,
        )
    if bool(d.caption_key) == bool(d.label_key):
        raise ValueError(
            "data.source=tfds needs exactly one of data.caption_key (a text feature) and "
            f"data.label_key (a ClassLabel feature); got caption_key={d.caption_key!r}, "
            f"label_key={d.label_key!r}. Features of {name}: {listing}."
        )
    image = feature("image_key", d.image_key, "an Image feature", _is_image)
    if _leaf(image)[1]:
        raise ValueError(
            f"data.image_key={d.image_key!r} of TFDS dataset {name} is a sequence of images; "
            "only datasets with one image per record are supported."
        )
    label_names: tuple[str, ...] = ()
    if d.caption_key:
        feature("caption_key", d.caption_key, "a Text feature (or a sequence of them)", _is_text)
    else:
        label = feature(
            "label_key",
            d.label_key,
            "a ClassLabel (or integer or text) feature",
            lambda f: _is_int(f) or _is_text(f),
        )
        if isinstance(label, tfds.features.ClassLabel) and label.names:
            label_names = tuple(label.names)
    return TfdsFields(
        image_key=d.image_key,
        caption_key=d.caption_key,
        label_key=d.label_key,
        template=d.caption_template,
        label_names=label_names,
        image_size=d.image_size,
        min_image_size=d.min_image_side,
    )


def _is_image(feature) -> bool:
    return isinstance(feature, tfds.features.Image)


def _split_bases(split: str) -> list[str]:
    """Dataset split names in a TFDS split expression ("train[:90%]+test" -> train, test)."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _tfds_split_map(d: DataConfig, builder) -> dict[str, str]:
    """Our split name -> the dataset's split (expression), from data.tfds_splits or the
    default train -> train, validation -> validation (or test)."""
    available = list(builder.info.splits)
    name = builder.info.full_name
    spec = d.tfds_splits.strip()
    if not spec:
        if "train" not in available:
            raise ValueError(
                f"TFDS dataset {name} has no 'train' split (it has {available}); map one with "
                f"data.tfds_splits, e.g. 'train={available[0] if available else 'NAME'}'."
            )
        mapping = {"train": "train"}
        held = next((s for s in ("validation", "test") if s in available), None)
        if held:
            mapping["validation"] = held
        return mapping
    mapping = {}
    for item in spec.split(","):
        ours, sep, theirs = (part.strip() for part in item.partition("="))
        if not sep or not ours or not theirs:
            raise ValueError(
                f"data.tfds_splits={spec!r}: {item.strip()!r} must look like ours=theirs, "
                "e.g. 'train=train,validation=test'."
            )
        if ours not in SPLITS or ours in mapping:
            problem = "is given twice" if ours in mapping else f"is not one of {SPLITS}"
            raise ValueError(f"data.tfds_splits={spec!r}: split {ours!r} {problem}.")
        missing = [base for base in _split_bases(theirs) if base not in available]
        if missing:
            raise ValueError(
                f"data.tfds_splits={spec!r}: TFDS dataset {name} has no split "
                f"{missing[0]!r}; it has {available}."
            )
        mapping[ours] = theirs
    if "train" not in mapping:
        raise ValueError(f"data.tfds_splits={spec!r} must map 'train', e.g. 'train=train'.")
    return mapping


def _lookup(record: dict, path: str) -> Any:
    value = record
    for key in path.split("/"):
        value = value[key]
    return value


def _to_text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsExamples:
    """Random-access caption examples from a TFDS data source (what Grain's
    `MapDataset.source` takes): one image, and a caption from a text or label feature."""

    def __init__(self, source: Sequence[dict], fields: TfdsFields, name: str):
        self._source = source
        self._fields = fields
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = checked_index(index, len(self))
        if self._fields.text_key:
            return {
                "kind": "text",
                "text": _document(self._source, index, self._fields, self._name),
                "images": [],
            }
        try:
            record = self._source[index]
            image = prepare_image(
                array_to_image(_lookup(record, self._fields.image_key)),
                self._fields.image_size,
                min_size=self._fields.min_image_size,
                name=f"{self._name} record {index}",
            )
            text = _caption(record, index, self._fields, self._name)
        except RecordError:
            raise
        except Exception as e:  # Any decoding failure is this record's, not the run's.
            raise RecordError(f"{self._name} record {index}: {type(e).__name__}: {e}") from e
        return {"kind": "caption", "text": text, "images": [image]}

    def __repr__(self) -> str:
        return f"TfdsExamples({self._name}, {len(self)} records)"


class _TfdsTexts:
    """The document of each of the first `n` records of a text corpus (`Tfds.texts`)."""

    def __init__(self, source: Sequence[dict], fields: TfdsFields, name: str, n: int):
        self._source, self._fields, self._name, self._n = source, fields, name, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> str:
        return _document(self._source, checked_index(index, self._n), self._fields, self._name)


def _document(source: Sequence[dict], index: int, f: TfdsFields, name: str) -> str:
    """Record `index` of a text corpus: its `text_key` text, or its texts joined by blank lines."""
    try:
        value = _lookup(source[index], f.text_key)
    except Exception as e:
        raise RecordError(f"{name} record {index}: {type(e).__name__}: {e}") from e
    if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
        text = "\n\n".join(_to_text(v).strip() for v in value)
    else:
        text = _to_text(value)
    if not text.strip():
        raise RecordError(f"{name} record {index}: empty {f.text_key}")
    return text


def _caption(record: dict, index: int, f: TfdsFields, name: str) -> str:
    if f.caption_key:
        value = _lookup(record, f.caption_key)
        if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
            if not len(value):
                raise RecordError(f"{name} record {index}: no {f.caption_key} texts")
            value = value[index % len(value)]  # Deterministic, and spread over the list.
        caption = _to_text(value).strip()
        if not caption:
            raise RecordError(f"{name} record {index}: empty {f.caption_key}")
        return caption
    value = _lookup(record, f.label_key)
    label = f.label_names[int(value)] if f.label_names else _to_text(value)
    return f.template.format(label=label)
