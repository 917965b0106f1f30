"""Where examples come from: one interface over every `data.source` that has files.

Every source gives, per split, a random-access sequence of *raw examples*

    {"kind": "caption" | "interleaved" | "text",
     "text": str,                       # interleaved text marks images with "<image>"
     "images": list of uint8 [S, S, 3]} # S = data.image_size; [] for text documents

which the `data encode` stage turns, once, into token ids and VAE latents
(`tfx_jax.data.encoded`). `__getitem__` raises `RecordError` (naming the record or file) for
an example that cannot be decoded; the encode stage skips and counts it, or fails, by
`data.on_error`.

Sources:

  shapes  the embedded `tfx_shapes` TFDS dataset (`tfx_jax.data.embedded.builders`), built locally.
  tfds    any TFDS dataset prepared in ArrayRecord format under `data.tfds_data_dir` (default
          `<data_dir>/tfds`), read with TFDS's random-access data source and never downloaded.
          `data.image_key` names the image; exactly one of `data.caption_key` (text, or a list
          of texts of which record i uses text i % n) and `data.label_key` (a ClassLabel, put
          through `data.caption_template`) names the caption. `data.tfds_splits` maps our
          splits to the dataset's ("train=train,validation=test"; default: train, and
          validation or else test).
  folder  images under `data.path` with a same-name .txt caption beside each; `path/train`
          and `path/validation` if `path/train` exists, else 5% of files (by a hash of their
          relative path) for validation.
  text    UTF-8 .txt/.md files under `data.path` (or matching a glob), cut into documents of
          up to ~2000 characters at blank lines; 5% of files (by hash) for validation.

Images from tfds and folder are made RGB (grey repeated, alpha composited onto white),
centre-cropped to a square and resized to S x S with Pillow's Lanczos filter.

What is made from a source (tokenizer, VAE, encoded records) lives under `data.data_dir`
(`tfx_jax.data.prepare`); each records the `source_id` it was made from, so switching sources
in one data_dir rebuilds them instead of reusing stale ones.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import io
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from tfx_jax.config import IMAGE_SOURCES, Config

SPLITS = ("train", "validation", "heldout")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEXT_SUFFIXES = (".txt", ".md")
VALIDATION_PERCENT = 5  # folder/text without split directories: crc32(rel path) % 100 < this
DOCUMENT_CHARS = 2000  # text source: paragraphs are grouped into documents up to this size
_GLOB_CHARS = "*?["


class RecordError(ValueError):
    """An example that cannot be decoded (the message names the record or file)."""


def has_images(cfg: Config) -> bool:
    """Whether the source has images (and so needs the VAE and latents)."""
    return cfg.data.source in IMAGE_SOURCES


def source_id(cfg: Config) -> str:
    """A file-name-safe name for the source's settings (the artifact directory's name).

    Everything that changes the examples is in it (directly or through a short hash), so a
    tokenizer or encoded records made for other settings are never reused by mistake.
    """
    d = cfg.data
    if d.source == "shapes":
        return f"shapes_{d.tfds_config}_{d.image_size}px"
    if d.source == "tfds":
        fields = (d.image_key, d.caption_key, d.label_key, d.caption_template, d.tfds_splits)
        return f"tfds_{_safe_name(d.tfds_name)}_{d.image_size}px_{_crc_hex(repr(fields))}"
    if d.source == "folder":
        return f"folder_{_path_name(d.path)}_{_crc_hex(d.path)}_{d.image_size}px"
    if d.source == "text":
        return f"text_{_path_name(d.path)}_{_crc_hex(d.path)}"
    raise _no_files(cfg)


def splits(cfg: Config) -> tuple[str, ...]:
    """The splits this source has, among `SPLITS` (always "train"; "validation" if any)."""
    source = cfg.data.source
    if source == "shapes":
        return SPLITS
    if source == "tfds":
        return tuple(s for s in SPLITS if s in _tfds_split_map(cfg, _tfds_builder(cfg)))
    if source in ("folder", "text"):
        return tuple(s for s, files in _file_splits(cfg).items() if files)
    raise _no_files(cfg)


def build(cfg: Config) -> None:
    """Makes the source readable: renders the embedded dataset; for other sources checks that
    the data exists (and that the configured keys and splits fit it) and says what to run if
    it does not."""
    source = cfg.data.source
    if source == "shapes":
        from tfx_jax.data.embedded import builders

        builders.build(
            str(epath.Path(cfg.data.data_dir) / "tfds"), cfg.data.tfds_config, cfg.data.image_size
        )
        return
    if source == "tfds":
        builder = _tfds_builder(cfg)
        _tfds_fields(cfg, builder)
        split_map = _tfds_split_map(cfg, builder)
        counts = ", ".join(
            f"{ours} = {theirs} ({len(builder.as_data_source(theirs))} records)"
            for ours, theirs in split_map.items()
        )
        print(f"TFDS {builder.info.full_name} in {builder.data_dir}: {counts}")
        return
    if source in ("folder", "text"):
        files = _file_splits(cfg)
        if not files["train"]:
            kind = "images with .txt captions" if source == "folder" else "text files"
            raise FileNotFoundError(
                f"data.path={cfg.data.path!r} has no training {kind} "
                f"(looked for {', '.join(_suffixes(source))} files)."
            )
        counts = ", ".join(f"{split} {len(f)} files" for split, f in files.items() if f)
        print(f"{source} source {cfg.data.path}: {counts}")
        return
    raise _no_files(cfg)


def open_split(cfg: Config, split: str) -> Sequence[dict]:
    """Random access to the raw examples of `split` (see the module docstring)."""
    d = cfg.data
    if d.source == "shapes":
        from tfx_jax.data.embedded import builders

        return builders.data_source(
            str(epath.Path(d.data_dir) / "tfds"), split, d.tfds_config, d.image_size
        )
    if d.source == "tfds":
        builder = _tfds_builder(cfg)
        fields = _tfds_fields(cfg, builder)
        split_map = _tfds_split_map(cfg, builder)
        _check_split(cfg, split, split_map)
        name = f"{builder.info.full_name}[{split_map[split]}]"
        return TfdsSource(builder.as_data_source(split_map[split]), fields, name)
    if d.source in ("folder", "text"):
        files = _file_splits(cfg)
        _check_split(cfg, split, {s: f for s, f in files.items() if f})
        if d.source == "folder":
            return FolderSource(files[split], d.image_size)
        return TextSource(files[split])
    raise _no_files(cfg)


def prompts(cfg: Config, num: int, seed: int = 0) -> list[str]:
    """Captions to draw sample images for during eval: held-out attribute combinations for the
    shapes data; class names through `data.caption_template` for labelled TFDS data; for other
    image sources, captions of the first validation (else train) examples, cycled up to `num`
    (the same every eval, so samples are comparable across steps); none for text."""
    source = cfg.data.source
    if source == "shapes":
        from tfx_jax.data.embedded import shapes

        rng = np.random.default_rng(seed)
        return [shapes.caption(shapes.sample_scene(rng, "heldout")) for _ in range(num)]
    if source == "text":
        return []
    if source == "tfds":
        fields = _tfds_fields(cfg, _tfds_builder(cfg))
        if fields.label_names:
            names = fields.label_names
            return [
                fields.template.format(label=names[(seed + i) % len(names)]) for i in range(num)
            ]
    elif source != "folder":
        raise _no_files(cfg)
    split = "validation" if "validation" in splits(cfg) else "train"
    return _cycle(_first_captions(open_split(cfg, split), num), num)


# ---------------------------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------------------------


def _no_files(cfg: Config) -> ValueError:
    return ValueError(
        f"data.source={cfg.data.source!r} has no files (use shapes, tfds, folder or text)."
    )


def _check_split(cfg: Config, split: str, available: dict[str, Any]) -> None:
    if split not in available:
        raise ValueError(
            f"data.source={cfg.data.source} has no split {split!r}; it has {tuple(available)}."
        )


def _crc_hex(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def _safe_name(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def _path_name(path: str) -> str:
    """A readable file-name-safe stand-in for `path`: its last component ("imgs" for
    "gs://b/imgs/" and "imgs_.txt" for "imgs/*.txt")."""
    return _safe_name(path.rstrip("/").rsplit("/", 1)[-1])


def _cycle(items: list[str], num: int) -> list[str]:
    return [items[i % len(items)] for i in range(num)] if items else []


def _first_captions(source: Sequence[dict], num: int) -> list[str]:
    """Captions of the first `num` readable examples (at most 4 * num are tried)."""
    captions = []
    for index in range(min(len(source), 4 * num)):
        if len(captions) == num:
            break
        try:
            captions.append(source[index]["text"])
        except RecordError:
            continue
    return captions


def _index(index: int, length: int) -> int:
    """`index` as a non-negative int, or IndexError (which ends iteration over a source)."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index


