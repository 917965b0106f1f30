"""What the data stages make under `data.data_dir`, whether it is current, and reading it back.

Everything lives under `data.data_dir` (local or gs://), one bundle per source:

    tfds/…                               TFDS datasets (tfx_shapes; others by default)
    tokenizer.model, tokenizer.json      SentencePiece model (recorded in every checkpoint)
                                         and the source it was trained on
    vae/params.msgpack, vae/vae.json     VAE weights, its settings, latent scale factor, PSNR
    encoded/<source_id>/<split>-KKKKK-of-NNNNN.array_record (+ .index.npz, .done), made_by.json
                                         the shards of each split, their length indexes and
                                         completion markers; made_by.json once all are done

Each artifact records what it was made from (its `*_settings`); `*_is_current` compares that
with the config, so `data all` (`tfx_jax.stages`) redoes exactly the stale ones and `batches`
refuses stale records with the command to run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import flax
import jax
import numpy as np
from etils import epath

from tfx_jax.config import Config, ModelConfig
from tfx_jax.data import batches as data_batches
from tfx_jax.data import encoded, sources
from tfx_jax.data.encoded import EncodedSource, OnTheFlySource
from tfx_jax.data.tokenizer import Tokenizer
from tfx_jax.models.vae import VAE, Codec

# ----------------------------------------------------------------------------- paths


def data_dir(cfg: Config) -> epath.Path:
    return epath.Path(cfg.data.data_dir)


def tokenizer_path(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "tokenizer.model"


def vae_dir(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "vae"


def encoded_path(cfg: Config, split: str) -> epath.Path:
    """The name of `split`'s records: `EncodedSource` reads the shards it names
    (`encoded.shard_paths`)."""
    return data_dir(cfg) / "encoded" / sources.of(cfg).source_id(cfg) / f"{split}.array_record"


def made_by_path(cfg: Config) -> epath.Path:
    """What the encoded records were made from, and the encode stage's counts."""
    return encoded_path(cfg, "train").parent / "made_by.json"


def latent_shape(m: ModelConfig) -> tuple[int, int, int]:
    return (m.latent_size, m.latent_size, m.latent_channels)


# ----------------------------------------------------------------------------- staleness


def tokenizer_settings(cfg: Config) -> dict:
    settings = {
        "source": sources.of(cfg).source_id(cfg),
        "vocab_size": cfg.model.vocab_size,
        "model_type": cfg.data.vocab_model,
    }
    # Recorded only when not the default, so tokenizers made before the setting stay current.
    if cfg.data.character_coverage != 1.0:
        settings["character_coverage"] = cfg.data.character_coverage
    if cfg.data.tokenizer_sample != type(cfg.data).tokenizer_sample:
        settings["tokenizer_sample"] = cfg.data.tokenizer_sample
    if cfg.data.max_examples:
        settings["max_examples"] = cfg.data.max_examples
    return settings


def tokenizer_is_current(cfg: Config) -> bool:
    meta = tokenizer_path(cfg).parent / "tokenizer.json"
    if not tokenizer_path(cfg).exists():
        return False
    if not meta.exists():  # made by hand or by an older version: trust it
        return True
    return json.loads(meta.read_text()) == tokenizer_settings(cfg)


def vae_settings(cfg: Config) -> dict:
    """What determines the trained VAE; a saved VAE with other settings is stale."""
    v = cfg.vae
    # data.max_examples (a trial) only when set, so VAEs made before the setting stay current.
    trial = {"max_examples": cfg.data.max_examples} if cfg.data.max_examples else {}
    return trial | {
        "latent_channels": cfg.model.latent_channels,
        "downsample": v.downsample,
        "channels": list(v.channels),
        "steps": v.steps,
        "batch_size": v.batch_size,
        "learning_rate": v.learning_rate,
        "kl_weight": v.kl_weight,
        "image_size": cfg.data.image_size,
        "source": sources.of(cfg).source_id(cfg),
    }


def vae_is_current(cfg: Config) -> bool:
    path = vae_dir(cfg) / "vae.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in vae_settings(cfg).items())


def encode_settings(cfg: Config) -> dict:
    """What the encoded records depend on: a change makes them stale. FileNotFoundError naming
    the command to run when the tokenizer or (for images) the VAE is not made yet."""
    tok = hashlib.sha256(_made_tokenizer(cfg).read_bytes()).hexdigest()
    vae = None
    if sources.of(cfg).has_images:
        vae = json.loads(_made_vae(cfg).read_text())
    settings = {"source": sources.of(cfg).source_id(cfg), "tokenizer_sha256": tok, "vae": vae}
    if cfg.data.max_examples:  # a trial's records hold the first max_examples of each split
        settings["max_examples"] = cfg.data.max_examples
    return settings


