"""source=mixture: several sources at weights, the way Transfusion is pretrained (§4.1: a text
corpus and image–caption data, mixed by tokens).

Each component is a full data section (`data.mixture` entries: "NAME WEIGHT key=value ...", the
mixture's settings with the component's own), so it has its own TFDS dataset, folder or text
tree and its own encoded records under `encoded/<its source_id>/`. What is shared is what the
model shares: one tokenizer trained on every component's text, one VAE trained on every image
(`data all` makes both for the mixture). The input pipeline mixes the components' shuffled
records with Grain's `MapDataset.mix` (`data/pipeline.py`), so the mix is deterministic and its
position is part of the checkpointed iterator state.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tfx_jax.data.config import explicit_value_error
from tfx_jax.data.judging import Judge
from tfx_jax.data.sources.base import SPLITS, DataConfigError, Source, of, register

if TYPE_CHECKING:
    from tfx_jax.data.config import DataConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of a mixture: its name (in metrics), weight and data section."""

    name: str
    weight: float
    data: DataConfig


def components(d: DataConfig) -> list[Component]:
    """The sources of `data.mixture`, each a full `DataConfig` (the mixture's settings with
    the component's key=value overrides); [] for a single source.

    Raises:
      DataConfigError: a malformed entry, an unknown key, a bad value or weight, a repeated name.
    """
    fields = {f.name: f for f in dataclasses.fields(d)}
    out: list[Component] = []
    for entry in d.mixture:
        words = entry.split()
        if len(words) < 3:
            raise DataConfigError(
                f"data.mixture entry {entry!r}: write 'NAME WEIGHT key=value ...', e.g. "
                "'text 0.5 source=text path=corpus'."
            )
        name, weight, settings = words[0], words[1], words[2:]
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not (math.isfinite(w) and w > 0):  # inf would make the shares [nan, 0.0]
            raise DataConfigError(
                f"data.mixture entry {name!r}: weight {weight!r} must be a finite number > 0."
            )
        changes: dict[str, Any] = {"mixture": (), "source": ""}
        for item in settings:
            key, eq, value = item.partition("=")
            if not eq or key not in fields or key in ("mixture", "mix_by"):
                raise DataConfigError(
                    f"data.mixture entry {name!r}: {item!r} is not KEY=VALUE with KEY a data "
                    "setting (e.g. source=text, path=..., tfds_name=..., caption_key=...)."
                )
            kind = type(fields[key].default)
            try:
                changes[key] = value.lower() == "true" if kind is bool else kind(value)
            except ValueError as e:
                raise DataConfigError(
                    f"data.mixture entry {name!r}: {key}={value!r} is not a {kind.__name__}."
                ) from e
            if problem := explicit_value_error(key, changes[key]):
                raise DataConfigError(f"data.mixture entry {name!r}: {problem}")
        if changes["source"] in ("", "mixture", "synthetic"):
            raise DataConfigError(
                f"data.mixture entry {name!r} needs source=NAME of a source with files "
                f"(not {changes['source'] or 'none'})."
            )
        if any(c.name == name for c in out):
            raise DataConfigError(f"data.mixture: the name {name!r} is used twice.")
        out.append(Component(name, w, dataclasses.replace(d, **changes)))
    return out


def parts(cfg: RunConfig) -> list[tuple[str, float, RunConfig]]:
    """(name, weight, config of that source alone) per component; a single source is one part
    named after it with weight 1."""
    if cfg.data.source != "mixture":
        return [(cfg.data.source, 1.0, cfg)]
    return [(c.name, c.weight, dataclasses.replace(cfg, data=c.data)) for c in components(cfg.data)]


class Concat:
    """Random access over several sequences end to end (records or raw examples): index i of
    part k is `offsets[k] + i`. Reads, batched reads and layout reads (`read_shells`) go to the
    part that holds each index."""

    def __init__(self, items: Sequence[Sequence], names: Sequence[str]):
        self.items, self.names = list(items), list(names)
        self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in self.items])]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _where(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def __getitem__(self, index: int) -> Any:
        k, i = self._where(int(index))
        return self.items[k][i]

    def _grouped(self, indices: Sequence[int], read) -> list:
        out: list[Any] = [None] * len(indices)
        by_part: dict[int, list[tuple[int, int]]] = {}
        for at, index in enumerate(indices):
            k, i = self._where(int(index))
            by_part.setdefault(k, []).append((at, i))
        for k, pairs in by_part.items():
            for (at, _), value in zip(
                pairs, read(self.items[k], [i for _, i in pairs]), strict=True
            ):
                out[at] = value
        return out

    def __getitems__(self, indices: Sequence[int]) -> list:
        return self._grouped(indices, read_items)

    def read_shells(self, indices: Sequence[int]) -> list:
        def read(part, idx):
            if hasattr(part, "read_shells"):
                return part.read_shells(idx)
            return read_items(part, idx)

        return self._grouped(indices, read)

    def __repr__(self) -> str:
        inside = ", ".join(f"{n}: {x!r}" for n, x in zip(self.names, self.items, strict=True))
        return f"Concat({inside})"


def read_items(part: Sequence, indices: Sequence[int]) -> list:
    if hasattr(part, "__getitems__"):
        return list(part.__getitems__(indices))
    return [part[i] for i in indices]


@register
class Mixture(Source):
    name = "mixture"
    composite = True

    def components(self, cfg: RunConfig) -> list[tuple[str, float, RunConfig]]:
        return parts(cfg)

    def __init__(self, cfg: RunConfig | None = None):
        self._cfg = cfg
        self._parts = parts(cfg) if cfg is not None else []
        bound = [(of(p), p) for _, _, p in self._parts]
        self.has_images = any(source.has_images for source, _ in bound)

    def bind(self, cfg: RunConfig) -> Source:
        return Mixture(cfg)

    def source_id(self, cfg: RunConfig) -> str:
        ids = [(n, of(p).source_id(p)) for n, _, p in parts(cfg)]
        digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:10]
        return f"mixture_{'_'.join(n for n, _ in ids)}_{digest}"

    def splits(self, cfg: RunConfig) -> tuple[str, ...]:
        have = [set(of(p).splits(p)) for _, _, p in parts(cfg)]
        return tuple(s for s in SPLITS if all(s in h for h in have))

    def build(self, cfg: RunConfig) -> None:
        for _, _, p in parts(cfg):
            of(p).build(p)

    def open_split(self, cfg: RunConfig, split: str) -> Concat:
        named = parts(cfg)
        return Concat(
            [of(p).open_split(p, split) for _, _, p in named],
            [n for n, _, _ in named],
        )

    def prompts(self, cfg: RunConfig, num: int, seed: int = 0) -> list[str]:
        bound = [(of(p), p) for _, _, p in parts(cfg)]
        with_images = [(source, p) for source, p in bound if source.has_images]
        if not with_images:
            return []
        source, p = with_images[0]
        return source.prompts(p, num, seed)

    def judge(self, cfg: RunConfig) -> Judge | None:
        """The first judged component's judge (the others' captions are outside its grammar:
        their prompts are drawn, not scored)."""
        judges = (of(p).judge(p) for _, _, p in parts(cfg))
        return next((j for j in judges if j is not None), None)