def to_rgb_image(image: Image.Image) -> Image.Image:
    """`image` in RGB mode: grey repeated into RGB; alpha composited onto white (transparent
    areas of logos and scans are meant to be seen on a light page; dropping alpha would show
    whatever colour the encoder left there, often black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """The centred square crop of `image` resized to [size, size, 3] uint8.

    Cropping (rather than padding or squashing) keeps the aspect ratio and fills the frame;
    Lanczos anti-aliases when downscaling (Pillow widens the kernel by the scale factor).
    """
    image = to_rgb_image(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if width != height:
        # crop() first: resize(box=...) would let the filter read pixels outside the square.
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(image, np.uint8)


def array_to_image(array: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 1 | 2 | 3 | 4] -> a Pillow image (L, LA, RGB or RGBA)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"expected an [H, W, 1|2|3|4] image, got shape {array.shape}")
    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------
# source=tfds.
# ---------------------------------------------------------------------------------------------


def _tfds_data_dir(cfg: Config) -> str:
    return cfg.data.tfds_data_dir or str(epath.Path(cfg.data.data_dir) / "tfds")


def _prepare_command(name: str, data_dir: str) -> str:
    return (
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"\n"
        f"or\n  tfds build {name} --file_format=array_record --data_dir={data_dir}"
    )


def _tfds_builder(cfg: Config):
    """The prepared dataset's read-only builder (from its dataset_info.json and features.json).

    Loading from files rather than the registered builder class never downloads anything,
    works for datasets whose builder code needs TensorFlow (coco_captions) or is not
    installed, and pickles by directory for Grain worker processes.
    """
    import tensorflow_datasets as tfds

    from tfx_jax.data.embedded import builders  # noqa: F401  (its import drops TFDS's OpenCV hint)

    name = cfg.data.tfds_name
    data_dir = _tfds_data_dir(cfg)
    if not name:
        raise ValueError("data.source=tfds needs data.tfds_name (e.g. mnist, cifar10).")
    try:
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        _check_known_tfds_name(name, data_dir)
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (data.tfds_name) is not prepared in {data_dir} "
            f"({'data.tfds_data_dir' if cfg.data.tfds_data_dir else '<data.data_dir>/tfds'})."
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
    import tensorflow_datasets as tfds

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
    import tensorflow_datasets as tfds

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
    import tensorflow_datasets as tfds

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
    """

    image_key: str
    caption_key: str
    label_key: str
    template: str
    label_names: tuple[str, ...]
    image_size: int


