"""Checks of the `data` section that ask the source registry (`tfx_jax.config.validate` calls
`validate_data`): kept out of `data/config.py` so that section stays a leaf."""

from __future__ import annotations

import dataclasses

from tfx_jax.data import sources
from tfx_jax.data.config import DataConfigError, RunConfig
from tfx_jax.data.sources.mixture import components

__all__ = ["OVERLONG", "validate_data"]


OVERLONG = ("split", "truncate", "drop")


def validate_data(cfg: RunConfig) -> None:
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
        d.source not in sources.names() or bool(d.mixture) == sources.get(d.source).composite,
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