def encoded_is_current(cfg: Config) -> bool:
    components = sources.of(cfg).components(cfg)
    if components:  # a mixture: each component has its own records
        return all(encoded_is_current(part) for _, _, part in components)
    """Whether `data encode` finished for these settings: made_by.json (written last) matches
    them and every shard it lists is there with its completion marker (one listing of the
    directory, not a read per shard: cheap for thousands of shards in a bucket)."""
    made_by = made_by_path(cfg)
    if not made_by.exists():
        return False
    saved = json.loads(made_by.read_text())
    saved.pop("stats", None)
    shards = saved.pop("shards", None)
    splits = sources.of(cfg).splits(cfg)
    if saved != encode_settings(cfg) or not shards or any(s not in shards for s in splits):
        return False
    present = {p.name for p in made_by.parent.iterdir()}
    return all(
        name in present and encoded.marker_path(made_by.parent / name).name in present
        for s in splits
        for name in shards[s]
    )


# ----------------------------------------------------------------------------- loading


def _made_tokenizer(cfg: Config) -> epath.Path:
    """The tokenizer's path, or FileNotFoundError saying how to make it (every stage alike)."""
    path = tokenizer_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m tfx_jax data tokenizer`.")
    return path


def _made_vae(cfg: Config) -> epath.Path:
    """The trained VAE's vae.json, or FileNotFoundError saying how to make it."""
    path = vae_dir(cfg) / "vae.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no trained VAE in {vae_dir(cfg)}: run `python -m tfx_jax vae` first."
        )
    return path


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The trained SentencePiece tokenizer, or FileNotFoundError saying how to make it."""
    return Tokenizer.from_file(_made_tokenizer(cfg))


def vae_model(cfg: Config) -> VAE:
    return VAE(
        latent_channels=cfg.model.latent_channels,
        downsample=cfg.vae.downsample,
        channels=cfg.vae.channels,
    )


def load_vae(cfg: Config) -> Codec:
    """The trained VAE: a `Codec`, which unpacks as (model, params, scale_factor)."""
    out = vae_dir(cfg)
    summary = json.loads(_made_vae(cfg).read_text())
    if summary["latent_channels"] != cfg.model.latent_channels or summary["downsample"] != (
        cfg.vae.downsample
    ):
        raise ValueError(
            f"the VAE in {out} has {summary['latent_channels']} channels and downsample "
            f"{summary['downsample']}, the config wants {cfg.model.latent_channels} and "
            f"{cfg.vae.downsample}: retrain it with `python -m tfx_jax vae`."
        )
    model = vae_model(cfg)
    template = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), np.float32),
        )
    )["params"]
    template = flax.linen.meta.unbox(template)
    params = flax.serialization.from_bytes(template, (out / "params.msgpack").read_bytes())
    return Codec(model, params, float(summary["scale_factor"]))


def image_encoder(cfg: Config, device: jax.Device | None = None):
    """uint8 images [N, H, W, 3] -> scaled latents (numpy) with the frozen VAE, or None for a
    text-only source. `device`: where the VAE runs (default: the default device)."""
    if not sources.of(cfg).has_images:
        return None
    model, params, scale = load_vae(cfg)
    codec = Codec(model, jax.device_put(params, device), scale)

    def encode_images(x: np.ndarray) -> np.ndarray:
        return np.asarray(codec.encode(jax.device_put(x, device)))

    return encode_images


class CpuImageEncoder:
    """`image_encoder` on the host CPU, built on first use in the process that uses it: Grain
    worker processes receive a pickled copy without the compiled function and build their own.
    The CPU, because the accelerators belong to the train step."""

    def __init__(self, cfg: Config):
        self._cfg, self._fn = cfg, None

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        if self._fn is None:
            self._fn = image_encoder(self._cfg, jax.local_devices(backend="cpu")[0])
        return self._fn(images_uint8)

    def __getstate__(self) -> dict:
        return {"_cfg": self._cfg, "_fn": None}


# ----------------------------------------------------------------------------- batches


def _records(cfg: Config, split: str, tokenizer: Tokenizer):
    """One source's encoded records of `split`: read from `data encode`'s files, or made as they
    are read (data.latents=on_the_fly)."""
    source = sources.of(cfg)
    if cfg.data.latents == "on_the_fly":
        return OnTheFlySource(
            source.open_limited(cfg, split),
            tokenizer.encode,
            CpuImageEncoder(cfg) if source.has_images else None,
            latent_shape(cfg.model),
        )
    if encoded_is_current(cfg):
        return EncodedSource(encoded_path(cfg, split))
    raise FileNotFoundError(
        f"the encoded records in {encoded_path(cfg, split).parent} are missing or were made "
        "with another tokenizer, VAE or source: run `python -m tfx_jax data encode` (or "
        "`data all`, which also makes whatever they depend on), or set "
        "data.latents=on_the_fly to encode while training."
    )


def batches(cfg: Config, split: str = "train", **kw) -> Iterator[dict[str, np.ndarray]]:
    """This process's packed batches of `split` of the configured source (`data.batches`, the
    pipeline's entry point), over `data encode`'s records or, with data.latents=on_the_fly,
    examples tokenized and encoded as they are read. `kw`: `pipeline.packed_dataset` options."""
    if sources.of(cfg).makes_batches:
        return data_batches.batches(cfg, split, records=None)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"{tokenizer_path(cfg)} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}."
        )
    records = lambda part, s: _records(part, s, tokenizer)  # noqa: E731
    return data_batches.batches(cfg, split, records, **kw)
