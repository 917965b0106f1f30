"""The data stages behind `python -m tfx_jax data …` and `python -m tfx_jax vae`.

    data build      make the source readable (render the embedded shapes dataset into TFDS
                    ArrayRecord; for tfds/folder/text sources, check the data is there)
    data tokenizer  train SentencePiece on the source's text (+ stdlib docstrings)
    vae             train the KL-VAE on the source's training images; report held-out PSNR
    data encode     tokenize every example and encode its images with the frozen VAE, once,
                    into ArrayRecord (`data/encoded.py`): the training hot path only reads

Everything lives under `data.data_dir` (local or gs://), one bundle per source:

    tfds/…                               TFDS datasets (tfx_shapes; others by default)
    tokenizer.model, tokenizer.json      SentencePiece model (recorded in every checkpoint)
                                         and the source it was trained on
    vae/params.msgpack, vae/vae.json     VAE weights, its settings, latent scale factor, PSNR
    encoded/<source_id>/<split>.array_record, made_by.json
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator

import flax
import jax
import numpy as np
from etils import epath

from tfx_jax.config import Config
from tfx_jax.data import sources

log = logging.getLogger(__name__)


def data_dir(cfg: Config) -> epath.Path:
    return epath.Path(cfg.data.data_dir)


def tokenizer_path(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "tokenizer.model"


def vae_dir(cfg: Config) -> epath.Path:
    return data_dir(cfg) / "vae"


def encoded_path(cfg: Config, split: str) -> epath.Path:
    return data_dir(cfg) / "encoded" / sources.source_id(cfg) / f"{split}.array_record"


def _texts(examples, what: str):
    """The examples' texts: through the source's `text(i)` when it has one (a folder reads its
    .txt files without decoding images), else from the whole examples."""
    if hasattr(examples, "text"):
        return _readable(examples, what, examples.text)
    return _readable(examples, what, lambda i: examples[i]["text"])


def _readable(examples, what: str, read=None):
    """Yields `read(i)` (default: example i) for the examples that can be read; unreadable ones
    are counted and logged."""
    from tqdm.auto import tqdm

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


# ----------------------------------------------------------------------------- stages


def build_dataset(cfg: Config) -> None:
    sources.build(cfg)


def _tokenizer_settings(cfg: Config) -> dict:
    return {
        "source": sources.source_id(cfg),
        "vocab_size": cfg.model.vocab_size,
        "model_type": cfg.data.vocab_model,
    }


def tokenizer_is_current(cfg: Config) -> bool:
    meta = tokenizer_path(cfg).parent / "tokenizer.json"
    if not tokenizer_path(cfg).exists():
        return False
    if not meta.exists():  # made by hand or by an older version: trust it
        return True
    return json.loads(meta.read_text()) == _tokenizer_settings(cfg)


def build_tokenizer(cfg: Config) -> epath.Path:
    """Trains SentencePiece with `model.vocab_size` pieces on the training split's text."""
    from tfx_jax.data.embedded import text_corpus
    from tfx_jax.data.encoded import IMAGE_PLACEHOLDER
    from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer

    examples = sources.open_split(cfg, "train")
    texts = [t.replace(IMAGE_PLACEHOLDER, " ") for t in _texts(examples, "tokenizer")]
    texts = [t for t in texts if t.strip()]
    texts += list(text_corpus.documents("train"))
    proto = train_tokenizer(texts, cfg.model.vocab_size, model_type=cfg.data.vocab_model)
    path = tokenizer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(proto).save(path)
    (path.parent / "tokenizer.json").write_text(json.dumps(_tokenizer_settings(cfg), indent=2))
    print(f"tokenizer: {cfg.model.vocab_size} pieces -> {path}")
    return path


def _vae_model(cfg: Config):
    from tfx_jax.models.vae import VAE

    return VAE(
        latent_channels=cfg.model.latent_channels,
        downsample=cfg.vae.downsample,
        channels=cfg.vae.channels,
    )


def _images(cfg: Config, split: str, limit: int | None = None) -> np.ndarray:
    out = []
    for ex in _readable(sources.open_split(cfg, split), f"VAE images ({split})"):
        out.extend(ex["images"])
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"the {split} split of data.source={cfg.data.source} has no images.")
    return np.stack(out[:limit] if limit else out)


def train_vae(cfg: Config) -> dict:
    """Trains the VAE on the training images (sharded, logged and checkpointed under vae/,
    resumable: `vae_trainer.run`); returns (and saves) its summary."""
    from tfx_jax.train import vae_trainer

    images = _images(cfg, "train")
    held_split = "validation" if "validation" in sources.splits(cfg) else "train"
    held_out = _images(cfg, held_split, limit=256)
    out = vae_dir(cfg)
    result = vae_trainer.run(cfg, images, held_out, out)
    if jax.process_index() == 0:
        (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(result["params"]))
    summary = {
        **_vae_settings(cfg),
        "scale_factor": result["scale_factor"],
        "heldout_psnr_db": result["heldout_psnr_db"],
    }
    if jax.process_index() == 0:
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
        "source": sources.source_id(cfg),
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


