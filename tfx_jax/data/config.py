"""The `data` section of the config (`DataConfig`), its error, and `RunConfig`: what data code
reads of a run's config. A leaf: it imports nothing of the project, so every data module can
name these types and `tfx_jax.config` can compose them without an import circle (the checks
that need the source registry live in `tfx_jax.data.checks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

__all__ = ["DataConfig", "DataConfigError", "RunConfig"]


class DataConfigError(ValueError):
    """A `data` section that cannot run (`tfx_jax.config.validate` raises it as ConfigError)."""


class RunConfig(Protocol):
    """What data code reads of a run's config; `tfx_jax.config.Config` is one. Data code reads
    its own section, and of the others only the numbers that shape a sequence or an image
    (`model.num_patches`, `patch_size`, `latent_*`, `vocab_size`; `vae.downsample`;
    `diffusion.p_uncond`, `noise_limit_image_first`) — never the trainer's settings."""

    @property
    def data(self) -> DataConfig: ...

    @property
    def model(self) -> Any: ...

    @property
    def vae(self) -> Any: ...

    @property
    def diffusion(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the trainer reads and how sequences are packed."""

    # Where examples come from: a source of tfx_jax/data/sources/ (one module each):
    #   synthetic  random token/patch batches made from (seed, step); no files
    #   shapes     the embedded tfx_shapes TFDS dataset (generated locally)
    #   tfds       any prepared TFDS dataset by name (tfds_name), fields mapped by the keys below
    #   folder     images with same-name .txt captions under `path` (train/ validation/ subdirs
    #              or a deterministic 5% validation split by file name)
    #   text       plain UTF-8 text files under `path` (text-only documents)
    #   mixture    several of the above at weights (`mixture`, `mix_by`)
    source: str = "synthetic"
    # source=mixture: one "NAME WEIGHT key=value ..." per source; each component is this data
    # section with its own key=value settings (e.g. source=text path=corpus), e.g.
    #   ("text 0.5 source=text path=corpus", "shapes 0.5 source=shapes tfds_config=default").
    # The weights are shares of tokens (mix_by=tokens: Transfusion §4.1 mixes by tokens) or of
    # examples (mix_by=examples); they need not sum to 1.
    mixture: tuple[str, ...] = ()
    mix_by: str = "tokens"
    data_dir: str = "data_cache"  # TFDS data, tokenizer, VAE and encoded records (local or gs://)
    tfds_config: str = "default"  # tfx_shapes config: default | default_64px | tiny | single
    tfds_name: str = ""  # source=tfds: e.g. "mnist", "cifar10", "coco_captions", "mnist:3.0.1"
    tfds_data_dir: str = ""  # where that dataset is prepared; "" = <data_dir>/tfds
    tfds_splits: str = ""  # "train=train,validation=test"; "" = train and validation|test
    image_key: str = "image"  # source=tfds: the image feature ("/" for nested: "image/encoded")
    caption_key: str = ""  # source=tfds: a text feature, e.g. "captions/text" (a list: one is used)
    label_key: str = ""  # source=tfds: a ClassLabel feature, e.g. "label" (-> caption_template)
    caption_template: str = "{label}"  # label -> caption, e.g. "a photo of a {label}"
    path: str = ""  # source=folder|text: a directory (searched recursively) or a glob
    # "precomputed": read the records `data encode` wrote once (tokens + VAE latents);
    # "on_the_fly": tokenize and VAE-encode in the input pipeline (same batches, more compute).
    latents: str = "precomputed"
    image_size: int = 32
    # Images smaller than this on their shorter side are skipped as "too small" (counted; with
    # on_error=raise they stop the stage): upscaling a tiny image trains on a blur. 0 = automatic,
    # image_size // 4; 1 accepts every image. `generate --image` applies the same rule.
    min_image_size: int = 0
    vocab_model: str = "bpe"  # SentencePiece model type: bpe | unigram
    # The share of the tokenizer text's characters that get a piece of their own; the rarest rest
    # are spelled in UTF-8 bytes (byte fallback: every character still round-trips). 1.0 (every
    # character its own piece, SentencePiece's advice for small alphabets such as English or code)
    # keeps tokenizers of earlier versions unchanged; 0.9995 (SentencePiece's default, meant for
    # large alphabets: CJK, emoji-rich text) when the distinct characters do not fit the vocab.
    character_coverage: float = 1.0
    seq_len: int = 1024
    global_batch_size: int = 32
    max_images_per_row: int = 0  # 0 = the most that fit: seq_len // (num_patches + 2)
    caption_first_prob: float = 0.8  # Transfusion §4.1: caption before its image 80% of the time
    # An example longer than seq_len (every case is counted, and reported by `data encode` and the
    # input pipeline):
    #   split     text documents continue across rows: seq_len-sized pieces, each its own
    #             document (BOS on the first only, EOS on the last); no token is lost. Caption
    #             examples keep their image and cut the caption to fit; interleaved documents keep
    #             what fits, up to an image boundary (images are never split).
    #   truncate  as split, but text documents keep only their first seq_len tokens.
    #   drop      the whole example is left out.
    # An example that cannot fit at all (an image with no room) is lost under every policy.
    overlong: str = "split"
    # The largest share of a split's examples that may be lost (dropped as over-long, or too long
    # to fit at all) before `data encode` and training stop and say which settings fix it.
    max_lost_fraction: float = 0.01
    on_error: str = "skip"  # an unreadable record or too-small image: "skip" (counted) or "raise"
    packing_bins: int = 64
    worker_count: int = 0  # Grain prefetch processes (0 = in-process)
    read_threads: int = 0  # threads reading records ahead (helps gs://; 0 = fastest per core)
    seed: int = 0
    # source=tfds: a text feature (or a sequence of them, joined by blank lines) of a text-only
    # dataset, e.g. "text" of wikipedia or c4: each record is one document (no image_key used).
    text_key: str = ""
    # The tokenizer trains on at most this many texts of the training split: a seeded sample
    # when it has more (images decoded, as encode does), all of them in order otherwise.
    tokenizer_sample: int = 100_000
    # Every stage (tokenizer, VAE, encode) reads only the first N examples of each split; for
    # trials on a large source. Unset (the default, 0) = all; a value given (`--set`, a mixture
    # entry) must be >= 1 (`explicit_value_error`).
    max_examples: int = 0
    # `data encode` writes each split as ArrayRecord shards of this many examples (the source's
    # order); the shards are spread over the processes of a --distributed job, and a killed
    # encode resumes at the first unfinished shard.
    encode_shard_size: int = 16384

    @property
    def min_image_side(self) -> int:
        """`min_image_size` resolved: image_size // 4 (at least 1) when 0."""
        return self.min_image_size or max(1, self.image_size // 4)


def explicit_value_error(key: str, value: Any) -> str | None:
    """The one-line error for a data setting given explicitly (`--set data.KEY=VALUE`, a
    mixture entry's KEY=VALUE) with a value only its default may have, else None:
    `max_examples` is 0 when unset (every example), but 0 given reads as "no example"."""
    if key == "max_examples" and isinstance(value, int) and value < 1:
        return (
            f"data.max_examples={value} must be >= 1 when set (the first N examples of each "
            "split; leave it unset for all of them)."
        )
    return None