def _tfds_fields(cfg: Config, builder) -> TfdsFields:
    """Checks data.image_key / caption_key / label_key against the dataset's features."""
    import tensorflow_datasets as tfds

    d = cfg.data
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
    )


def _is_image(feature) -> bool:
    import tensorflow_datasets as tfds

    return isinstance(feature, tfds.features.Image)


def _split_bases(split: str) -> list[str]:
    """Dataset split names in a TFDS split expression ("train[:90%]+test" -> train, test)."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _tfds_split_map(cfg: Config, builder) -> dict[str, str]:
    """Our split name -> the dataset's split (expression), from data.tfds_splits or the
    default train -> train, validation -> validation (or test)."""
    d = cfg.data
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


class TfdsSource:
    """Random-access caption examples from a TFDS data source (what Grain's
    `MapDataset.source` takes): one image, and a caption from a text or label feature."""

    def __init__(self, source: Sequence[dict], fields: TfdsFields, name: str):
        self._source = source
        self._fields = fields
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = _index(index, len(self))
        try:
            record = self._source[index]
            image = square_resize(
                array_to_image(_lookup(record, self._fields.image_key)),
                self._fields.image_size,
            )
            text = self._caption(record, index)
        except RecordError:
            raise
        except Exception as e:  # Any decoding failure is this record's, not the run's.
            raise RecordError(f"{self._name} record {index}: {type(e).__name__}: {e}") from e
        return {"kind": "caption", "text": text, "images": [image]}

    def _caption(self, record: dict, index: int) -> str:
        f = self._fields
        if f.caption_key:
            value = _lookup(record, f.caption_key)
            if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
                if not len(value):
                    raise RecordError(f"{self._name} record {index}: no {f.caption_key} texts")
                value = value[index % len(value)]  # Deterministic, and spread over the list.
            caption = _to_text(value).strip()
            if not caption:
                raise RecordError(f"{self._name} record {index}: empty {f.caption_key}")
            return caption
        value = _lookup(record, f.label_key)
        label = f.label_names[int(value)] if f.label_names else _to_text(value)
        return f.template.format(label=label)

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}, {len(self)} records)"


# ---------------------------------------------------------------------------------------------
# source=folder and source=text: files found under a directory or by a glob.
# ---------------------------------------------------------------------------------------------


def _suffixes(source: str) -> tuple[str, ...]:
    return IMAGE_SUFFIXES if source == "folder" else TEXT_SUFFIXES


def _walk(root: epath.Path, suffixes: tuple[str, ...]) -> list[epath.Path]:
    """Files under `root` (recursively) with one of `suffixes`, skipping hidden files and
    directories (".ipynb_checkpoints", macOS "._x.jpg" resource forks)."""
    files = []
    for directory, dirs, names in root.walk():
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # Prunes the walk.
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue  # For backends whose walk ignores the pruning.
        files.extend(
            directory / name
            for name in names
            if not name.startswith(".") and name.lower().endswith(suffixes)
        )
    return files


def _find(path: str, suffixes: tuple[str, ...] | None) -> tuple[epath.Path, list[epath.Path]]:
    """(base, files): files under the directory `path`, or matching the glob `path`
    (`*`, `?`, `[...]`; no `**`), sorted; base is what their split hashes are relative to.
    `suffixes` filters directory listings, and glob matches too when not None."""
    if _is_glob(path):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        cut = path.rfind("/", 0, first)
        base = epath.Path(path[:cut] if cut > 0 else ("/" if cut == 0 else "."))
        pattern = path[cut + 1 :]
        files = [
            f
            for f in base.glob(pattern)
            if f.is_file() and (suffixes is None or f.name.lower().endswith(suffixes))
        ]
        return base, sorted(files, key=str)
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist.")
    if not root.is_dir():
        return root.parent, [root]
    return root, sorted(_walk(root, suffixes or ()), key=str)


def _is_validation(relative: str) -> bool:
    """The deterministic 5% validation split: stable across machines, listing orders and
    added files (unlike shuffling with a seed)."""
    return zlib.crc32(relative.encode("utf-8")) % 100 < VALIDATION_PERCENT


def _is_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _file_splits(cfg: Config) -> dict[str, list[str]]:
    """{"train": files, "validation": files} (as path strings) of a folder or text source:
    a folder's train/ and validation/ directories if it has train/, else split by hash."""
    d = cfg.data
    suffixes = _suffixes(d.source)
    if not d.path:
        raise ValueError(f"data.source={d.source} needs data.path (a directory or a glob).")
    root = epath.Path(d.path)
    if d.source == "folder" and not _is_glob(d.path) and (root / "train").is_dir():
        listed = {
            split: [str(f) for f in _find(str(root / split), suffixes)[1]]
            for split in ("train", "validation")
            if (root / split).is_dir()
        }
        return {"train": listed["train"], "validation": listed.get("validation", [])}
    # A text glob keeps whatever it matches; a folder glob still only takes images.
    base, files = _find(d.path, None if d.source == "text" and _is_glob(d.path) else suffixes)
    out: dict[str, list[str]] = {"train": [], "validation": []}
    for f in files:
        split = "validation" if _is_validation(f.relative_to(base).as_posix()) else "train"
        out[split].append(str(f))
    return out


