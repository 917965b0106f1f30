"""TFDS builder for the embedded shapes dataset (`tfx_shapes`), written as ArrayRecord.

Everything is generated locally by `tfx_jax.data.embedded.shapes` (nothing is downloaded), so
`download_and_prepare` only renders, PNG-encodes and writes. TensorFlow is not needed: TFDS
writes and reads ArrayRecord without it, and `tfds.features.Image` encodes through Pillow when
given PNG bytes (a numpy array would go through `tf.image.encode_png`, so we encode ourselves).
`Sequence(Image)` reads back without TF as a list of [S, S, 3] uint8 arrays (empty for text
documents). Writing is unshuffled (`disable_shuffling`): record i of a split is example i of
`shapes.generate_examples`, and Grain shuffles at read time anyway.

Configs (`ShapesConfig`): "default" (32 px; train 20000, validation 1000, heldout 1000),
"default_64px" (the same at 64 px), "tiny" (32 px; 512 / 64 / 64, for tests) and "single" (the
demo's tier, `shapes.SINGLE`: one huge object per caption; 32 px; 4000 / 512 / 512). `build` and
`data_source` derive further configs for other image sizes or seeds (named e.g. "tiny_64px").

Measured build time (`build`, pinned to one CPU core of the 2-core dev machine, Python 3.12,
2026-11-23): "default" 4.8-7.2 s (9.4 MB on disk), "default_64px" 6.2-9.3 s (14 MB), "tiny"
0.3-0.5 s; importing TFDS adds ~1.5 s. Reading back: ~3,500 records/s per core (PNG decoding
through Pillow).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from tfx_jax.data.embedded import shapes


class _DropOpenCvHint(logging.Filter):
    """Drops TFDS's one-off "OpenCV is not installed ... Defaulting to PIL" warning (PIL is
    what we want for 32 px PNGs); every other TFDS message still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropOpenCvHint())


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """What to generate: image size, examples per split, seed and the example-kind mix.

    Attributes:
      image_size: side of the square images in pixels.
      num_train, num_validation, num_heldout: examples per split.
      seed: base seed of `shapes.generate_examples`.
      mix: probabilities of (caption, interleaved, text) examples in train/validation.
      max_objects, sizes, positions: the tier (`shapes.SceneSpec`); the defaults are the full
        multi-object world.
    """

    image_size: int = 32
    num_train: int = 20_000
    num_validation: int = 1_000
    num_heldout: int = 1_000
    seed: int = 0
    mix: tuple[float, float, float] = (0.7, 0.15, 0.15)
    max_objects: int = shapes.MAX_OBJECTS
    sizes: tuple[str, ...] = shapes.GRID_SIZES
    positions: tuple[str, ...] = shapes.POSITIONS

    @property
    def spec(self) -> shapes.SceneSpec:
        """The tier its scenes are drawn from."""
        return shapes.SceneSpec(self.max_objects, self.sizes, self.positions)

    def num_examples(self, split: str) -> int:
        """Returns how many examples `split` holds."""
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "heldout": self.num_heldout,
        }[split]


BUILDER_CONFIGS = (
    ShapesConfig(name="default", description="32x32 images; 20000/1000/1000 examples."),
    ShapesConfig(
        name="default_64px", image_size=64, description="64x64 images; 20000/1000/1000 examples."
    ),
    ShapesConfig(
        name="tiny",
        num_train=512,
        num_validation=64,
        num_heldout=64,
        description="32x32 images; 512/64/64 examples, for tests.",
    ),
    # The demo's tier: captions name one huge object, so a small model learns (shape, colour) in
    # CPU minutes. Few text documents (the demo measures prompts and captions) and a smaller
    # train split: its 20 training scenes repeat ~170 times in 4000 examples anyway.
    ShapesConfig(
        name="single",
        num_train=4_000,
        num_validation=512,
        num_heldout=512,
        mix=(0.85, 0.12, 0.03),
        max_objects=shapes.SINGLE.max_objects,
        sizes=shapes.SINGLE.sizes,
        positions=shapes.SINGLE.positions,
        description="32x32 images, one huge object per caption; 4000/512/512 examples.",
    ),
)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level=1: these flat-colour images compress well anyway and level 1 is ~3x faster.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class TfxShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with exact captions, interleaved documents and stdlib docstring text."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_CONFIG_NAME = "default"
    # TFDS locates a package-internal builder's directory (for checksums/README files we do not
    # have) through `importlib_resources`, a backport that is not installed; without this
    # override `download_and_prepare` fails with "No module named 'importlib_resources'".
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        heldout = ", ".join(f"{c} {s}" for s, c in sorted(shapes.HELDOUT_PAIRS))
        # DatasetInfo(builder=self, ...) keeps the description here; `dataset_info_from_configs`
        # (which also works once `code_path` is set) would read it from README.md and
        # CITATIONS.bib next to this module, i.e. from whatever tfx_jax/data/README.md says.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic coloured shapes on a plain background with exact captions "
                "(tfx_jax.data.embedded.shapes), interleaved multi-image documents, and text-only "
                f"documents from Python docstrings. Held-out (shape, colour) pairs: {heldout}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "kind": tfds.features.Text(),
                    "text": tfds.features.Text(),
                    "images": tfds.features.Sequence(tfds.features.Image(shape=(size, size, 3))),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in shapes.SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        examples = shapes.generate_examples(
            split,
            config.num_examples(split),
            config.image_size,
            config.seed,
            config.mix,
            config.spec,
        )
        for key, example in examples:
            yield key, {**example, "images": [_png(image) for image in example["images"]]}


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _content(config: ShapesConfig) -> tuple:
    return (
        config.image_size,
        config.num_train,
        config.num_validation,
        config.num_heldout,
        config.seed,
        tuple(config.mix),
        config.spec,
    )