def _encode_settings(cfg: Config) -> dict:
    """What the encoded records depend on: a change makes them stale."""
    tok = hashlib.sha256(tokenizer_path(cfg).read_bytes()).hexdigest()
    vae = None
    if sources.has_images(cfg):
        vae = json.loads((vae_dir(cfg) / "vae.json").read_text())
    return {"source": sources.source_id(cfg), "tokenizer_sha256": tok, "vae": vae}


def _made_by(cfg: Config) -> epath.Path:
    return encoded_path(cfg, "train").parent / "made_by.json"


def _latent_shape(cfg: Config) -> tuple[int, int, int]:
    return (cfg.model.latent_size, cfg.model.latent_size, cfg.model.latent_channels)


def image_encoder(cfg: Config, device: jax.Device | None = None):
    """uint8 images [N, H, W, 3] -> scaled latents (numpy) with the frozen VAE, or None for a
    text-only source. `device`: where the VAE runs (default: the default device)."""
    from tfx_jax.train import vae_trainer

    if not sources.has_images(cfg):
        return None
    model, params, scale = load_vae(cfg)
    fn = jax.jit(functools.partial(vae_trainer.encode_images, model=model, scale_factor=scale))
    params = jax.device_put(params, device)

    def encode_images(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(params, images_uint8=jax.device_put(x, device)))

    return encode_images


class _CpuImageEncoder:
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


def _on_the_fly_source(cfg: Config, split: str, tokenizer):
    from tfx_jax.data.encoded import OnTheFlySource

    return OnTheFlySource(
        sources.open_split(cfg, split),
        tokenizer.encode,
        _CpuImageEncoder(cfg) if sources.has_images(cfg) else None,
        _latent_shape(cfg),
    )


def encode(cfg: Config) -> None:
    """Tokenizes every example of every split and encodes its images with the frozen VAE."""
    from tfx_jax.data.encoded import write_encoded
    from tfx_jax.data.tokenizer import Tokenizer

    tok_file = tokenizer_path(cfg)
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} is missing: run `python -m tfx_jax data tokenizer`.")
    tokenizer = Tokenizer.from_file(tok_file)
    encode_images = image_encoder(cfg)
    shape = _latent_shape(cfg)
    report = {}
    for split in sources.splits(cfg):
        path = encoded_path(cfg, split)
        stats = write_encoded(
            path,
            sources.open_split(cfg, split),
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
    _made_by(cfg).write_text(json.dumps({**_encode_settings(cfg), "stats": report}, indent=2))


def encoded_is_current(cfg: Config) -> bool:
    made_by = _made_by(cfg)
    if not made_by.exists() or not all(encoded_path(cfg, s).exists() for s in sources.splits(cfg)):
        return False
    saved = json.loads(made_by.read_text())
    saved.pop("stats", None)
    return saved == _encode_settings(cfg)


def prepare_all(cfg: Config) -> None:
    """Every stage whose output is missing or stale, in order (what `make demo` runs first)."""
    build_dataset(cfg)
    if not tokenizer_is_current(cfg):
        build_tokenizer(cfg)
    if sources.has_images(cfg) and not vae_is_current(cfg):
        train_vae(cfg)
    if cfg.data.latents == "precomputed" and not encoded_is_current(cfg):
        encode(cfg)


# ----------------------------------------------------------------------------- batches


def batches(cfg: Config, split: str = "train", **kw) -> Iterator[dict[str, np.ndarray]]:
    """This process's packed batches of the configured source (a checkpointable Grain
    iterator over the encoded records)."""
    from tfx_jax.data import pipeline
    from tfx_jax.data.encoded import EncodedSource
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
    if d.latents == "on_the_fly":
        source = _on_the_fly_source(cfg, split, tokenizer)
    elif encoded_is_current(cfg):
        source = EncodedSource(encoded_path(cfg, split))
    else:
        raise FileNotFoundError(
            f"the encoded records in {encoded_path(cfg, split).parent} are missing or were made "
            "with another tokenizer, VAE or source: run `python -m tfx_jax data encode` (or "
            "`data all`, which also makes whatever they depend on), or set "
            "data.latents=on_the_fly to encode while training."
        )
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
        spec,
        batch_size=d.global_batch_size // jax.process_count(),
        seed=d.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_packing_bins=d.packing_bins,
        worker_count=d.worker_count,
        read_threads=d.read_threads,
        **kw,
    )
    return iter(ds)