class FolderSource:
    """Random-access caption examples from image files with same-name .txt captions."""

    def __init__(self, files: Sequence[str], image_size: int):
        self._files = tuple(files)
        self._image_size = image_size

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        path = epath.Path(self._files[_index(index, len(self))])
        return {
            "kind": "caption",
            "text": read_caption(path),
            "images": [read_image(path, self._image_size)],
        }

    def text(self, index: int) -> str:
        """Example `index`'s caption alone, without decoding its image (for the tokenizer)."""
        return read_caption(epath.Path(self._files[_index(index, len(self))]))

    def __repr__(self) -> str:
        return f"FolderSource({len(self)} images)"


def read_caption(image_path: epath.Path) -> str:
    """The stripped text of the .txt file beside `image_path`, or RecordError."""
    path = image_path.with_suffix(".txt")
    try:
        caption = path.read_bytes().decode("utf-8-sig").strip()
    except FileNotFoundError:
        raise RecordError(f"{image_path}: no caption file {path.name} beside it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read the caption ({e})") from e
    if not caption:
        raise RecordError(f"{image_path}: its caption file {path.name} is empty")
    return caption


def read_image(path: epath.Path, size: int) -> np.ndarray:
    """The image file at `path` as [size, size, 3] uint8 (first frame of a GIF; EXIF
    orientation applied, since phone JPEGs store pixels sideways), or RecordError."""
    try:
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster.
        image = ImageOps.exif_transpose(image)
        return square_resize(image, size)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        raise RecordError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e


