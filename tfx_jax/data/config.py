"""The `data` section of the config (`DataConfig`) and its checks.

`tfx_jax.config` composes `DataConfig` into `Config` and calls `validate_data` from `validate`;
what a source needs of the settings its own `Source.validate` checks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tfx_jax.data import sources
from tfx_jax.data.sources import DataConfigError
from tfx_jax.data.sources.mixture import components

if TYPE_CHECKING:
    from tfx_jax.config import Config

__all__ = ["DataConfig", "DataConfigError", "validate_data"]


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
    # when it has more (read without decoding images), all of them in order otherwise.
    tokenizer_sample: int = 100_000
    # Every stage (tokenizer, VAE, encode) reads only the first N examples of each split; for
    # trials on a large source. 0 = all.
    max_examples: int = 0
    # `data encode` writes each split as ArrayRecord shards of this many examples (the source's
    # order); the shards are spread over the processes of a --distributed job, and a killed
    # encode resumes at the first unfinished shard.
    encode_shard_size: int = 16384

    @property
    def min_image_side(self) -> int:
        """`min_image_size` resolved: image_size // 4 (at least 1) when 0."""
        return self.min_image_size or max(1, self.image_size // 4)


OVERLONG = ("split", "truncate", "drop")


def validate_data(cfg: Config) -> None:
    """Checks the `data` section (and, for a source with images, that the VAE's latents fit
    the model): cheap, nothing is read.

    Raises:
      DataConfigError: naming the key, the value and what to do.
    """
    d, m = cfg.data, cfg.model

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise DataConfigError(msg)

    need(
        d.seq_len >= m.num_patches + 2,
        f"data.seq_len={d.seq_len} cannot hold one image (BOI + {m.num_patches} patches + EOI).",
    )
    need(d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be > 0.")
    need(d.mix_by in ("tokens", "examples"), f"data.mix_by={d.mix_by!r}: tokens | examples.")
    need(
        bool(d.mixture) == (d.source == "mixture"),
        "data.mixture lists the sources of data.source=mixture: set both or neither "
        f"(data.source={d.source!r}, {len(d.mixture)} mixture entries).",
    )
    for part in components(d):
        validate_data(dataclasses.replace(cfg, data=part.data))
    source = sources.of(cfg)
    source.validate(cfg)
    need(
        "{label}" in d.caption_template,
        f"data.caption_template={d.caption_template!r} must contain {{label}}.",
    )
    need(d.overlong in OVERLONG, f"data.overlong={d.overlong!r}: {' | '.join(OVERLONG)}.")
    need(
        0.0 <= d.max_lost_fraction <= 1.0,
        f"data.max_lost_fraction={d.max_lost_fraction} must be in [0, 1] (0.01: stop when more "
        "than 1% of a split's examples would be lost).",
    )
    need(
        0.0 < d.character_coverage <= 1.0,
        f"data.character_coverage={d.character_coverage} must be in (0, 1] (1.0 or 0.9995).",
    )
    need(
        d.min_image_size >= 0,
        f"data.min_image_size={d.min_image_size} must be >= 0 (0: data.image_size // 4; "
        "1: every image).",
    )
    need(
        d.latents in ("precomputed", "on_the_fly"),
        f"data.latents={d.latents!r}: precomputed | on_the_fly.",
    )
    need(d.on_error in ("skip", "raise"), f"data.on_error={d.on_error!r}: skip | raise.")
    need(0.0 <= d.caption_first_prob <= 1.0, "data.caption_first_prob must be in [0, 1].")
    need(
        not d.max_images_per_row or d.max_images_per_row >= d.seq_len // (m.num_patches + 2),
        f"data.max_images_per_row={d.max_images_per_row} is fewer than a row can hold "
        f"({d.seq_len // (m.num_patches + 2)}): packing would produce rows the model cannot see "
        "every image of. Use 0 (automatic).",
    )
    if source.has_images:
        v = cfg.vae
        need(v.downsample in (4, 8), f"vae.downsample={v.downsample}: use 4 or 8.")
        need(
            d.image_size // v.downsample == m.latent_size and d.image_size % v.downsample == 0,
            f"data.image_size={d.image_size} / vae.downsample={v.downsample} must equal "
            f"model.latent_size={m.latent_size}.",
        )
    need(
        d.tokenizer_sample > 0,
        f"data.tokenizer_sample={d.tokenizer_sample} must be > 0 (texts the tokenizer trains on).",
    )
    need(d.max_examples >= 0, f"data.max_examples={d.max_examples} must be >= 0 (0 = all).")
    need(
        d.encode_shard_size > 0,
        f"data.encode_shard_size={d.encode_shard_size} must be > 0 (examples per encoded shard).",
    )
