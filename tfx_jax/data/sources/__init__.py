"""Where examples come from: one `Source` per `data.source`, one module per source.

    synthetic  packed batches made from (seed, step); no files (tests, smoke runs)
    shapes     the embedded tfx_shapes TFDS dataset, rendered locally
    tfds       any TFDS dataset prepared in ArrayRecord format, fields mapped by data.*_key
    folder     images with same-name .txt captions under data.path
    text       UTF-8 text files under data.path, cut into documents

`base.py` says what a source is; `get(name)` / `of(cfg)` look one up. Every module of this
package is imported here, so a source registers itself: adding one is adding a module that
defines a `Source` subclass under `@register`.

What is made from a source (tokenizer, VAE, encoded records) lives under `data.data_dir`
(`tfx_jax.artifacts`); each records the `source_id` it was made from, so switching sources in
one data_dir rebuilds them instead of reusing stale ones.
"""

import importlib
import pkgutil

from tfx_jax.data.sources.base import (
    SPLITS,
    DataConfigError,
    DataLossError,
    ImageTooSmallError,
    RecordError,
    Source,
    get,
    names,
    of,
    register,
)

__all__ = [
    "SPLITS",
    "DataConfigError",
    "DataLossError",
    "ImageTooSmallError",
    "RecordError",
    "Source",
    "get",
    "names",
    "of",
    "register",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