def get_config(
    config: str = "default", image_size: int | None = None, seed: int | None = None
) -> ShapesConfig:
    """Returns a predefined config, or one derived from it with another image size or seed.

    Args:
      config: name of a predefined config ("default", "default_64px", "tiny", "single").
      image_size: if given, the image size (overrides the config's).
      seed: if given, the seed (overrides the config's).

    Returns:
      The config. A derived config that equals a predefined one is that one ("default" at 64 px
      is "default_64px"); others are named after what differs from the 32 px / seed 0 defaults
      (e.g. "tiny_64px_seed3") so they get their own directory under `data_dir`.
    """
    by_name = {c.name: c for c in BUILDER_CONFIGS}
    if config not in by_name:
        raise ValueError(f"unknown config {config!r}; expected one of {tuple(by_name)}")
    base = by_name[config]
    changes = {}
    if image_size is not None and image_size != base.image_size:
        changes["image_size"] = image_size
    if seed is not None and seed != base.seed:
        changes["seed"] = seed
    if not changes:
        return base
    derived = dataclasses.replace(base, **changes)
    for predefined in BUILDER_CONFIGS:
        if _content(predefined) == _content(derived):
            return predefined
    name = base.name.removesuffix(f"_{base.image_size}px")
    if derived.image_size != 32:
        name += f"_{derived.image_size}px"
    if derived.seed != 0:
        name += f"_seed{derived.seed}"
    return dataclasses.replace(derived, name=name, description=f"{base.name} with {changes}")


def _builder(data_dir: str, config: str, image_size: int | None, seed: int | None) -> TfxShapes:
    cfg = get_config(config, image_size, seed)
    return TfxShapes(
        data_dir=os.fspath(data_dir),
        # Predefined configs go by name: TFDS rebuilds the builder from these arguments when a
        # data source is unpickled (Grain worker processes), and it rejects a *copy* of a
        # predefined config object ("Cannot name a custom BuilderConfig the same as ...").
        config=cfg.name if cfg in BUILDER_CONFIGS else cfg,
        file_format="array_record",
    )


def build(
    data_dir: str,
    config: str = "default",
    image_size: int | None = None,
    seed: int | None = None,
) -> TfxShapes:
    """Generates the dataset into `data_dir` unless it is already there.

    Args:
      data_dir: TFDS data directory (the dataset goes to `data_dir/tfx_shapes/<config>/1.0.0`).
      config: predefined config name; see `get_config`.
      image_size: optional image size override.
      seed: optional seed override.

    Returns:
      The prepared builder.
    """
    builder = _builder(data_dir, config, image_size, seed)
    if builder.is_prepared():
        return builder
    cfg = builder.builder_config
    counts = ", ".join(f"{s} {cfg.num_examples(s)}" for s in shapes.SPLITS)
    print(f"Generating tfx_shapes/{cfg.name} ({cfg.image_size} px; {counts}) in {builder.data_dir}")
    start = time.perf_counter()
    builder.download_and_prepare()
    print(f"Generated tfx_shapes/{cfg.name} in {time.perf_counter() - start:.1f} s")
    return builder


class ShapesSource:
    """Random-access source of decoded shapes examples (what Grain's `MapDataset.source` takes).

    Records decode to {"kind": str, "text": str, "images": list of [S, S, 3] uint8 arrays}.
    """

    def __init__(self, source: Sequence[dict]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        return {
            "kind": _to_str(record["kind"]),
            "text": _to_str(record["text"]),
            "images": [np.asarray(image, np.uint8) for image in record["images"]],
        }

    def __repr__(self) -> str:
        return f"ShapesSource({self._source!r})"


def _to_str(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def data_source(
    data_dir: str,
    split: str,
    config: str = "default",
    image_size: int | None = None,
    seed: int | None = None,
) -> ShapesSource:
    """Opens a built split for random access.

    Args:
      data_dir: the TFDS data directory passed to `build`.
      split: "train", "validation" or "heldout" (TFDS slicing such as "train[:10%]" works too).
      config: predefined config name; see `get_config`.
      image_size: optional image size override, as given to `build`.
      seed: optional seed override, as given to `build`.

    Returns:
      A `ShapesSource` whose record i is example i of `shapes.generate_examples(split, ...)`.

    Raises:
      FileNotFoundError: if that config was not built into `data_dir`.
    """
    builder = _builder(data_dir, config, image_size, seed)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfx_shapes/{builder.builder_config.name} is not built in {data_dir}; run "
            f"tfx_jax.data.builders.build({str(data_dir)!r}, {config!r}, ...) first"
        )
    return ShapesSource(builder.as_data_source(split))