def cut_documents(text: str, max_chars: int = DOCUMENT_CHARS) -> list[str]:
    """`text` cut into documents at blank lines: consecutive paragraphs are joined (by a blank
    line) while the document stays within `max_chars`; a longer paragraph is a document of its
    own (cutting inside a paragraph would split sentences). Paragraph lines keep their
    indentation (code blocks in Markdown)."""
    paragraphs, lines = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            lines.append(line.rstrip())
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    documents, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + 2 + len(paragraph) > max_chars:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        documents.append(current)
    return documents


class TextSource:
    """Random-access text documents from UTF-8 files.

    The index (documents per file) is built on first use, reading each file once; documents
    are then cut again from their file on access, with the last few files' documents cached
    (the encode stage reads in order). A file that is not UTF-8 takes one slot whose
    `__getitem__` raises RecordError naming it (its cache entry is that message, a str), so it
    is skipped and counted like any bad record.
    """

    _CACHE_FILES = 8

    def __init__(self, files: Sequence[str]):
        self._files = tuple(files)
        self._starts: np.ndarray | None = None  # first document index of each file, + total
        self._cache: collections.OrderedDict[int, list[str] | str] = collections.OrderedDict()

    def _documents(self, file_index: int) -> list[str] | str:
        """The file's documents, or (a str) why it cannot be read."""
        if file_index in self._cache:
            self._cache.move_to_end(file_index)
            return self._cache[file_index]
        path = epath.Path(self._files[file_index])
        try:
            documents: list[str] | str = cut_documents(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            documents = f"{path}: not UTF-8 text ({e})"
        self._cache[file_index] = documents
        if len(self._cache) > self._CACHE_FILES:
            self._cache.popitem(last=False)
        return documents

    def _index(self) -> np.ndarray:
        if self._starts is None:
            counts = [
                1 if isinstance(docs, str) else len(docs)
                for docs in map(self._documents, range(len(self._files)))
            ]
            self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return self._starts

    def __len__(self) -> int:
        return int(self._index()[-1])

    def __getitem__(self, index: int) -> dict:
        starts = self._index()
        index = _index(index, int(starts[-1]))
        file_index = int(np.searchsorted(starts, index, side="right")) - 1
        documents = self._documents(file_index)
        if isinstance(documents, str):
            raise RecordError(documents)
        return {"kind": "text", "text": documents[index - int(starts[file_index])], "images": []}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict()}

    def __repr__(self) -> str:
        return f"TextSource({len(self._files)} files)"
