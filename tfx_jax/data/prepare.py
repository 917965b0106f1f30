"""The data stages behind `python -m tfx_jax data …` and `python -m tfx_jax vae`.

    data build      render the embedded shapes dataset into TFDS ArrayRecord
    data tokenizer  train SentencePiece on its text (captions, interleaved docs, stdlib docstrings)
    vae             train the KL-VAE on its training images; report held-out PSNR
    data latents    encode every image once with the frozen VAE into ArrayRecord

Everything lives under `data.data_dir` (local or gs://):

    tfds/tfx_shapes/<config>/…       the dataset
    tokenizer.model                  SentencePiece model (recorded in every checkpoint)
    vae/params.msgpack, vae/vae.json VAE weights, its config, latent scale factor, PSNR
    latents/<config>/<split>.array_record
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator

import flax
import jax
import numpy as np
from etils import epath

from tfx_jax.config import Config

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "heldout")


def data_dir(cfg: Config) -> epath.Path:
    return epath.Path(cfg.data.data_dir)


def tokenizer_path(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "tokenizer.model"


def vae_dir(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "vae"


def latents_path(cfg: Config, split: str) -> epath.Path:
    name = f"{cfg.data.tfds_config}_{cfg.data.image_size}px"
    return data_dir(cfg) / "latents" / name / f"{split}.array_record"


def _source(cfg: Config, split: str):
    from tfx_jax.data import builders

    return builders.data_source(
        str(data_dir(cfg) / "tfds"), split, cfg.data.tfds_config, cfg.data.image_size
    )


# ----------------------------------------------------------------------------- stages


def build_dataset(cfg: Config) -> None:
    from tfx_jax.data import builders

    builders.build(str(data_dir(cfg) / "tfds"), cfg.data.tfds_config, cfg.data.image_size)


def build_tokenizer(cfg: Config) -> epath.Path:
    """Trains SentencePiece with `model.vocab_size` pieces on the training split's text."""
    from tfx_jax.data import text_corpus
    from tfx_jax.data.pipeline import IMAGE_PLACEHOLDER
    from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer

    source = _source(cfg, "train")
    texts = [source[i]["text"].replace(IMAGE_PLACEHOLDER, " ") for i in range(len(source))]
    texts += list(text_corpus.documents("train"))
    proto = train_tokenizer(texts, cfg.model.vocab_size, model_type=cfg.data.vocab_model)
    path = tokenizer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(proto).save(path)
    log.info("tokenizer: %d pieces -> %s", cfg.model.vocab_size, path)
    return path


def _vae_model(cfg: Config):
    from tfx_jax.models.vae import VAE

    return VAE(
        latent_channels=cfg.model.latent_channels,
        downsample=cfg.vae.downsample,
        channels=cfg.vae.channels,
    )


def _images(cfg: Config, split: str, limit: int | None = None) -> np.ndarray:
    source = _source(cfg, split)
    out = []
    for i in range(len(source)):
        out.extend(source[i]["images"])
        if limit and len(out) >= limit:
            break
    return np.stack(out[:limit] if limit else out)


def train_vae(cfg: Config) -> dict:
    """Trains the VAE on the training images; returns (and saves) its summary."""
    from tfx_jax import vae_train

    v = cfg.vae
    images = _images(cfg, "train")
    held_out = _images(cfg, "validation", limit=256)
    print(f"VAE: {len(images)} training images, {v.steps} steps of {v.batch_size}")
    result = vae_train.train_vae(
        _vae_model(cfg),
        images,
        steps=v.steps,
        batch_size=v.batch_size,
        learning_rate=v.learning_rate,
        kl_weight=v.kl_weight,
        eval_images_uint8=held_out,
        log_every=max(v.steps // 10, 1),
        seed=cfg.data.seed,
        log_fn=lambda r: print(
            f"  vae step {r['step']:>5}  loss {r['loss']:.4f}  "
            f"held-out PSNR {r['eval_psnr']:.2f} dB"
        ),
    )
    out = vae_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(result.params))
    summary = {
        **_vae_settings(cfg),
        "scale_factor": result.scale_factor,
        "heldout_psnr_db": result.history[-1]["eval_psnr"],
    }
    (out / "vae.json").write_text(json.dumps(summary, indent=2))
    print(f"VAE saved to {out}: held-out PSNR {summary['heldout_psnr_db']:.2f} dB")
    return summary


