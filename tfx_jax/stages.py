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

import collections
import json
import logging
from collections.abc import Iterator, Sequence

import flax
import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from tfx_jax import artifacts
from tfx_jax.config import Config, ConfigError
from tfx_jax.data import pipeline, sources
from tfx_jax.data.embedded import text_corpus
from tfx_jax.data.encoded import IMAGE_PLACEHOLDER, write_encoded
from tfx_jax.data.sources import mixture
from tfx_jax.data.tokenizer import (
    NUM_BYTE_PIECES,
    NUM_RESERVED,
    Tokenizer,
    VocabularyTooSmallError,
    train_tokenizer,
)
from tfx_jax.train import vae_trainer

log = logging.getLogger(__name__)


def build_dataset(cfg: Config) -> None:
    sources.of(cfg).build(cfg)


def build_tokenizer(cfg: Config) -> epath.Path:
    """Trains SentencePiece with `model.vocab_size` pieces on the training split's text (the
    text of the examples that can be used: an undecodable or too-small image gives none).

    Raises:
      RecordError: an example cannot be read and data.on_error=raise.
      ConfigError: model.vocab_size cannot hold the text's characters (says what to set).
    """
    examples = sources.of(cfg).open_split(cfg, "train")
    texts = [
        ex["text"].replace(IMAGE_PLACEHOLDER, " ")
        for ex in _readable(examples, "tokenizer", cfg.data.on_error)
    ]
    texts = [t for t in texts if t.strip()]
    texts += list(text_corpus.documents("train"))
    try:
        proto = train_tokenizer(
            texts,
            cfg.model.vocab_size,
            model_type=cfg.data.vocab_model,
            character_coverage=cfg.data.character_coverage,
        )
    except VocabularyTooSmallError as e:
        raise ConfigError(_vocabulary_message(cfg, e)) from e
    path = artifacts.tokenizer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(proto).save(path)
    settings = artifacts.tokenizer_settings(cfg)
    (path.parent / "tokenizer.json").write_text(json.dumps(settings, indent=2))
    print(f"tokenizer: {cfg.model.vocab_size} pieces -> {path}")
    return path


def _vocabulary_message(cfg: Config, e: VocabularyTooSmallError) -> str:
    fixed = NUM_RESERVED + NUM_BYTE_PIECES
    if e.distinct_chars is None:
        return f"model.vocab_size={e.vocab_size}: {e}. Set model.vocab_size >= {e.required}."
    return (
        f"model.vocab_size={e.vocab_size} is too small for the tokenizer's text: its "
        f"{e.distinct_chars} distinct characters at data.character_coverage="
        f"{cfg.data.character_coverage} need {e.required} pieces with the {fixed} reserved and "
        f"byte pieces. Fix: set model.vocab_size >= {e.required}, or lower "
        "data.character_coverage (e.g. 0.9995, or less for text with many rare characters) so "
        "the rarest characters are spelled in bytes."
    )


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
    """Tokenizes every example of every split and encodes its images with the frozen VAE;
    prints per split what was written and skipped, and what `data.overlong` does to the
    examples longer than `data.seq_len` (the records themselves do not depend on it).

    Raises:
      DataLossError: after writing (and recording) every split, when more than
        data.max_lost_fraction of a split's examples would be lost to their length; the message
        names the settings that fix it (the records stay current: no re-encoding needed).
      RecordError: an example cannot be read and data.on_error=raise.
    """
    if cfg.data.source == "mixture":  # each component's records, with the shared tokenizer/VAE
        for name, _, part in mixture.parts(cfg):
            print(f"mixture component {name}:")
            encode(part)
        return
    tokenizer = artifacts.load_tokenizer(cfg)
    encode_images = artifacts.image_encoder(cfg)
    shape = artifacts.latent_shape(cfg)
    source = sources.of(cfg)
    spec = artifacts.sequence_spec(cfg)
    report, losses = {}, []
    for split in source.splits(cfg):
        path = artifacts.encoded_path(cfg, split)
        counters = pipeline.Counters()
        stats = write_encoded(
            path,
            source.open_split(cfg, split),
            tokenizer.encode,
            encode_images,
            shape,
            on_error=cfg.data.on_error,
            observe=lambda record, c=counters: pipeline.survey(record, spec, c),
        )
        report[split] = {**vars(stats), "overlong": vars(counters)}
        print(
            f"encoded/{split}: {stats.examples} examples, {stats.tokens} text tokens, "
            f"{stats.images} images{stats.skipped_summary()} -> {path}\n"
            f"  {counters.overlong_summary(spec.seq_len)} (data.overlong={spec.overlong})"
        )
        if not stats.examples:
            why = "the split is empty"
            if stats.skipped:
                why = (
                    f"all {stats.skipped} were skipped ({stats.reasons()}; the log names them, "
                    "and data.on_error=raise stops at the first)"
                )
            losses.append(f"encoded/{split} has no examples: {why}.")
        elif counters.lost > spec.max_lost_fraction * counters.examples:
            losses.append(pipeline.lost_message(counters, spec, f"encoded/{split}"))
    made_by = {**artifacts.encode_settings(cfg), "stats": report}
    artifacts.made_by_path(cfg).write_text(json.dumps(made_by, indent=2))
    if losses:
        raise sources.DataLossError(losses[0])


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


def _readable(examples: Sequence[dict], what: str, on_error: str) -> Iterator[dict]:
    """Yields the examples that can be used, whole (a folder's caption only if its image
    decodes: what cannot be used contributes nothing anywhere). Unusable ones are counted by
    reason and logged (on_error=skip), or stop the stage naming the example (raise)."""
    skipped: collections.Counter[str] = collections.Counter()
    for i in tqdm(range(len(examples)), desc=what, leave=False, disable=len(examples) < 2000):
        try:
            example = examples[i]
        except sources.RecordError as e:
            if on_error == "raise":
                raise type(e)(
                    f"{what}: example {i} of {examples!r} cannot be used: {e}. Set "
                    "data.on_error=skip to skip such examples (they are counted)."
                ) from e
            skipped[e.reason] += 1
            log.warning("%s: skipping example %d (%s): %s", what, i, e.reason, e)
            continue
        yield example
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        print(f"{what}: skipped {skipped.total()} examples ({reasons}; the log names them)")


def _images(cfg: Config, split: str, limit: int | None = None) -> np.ndarray:
    out = []
    examples = sources.of(cfg).open_split(cfg, split)
    for ex in _readable(examples, f"VAE images ({split})", cfg.data.on_error):
        out.extend(ex["images"])
        if limit and len(out) >= limit:
            break
    if not out:
        raise sources.DataLossError(
            f"the {split} split of data.source={cfg.data.source} has no usable images (the log "
            "says why each was skipped; data.on_error=raise stops at the first, naming it)."
        )
    return np.stack(out[:limit] if limit else out)
