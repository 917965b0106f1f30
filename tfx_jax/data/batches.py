"""The input pipeline's entry point: a run's packed batches of one split.

    records (one source's encoded examples, from `records(cfg, split)`: the caller's, since only
    it knows where `data encode` wrote them or how to encode on the fly — data code may not
    import the VAE)
      → a mixture's components end to end (`mixture.Concat`), drawn at their weights
      → `pipeline.packed_dataset` (plan, pack, read, lay out: pipeline.py's docstring)
      → this process's rows of each global batch

A source that makes batches itself (`Source.makes_batches`: synthetic) gives its own iterator.
Either way the iterator is checkpointable (`get_state`/`set_state`) and its position is global
when the source declares it (`Source.position_is_global`): every process plans the same global
batches, so a checkpoint from N processes resumes on M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from tfx_jax.data import pipeline, sources
from tfx_jax.data.sequence import SequenceSpec
from tfx_jax.data.sources import mixture

if TYPE_CHECKING:
    from tfx_jax.data.config import RunConfig

# One source's encoded examples of a split: a random-access sequence of records.
Records = Callable[["RunConfig", str], Any]


def batches(
    cfg: RunConfig, split: str, records: Records | None, **kw
) -> Iterator[dict[str, np.ndarray]]:
    """This process's packed batches of `split`: a checkpointable iterator, laid out and packed
    as `SequenceSpec.of(cfg)` says. `records(part_cfg, split)`: one source's encoded examples
    (called for each component of a mixture with the component's config, before iterating, so
    a missing file is reported here); `kw`: `pipeline.packed_dataset` options (shuffle,
    num_epochs, ...).

    Iterating raises `DataLossError` (one line: how many, why, the settings that fix it) when no
    example can be packed or more than data.max_lost_fraction of them are lost."""
    source = sources.of(cfg)
    if source.makes_batches:
        return source.batches(cfg, split)
    if records is None:
        raise ValueError(f"source {source.name!r} reads encoded records: pass `records`")
    d = cfg.data
    named = source.components(cfg)
    if named:  # a mixture: the components end to end, drawn at their weights
        data = mixture.Concat(
            [records(part, split) for _, _, part in named], [n for n, _, _ in named]
        )
        parts = [
            pipeline.MixturePart(name, offset, size, weight)
            for (name, weight, _), offset, size in zip(
                named, data.offsets[:-1], map(len, data.items), strict=True
            )
        ]
        kw = {"parts": parts, "mix_by": d.mix_by, **kw}
    else:
        data = records(cfg, split)
    ds = pipeline.packed_dataset(
        data,
        SequenceSpec.of(cfg),
        batch_size=d.global_batch_size,
        seed=d.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_packing_bins=d.packing_bins,
        worker_count=d.worker_count,
        read_threads=d.read_threads,
        **kw,
    )
    return iter(ds)