def _vae_settings(cfg: Config) -> dict:
    """What determines the trained VAE; a saved VAE with other settings is stale."""
    v = cfg.vae
    return {
        "latent_channels": cfg.model.latent_channels,
        "downsample": v.downsample,
        "channels": list(v.channels),
        "steps": v.steps,
        "batch_size": v.batch_size,
        "learning_rate": v.learning_rate,
        "kl_weight": v.kl_weight,
        "image_size": cfg.data.image_size,
        "tfds_config": cfg.data.tfds_config,
    }


def vae_is_current(cfg: Config) -> bool:
    path = vae_dir(cfg) / "vae.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in _vae_settings(cfg).items())


def load_vae(cfg: Config):
    """Returns (model, params, scale_factor) of the trained VAE."""
    out = vae_dir(cfg)
    if not (out / "vae.json").exists():
        raise FileNotFoundError(f"no trained VAE in {out}: run `python -m tfx_jax vae` first.")
    summary = json.loads((out / "vae.json").read_text())
    if summary["latent_channels"] != cfg.model.latent_channels or summary["downsample"] != (
        cfg.vae.downsample
    ):
        raise ValueError(
            f"the VAE in {out} has {summary['latent_channels']} channels and downsample "
            f"{summary['downsample']}, the config wants {cfg.model.latent_channels} and "
            f"{cfg.vae.downsample}: retrain it with `python -m tfx_jax vae`."
        )
    model = _vae_model(cfg)
    template = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            np.zeros((1, cfg.data.image_size, cfg.data.image_size, 3), np.float32),
        )
    )["params"]
    template = flax.linen.meta.unbox(template)
    params = flax.serialization.from_bytes(template, (out / "params.msgpack").read_bytes())
    return model, params, float(summary["scale_factor"])


def encode_latents(cfg: Config) -> None:
    """Encodes every split's images once with the frozen VAE."""
    from tfx_jax import vae_train
    from tfx_jax.data.latents import write_latents

    model, params, scale = load_vae(cfg)
    encode = jax.jit(functools.partial(vae_train.encode_images, model=model, scale_factor=scale))
    shape = (cfg.model.latent_size, cfg.model.latent_size, cfg.model.latent_channels)
    for split in SPLITS:
        n = write_latents(
            latents_path(cfg, split),
            _source(cfg, split),
            lambda x: np.asarray(encode(params, images_uint8=x)),
            shape,
        )
        print(f"latents/{split}: {n} images -> {latents_path(cfg, split)}")
    # Which VAE made these latents: a retrained VAE makes them stale.
    (latents_path(cfg, "train").parent / "vae.json").write_text(
        (vae_dir(cfg) / "vae.json").read_text()
    )


def prepare_all(cfg: Config) -> None:
    """Every stage whose output is missing, in order (what `make demo` runs first)."""
    build_dataset(cfg)
    if not tokenizer_path(cfg).exists():
        build_tokenizer(cfg)
    if not vae_is_current(cfg):
        train_vae(cfg)
    made_by = latents_path(cfg, "train").parent / "vae.json"
    current = (vae_dir(cfg) / "vae.json").read_text()
    if not all(latents_path(cfg, s).exists() for s in SPLITS) or (
        not made_by.exists() or made_by.read_text() != current
    ):
        encode_latents(cfg)


# ----------------------------------------------------------------------------- batches


def shapes_batches(cfg: Config, split: str = "train", **kw) -> Iterator[dict[str, np.ndarray]]:
    """This process's packed batches of the embedded dataset (a checkpointable Grain iterator)."""
    from tfx_jax.data import pipeline
    from tfx_jax.data.latents import LatentSource
    from tfx_jax.data.tokenizer import Tokenizer

    d, m = cfg.data, cfg.model
    tok_file = tokenizer_path(cfg)
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} is missing: run `python -m tfx_jax data tokenizer`.")
    tokenizer = Tokenizer.from_file(tok_file)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(
            f"{tok_file} has {tokenizer.vocab_size} pieces but model.vocab_size={m.vocab_size}."
        )
    source = pipeline.ZipSource(_source(cfg, split), LatentSource(latents_path(cfg, split)))
    spec = pipeline.SequenceSpec(
        seq_len=d.seq_len,
        patch_size=m.patch_size,
        latent_channels=m.latent_channels,
        caption_first_prob=d.caption_first_prob,
        overlong=d.overlong,
        on_error=d.on_error,
        caption_drop_prob=cfg.diffusion.p_uncond,
        mark_image_first=cfg.diffusion.noise_limit_image_first,
    )
    ds = pipeline.packed_dataset(
        source,
        tokenizer.encode,
        spec,
        batch_size=d.global_batch_size // jax.process_count(),
        seed=d.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_packing_bins=d.packing_bins,
        worker_count=d.worker_count,
        **kw,
    )
    return iter(ds)
