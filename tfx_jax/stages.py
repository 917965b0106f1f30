"""The data stages behind `python -m tfx_jax data …` and `python -m tfx_jax vae`.

    data build      make the source readable (render the embedded shapes dataset into TFDS
                    ArrayRecord; for tfds/folder/text sources, check the data is there)
    data tokenizer  train SentencePiece on the source's text (+ stdlib docstrings)
    vae             train the KL-VAE on the source's training images; report held-out PSNR
    data encode     tokenize every example and encode its images with the frozen VAE, once,
                    into ArrayRecord (`data/encoded.py`): the training hot path only reads
    data all        every stage whose output is missing or stale, in order

What each makes, where, and when it is stale: `tfx_jax.artifacts`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from tfx_jax import artifacts
from tfx_jax.config import Config
from tfx_jax.data import sources
from tfx_jax.data.embedded import text_corpus
from tfx_jax.data.encoded import IMAGE_PLACEHOLDER, write_encoded
from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
from tfx_jax.train import vae_trainer

log = logging.getLogger(__name__)


def build_dataset(cfg: Config) -> None:
    sources.of(cfg).build(cfg)


def build_tokenizer(cfg: Config) -> epath.Path:
    """Trains SentencePiece with `model.vocab_size` pieces on the training split's text."""
    examples = sources.of(cfg).open_split(cfg, "train")
    texts = [t.replace(IMAGE_PLACEHOLDER, " ") for t in _texts(examples, "tokenizer")]
    texts = [t for t in texts if t.strip()]
    texts += list(text_corpus.documents("train"))
    proto = train_tokenizer(texts, cfg.model.vocab_size, model_type=cfg.data.vocab_model)
    path = artifacts.tokenizer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(proto).save(path)
    settings = artifacts.tokenizer_settings(cfg)
    (path.parent / "tokenizer.json").write_text(json.dumps(settings, indent=2))
    print(f"tokenizer: {cfg.model.vocab_size} pieces -> {path}")
    return path


def train_vae(cfg: Config) -> dict:
    """Trains the VAE on the training images (sharded, logged and checkpointed under vae/,
    resumable: `vae_trainer.run`); returns (and saves) its summary."""
    images = _images(cfg, "train")
    held_split = "validation" if "validation" in sources.of(cfg).splits(cfg) else "train"
    held_out = _images(cfg, held_split, limit=256)
    out = artifacts.vae_dir(cfg)
    result = vae_trainer.run(cfg, images, held_out, out)
    if jax.process_index() == 0:
        (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(result["params"]))
    summary = {
        **artifacts.vae_settings(cfg),
        "scale_factor": result["scale_factor"],
        "heldout_psnr_db": result["heldout_psnr_db"],
    }
    if jax.process_index() == 0:
        (out / "vae.json").write_text(json.dumps(summary, indent=2))
    print(f"VAE saved to {out}: held-out PSNR {summary['heldout_psnr_db']:.2f} dB")
    return summary


def encode(cfg: Config) -> None:
    """Tokenizes every example of every split and encodes its images with the frozen VAE."""
    tokenizer = artifacts.load_tokenizer(cfg)
    encode_images = artifacts.image_encoder(cfg)
    shape = artifacts.latent_shape(cfg)
    source = sources.of(cfg)
    report = {}
    for split in source.splits(cfg):
        path = artifacts.encoded_path(cfg, split)
        stats = write_encoded(
            path,
            source.open_split(cfg, split),
            tokenizer.encode,
            encode_images,
            shape,
            on_error=cfg.data.on_error,
        )
        report[split] = vars(stats)
        skipped = f", {stats.skipped} skipped (unreadable)" if stats.skipped else ""
        print(
            f"encoded/{split}: {stats.examples} examples, {stats.tokens} text tokens, "
            f"{stats.images} images{skipped} -> {path}"
        )
    made_by = {**artifacts.encode_settings(cfg), "stats": report}
    artifacts.made_by_path(cfg).write_text(json.dumps(made_by, indent=2))


def prepare_all(cfg: Config) -> None:
    """Every stage whose output is missing or stale, in order (what `make demo` runs first)."""
    build_dataset(cfg)
    if not artifacts.tokenizer_is_current(cfg):
        build_tokenizer(cfg)
    if sources.of(cfg).has_images and not artifacts.vae_is_current(cfg):
        train_vae(cfg)
    if cfg.data.latents == "precomputed" and not artifacts.encoded_is_current(cfg):
        encode(cfg)


# ----------------------------------------------------------------------------- reading examples


def _texts(examples: Sequence[dict], what: str) -> Iterator[str]:
    """The examples' texts: through the source's `text(i)` when it has one (a folder reads its
    .txt files without decoding images), else from the whole examples."""
    if hasattr(examples, "text"):
        return _readable(examples, what, examples.text)
    return _readable(examples, what, lambda i: examples[i]["text"])


def _readable(
    examples: Sequence[dict], what: str, read: Callable[[int], Any] | None = None
) -> Iterator[Any]:
    """Yields `read(i)` (default: example i) for the examples that can be read; unreadable ones
    are counted and logged."""
    read = read or examples.__getitem__
    bad = 0
    for i in tqdm(range(len(examples)), desc=what, leave=False, disable=len(examples) < 2000):
        try:
            yield read(i)
        except sources.RecordError as e:
            bad += 1
            log.warning("%s: skipping unreadable example %d: %s", what, i, e)
    if bad:
        print(f"{what}: skipped {bad} unreadable examples (see the log for which)")


def _images(cfg: Config, split: str, limit: int | None = None) -> np.ndarray:
    out = []
    for ex in _readable(sources.of(cfg).open_split(cfg, split), f"VAE images ({split})"):
        out.extend(ex["images"])
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"the {split} split of data.source={cfg.data.source} has no images.")
    return np.stack(out[:limit] if limit else out)
