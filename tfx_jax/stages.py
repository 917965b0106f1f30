"""The data stages behind `python -m tfx_jax data …` and `python -m tfx_jax vae`.

    data build      make the source readable (render the embedded shapes dataset into TFDS
                    ArrayRecord; for tfds/folder/text sources, check the data is there)
    data tokenizer  train SentencePiece on a bounded, seeded sample of the source's text
                    (data.tokenizer_sample; + stdlib docstrings)
    vae             train the KL-VAE on the source's training images; report held-out PSNR
    data encode     tokenize every example and encode its images with the frozen VAE, once,
                    into ArrayRecord shards (`data/encoded.py`): the training hot path only
                    reads. Under --distributed every process encodes its share of the shards.
    data all        every stage whose output is missing or stale, in order

`data.max_examples` bounds what every stage reads (trials on a large source). In a job of
several processes (`--distributed`), build and tokenizer run on process 0 while the others wait,
the VAE trains on all of them, and encode spreads its shards over all of them; every decision
("is it current?") is process 0's, broadcast, so all processes take the same path.

What each makes, where, and when it is stale: `tfx_jax.artifacts`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import flax
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from tfx_jax import artifacts
from tfx_jax.config import Config, ConfigError, DataConfig, replace_path
from tfx_jax.data import encoded, sequence, sources
from tfx_jax.data.encoded import IMAGE_PLACEHOLDER, write_encoded
from tfx_jax.data.sources import mixture
from tfx_jax.data.tokenizer import (
    NUM_BYTE_PIECES,
    NUM_RESERVED,
    Tokenizer,
    VocabularyTooSmallError,
    general_texts,
    train_tokenizer,
)
from tfx_jax.models import vae
from tfx_jax.train import vae_trainer

log = logging.getLogger(__name__)

# The tokenizer's sample of a source larger than data.tokenizer_sample: fixed, so the tokenizer
# is a function of the source and the settings alone.
TOKENIZER_SAMPLE_SEED = 0
# SentencePiece skips a sentence longer than this many bytes (`train_tokenizer`'s
# max_sentence_length): longer texts are cut at blank lines / spaces first, not lost.
_MAX_SENTENCE_BYTES = 4192
# Images per VAE call on each local device when encoding, and images gathered per flush: fixed
# (not per device count), so every device runs the same computation on the same images for any
# number of devices or processes, and the latents come out bit-identical.
ENCODE_CHUNK = 128
ENCODE_FLUSH = 1024


def build_dataset(cfg: Config) -> None:
    _on_process_zero("build", lambda: sources.of(cfg).build(cfg))


def build_tokenizer(cfg: Config) -> epath.Path:
    """Trains SentencePiece with `model.vocab_size` pieces on the training split's text (the
    text of the examples that can be used: an undecodable or too-small image gives none): at
    most `data.tokenizer_sample` texts per source, a seeded sample of a larger one, each
    image decoded as encode decodes it (`Source.texts`). On process 0 of a distributed job.

    Raises:
      RecordError: an example cannot be read and data.on_error=raise.
      ConfigError: model.vocab_size cannot hold the text's characters (says what to set).
    """
    _on_process_zero("tokenizer", lambda: _build_tokenizer(cfg))
    return artifacts.tokenizer_path(cfg)


def _build_tokenizer(cfg: Config) -> None:
    texts = []
    for _, _, part in mixture.parts(cfg):  # a mixture's tokenizer reads every component
        texts += [t.replace(IMAGE_PLACEHOLDER, " ") for t in _tokenizer_texts(part)]
    texts = [piece for t in texts if t.strip() for piece in _sentences(t)]
    texts += list(general_texts())
    try:
        proto = train_tokenizer(
            texts,
            cfg.model.vocab_size,
            model_type=cfg.data.vocab_model,
            character_coverage=cfg.data.character_coverage,
        )
    except VocabularyTooSmallError as e:
        raise ConfigError(_vocabulary_message(cfg.data, e)) from e
    path = artifacts.tokenizer_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(proto).save(path)
    settings = artifacts.tokenizer_settings(cfg)
    (path.parent / "tokenizer.json").write_text(json.dumps(settings, indent=2))
    print(f"tokenizer: {cfg.model.vocab_size} pieces -> {path}")


def _tokenizer_texts(cfg: Config) -> Iterator[str]:
    """The usable texts of `cfg`'s sample (`Source.texts`), with a count and a rate; the
    unusable are counted by reason, or stop the stage (data.on_error=raise)."""
    limit = cfg.data.tokenizer_sample
    texts = sources.of(cfg).texts(cfg, "train", limit, TOKENIZER_SAMPLE_SEED)
    skipped: collections.Counter[str] = collections.Counter()
    for text in tqdm(texts, desc="tokenizer sample", unit=" texts", delay=2):
        if isinstance(text, sources.RecordError):
            if cfg.data.on_error == "raise":
                raise type(text)(
                    f"tokenizer: {text}. Set data.on_error=skip to skip such examples (they "
                    "are counted)."
                ) from text
            skipped[text.reason] += 1
            log.warning("tokenizer: skipping an example (%s): %s", text.reason, text)
            continue
        yield text
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        print(f"tokenizer: skipped {skipped.total()} examples ({reasons}; the log names them)")


def _sentences(text: str, max_bytes: int = _MAX_SENTENCE_BYTES) -> list[str]:
    """`text`, or (longer than SentencePiece takes) its pieces: cut at blank lines, then at
    spaces, then anywhere, each within `max_bytes` of UTF-8."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    out: list[str] = []
    for separator in ("\n\n", "\n", " "):
        if separator in text:
            for part in text.split(separator):
                if part.strip():
                    out.extend(_sentences(part, max_bytes))
            return out
    cut = max_bytes // 4  # a character is at most 4 bytes of UTF-8
    return [text[i : i + cut] for i in range(0, len(text), cut)]


def _vocabulary_message(d: DataConfig, e: VocabularyTooSmallError) -> str:
    fixed = NUM_RESERVED + NUM_BYTE_PIECES
    if e.distinct_chars is None:
        return f"model.vocab_size={e.vocab_size}: {e}. Set model.vocab_size >= {e.required}."
    return (
        f"model.vocab_size={e.vocab_size} is too small for the tokenizer's text: its "
        f"{e.distinct_chars} distinct characters at data.character_coverage="
        f"{d.character_coverage} need {e.required} pieces with the {fixed} reserved and "
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
    """Tokenizes every example of every split and encodes its images with the frozen VAE, into
    ArrayRecord shards of `data.encode_shard_size` examples; prints per split what was written
    and skipped, and what `data.overlong` does to the examples longer than `data.seq_len` (the
    records themselves do not depend on it).

    In a job of several processes each encodes its share of the unfinished shards on its own
    devices (the VAE's batch split over them); process 0 writes `made_by.json` once every
    shard's completion marker is there. A shard whose marker is there (and was made with the
    same tokenizer, VAE and source) is not encoded again, so a killed encode resumes where it
    stopped; records that are current already are left alone (a no-op that says so).

    Raises:
      DataLossError: after writing (and recording) every split, when more than
        data.max_lost_fraction of a split's examples would be lost to their length; the message
        names the settings that fix it (the records stay current: no re-encoding needed).
      RecordError: an example cannot be read and data.on_error=raise.
    """
    components = sources.of(cfg).components(cfg)
    if components:  # a mixture: each component's records, with the shared tokenizer/VAE
        for name, _, part in components:
            print(f"mixture component {name}:")
            encode(part)
        return
    spec = sequence.SequenceSpec.of(cfg)
    out_dir = artifacts.made_by_path(cfg).parent
    if _agree(artifacts.encoded_is_current(cfg)):
        _say(
            f"encoded records in {out_dir} are current (made_by.json): nothing to encode "
            "(delete that directory to encode them again)."
        )
        _check_losses(cfg, _current_report(cfg, spec), spec)
        return
    source = sources.of(cfg)
    settings = artifacts.encode_settings(cfg)
    shards, examples = _plan_shards(cfg)
    if jax.process_index() == 0:
        # The records change: the stamp goes first and is written again only once all are done.
        artifacts.made_by_path(cfg).unlink(missing_ok=True)
        _remove_other_files(out_dir, shards)
        markers = _read_markers(shards)
        finished = [
            _finished(shard, info, settings) for shard, info in zip(shards, markers, strict=True)
        ]
    else:
        finished = [False] * len(shards)
    # Process 0 looked: every process gets the same list, so they split the same work.
    finished = multihost_utils.broadcast_one_to_all(np.asarray(finished, np.bool_)).tolist()
    todo = [shard for shard, done in zip(shards, finished, strict=True) if not done]
    mine = todo[jax.process_index() :: jax.process_count()]
    _say(
        f"encode: {len(shards) - len(todo)} of {len(shards)} shards are done already; "
        f"{len(todo)} to encode on {jax.process_count()} process(es)"
    )
    # Loaded by every process, work or not: a missing tokenizer or VAE fails them all alike.
    tokenizer = artifacts.load_tokenizer(cfg)
    encode_images = _image_encoder(cfg) if source.has_images else None
    for shard in tqdm(mine, desc="encode (this process)", unit=" shards", disable=len(mine) < 2):
        data = examples[shard.split]
        _encode_shard(cfg, shard, data, tokenizer.encode, encode_images, settings, spec)
    multihost_utils.sync_global_devices("tfx_jax.stages.encode.shards")
    report = _report(cfg, shards, spec)
    if jax.process_index() == 0:
        names = collections.defaultdict(list)
        for shard in shards:
            names[shard.split].append(shard.path.name)
        made_by = {**settings, "stats": report, "shards": dict(names)}
        encoded.write_text_atomic(artifacts.made_by_path(cfg), json.dumps(made_by, indent=2))
    multihost_utils.sync_global_devices("tfx_jax.stages.encode.made_by")
    _check_losses(cfg, report, spec)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Examples [start, stop) of `split`, encoded into `path`."""

    split: str
    path: epath.Path
    start: int
    stop: int


def _plan_shards(cfg: Config) -> tuple[list[_Shard], dict[str, Sequence[dict]]]:
    """Every split's shards (a function of its length and data.encode_shard_size alone) and
    its examples (the first data.max_examples)."""
    source = sources.of(cfg)
    size = cfg.data.encode_shard_size
    shards, examples = [], {}
    for split in source.splits(cfg):
        examples[split] = source.open_limited(cfg, split)
        n = len(examples[split])
        paths = encoded.shard_paths(artifacts.encoded_path(cfg, split), max(1, math.ceil(n / size)))
        shards += [
            _Shard(split, path, k * size, min(n, (k + 1) * size)) for k, path in enumerate(paths)
        ]
    return shards, examples


def _remove_other_files(out_dir: epath.Path, shards: Sequence[_Shard]) -> None:
    """Deletes what an earlier encode of these splits left that is not part of this one: shards
    of another count, the single-file layout of earlier versions, unfinished `.tmp` files."""
    if not out_dir.exists():
        return
    keep = set()
    for shard in shards:
        for path in (shard.path, encoded.index_path(shard.path), encoded.marker_path(shard.path)):
            keep.add(path.name)
    prefixes = tuple(f"{split}{sep}" for split in {s.split for s in shards} for sep in "-.")
    for path in out_dir.iterdir():
        if path.name.startswith(prefixes) and path.name not in keep:
            path.unlink(missing_ok=True)


def _read_markers(shards: Sequence[_Shard]) -> list[dict | None]:
    """Each shard's completion marker (None: absent or unreadable), read in parallel (thousands
    of small objects in a bucket)."""

    def read(shard: _Shard) -> dict | None:
        try:
            return json.loads(encoded.marker_path(shard.path).read_text())
        except (FileNotFoundError, ValueError):
            return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, shards))


def _finished(shard: _Shard, info: dict | None, settings: dict) -> bool:
    """Whether `shard` is whole and was made from these settings: its marker (`info`) says so."""
    if info is None or not shard.path.exists():
        return False
    return info.get("settings") == settings and (info.get("start"), info.get("stop")) == (
        shard.start,
        shard.stop,
    )


def _encode_shard(
    cfg: Config,
    shard: _Shard,
    examples: Sequence[dict],
    encode_text: Callable[[str], list[int]],
    encode_images: Callable[[np.ndarray], np.ndarray] | None,
    settings: dict,
    spec: sequence.SequenceSpec,
) -> None:
    """Writes the shard's records and index, then (last) its completion marker with its counts."""
    counters = sequence.Counters()
    stats = write_encoded(
        shard.path,
        examples,
        encode_text,
        encode_images,
        artifacts.latent_shape(cfg.model),
        on_error=cfg.data.on_error,
        batch_size=ENCODE_FLUSH,
        observe=lambda record: sequence.survey(record, spec, counters),
        start=shard.start,
        stop=shard.stop,
    )
    marker = {
        "settings": settings,
        "start": shard.start,
        "stop": shard.stop,
        "stats": vars(stats),
        "overlong": vars(counters),
        "survey": _survey_key(spec),
    }
    encoded.write_text_atomic(encoded.marker_path(shard.path), json.dumps(marker, indent=2))


def _survey_key(spec: sequence.SequenceSpec) -> list:
    """What the over-long counts depend on: counts made under another key are counted again."""
    return [spec.seq_len, spec.patch_size, spec.overlong]


def _report(cfg: Config, shards: Sequence[_Shard], spec: sequence.SequenceSpec) -> dict:
    """Per split: the shards' counts added up (from their markers), over-long counts included;
    printed by process 0."""
    by_split: dict[str, list[_Shard]] = collections.defaultdict(list)
    for shard in shards:
        by_split[shard.split].append(shard)
    markers = dict(zip(shards, _read_markers(shards), strict=True))
    report = {}
    for split, parts in by_split.items():
        stats, counters = encoded.EncodeStats(), sequence.Counters()
        for shard in parts:
            info = markers[shard]
            if info is None:
                raise FileNotFoundError(
                    f"{encoded.marker_path(shard.path)} vanished while encoding (another encode "
                    "of the same data_dir?): run `python -m tfx_jax data encode` again."
                )
            for key, value in info["stats"].items():
                setattr(stats, key, getattr(stats, key) + value)
            for key, value in info["overlong"].items():
                setattr(counters, key, getattr(counters, key) + value)
        report[split] = {**vars(stats), "overlong": vars(counters), "survey": _survey_key(spec)}
        where = f"{parts[0].path.parent}/{split}-*-of-{len(parts):05d}.array_record"
        _say(
            f"encoded/{split}: {stats.examples} examples, {stats.tokens} text tokens, "
            f"{stats.images} images{stats.skipped_summary()} -> {where}\n"
            f"  {counters.overlong_summary(spec.seq_len)} (data.overlong={spec.overlong})"
        )
    return report


def _current_report(cfg: Config, spec: sequence.SequenceSpec) -> dict:
    """made_by.json's counts of current records; the over-long ones counted again (from the
    records' indexes: no tokens or latents read) where a setting they depend on has changed."""
    made_by = json.loads(artifacts.made_by_path(cfg).read_text())
    report = made_by["stats"]
    changed = False
    for split, stats in report.items():
        if stats.get("survey") == _survey_key(spec):
            continue
        records = encoded.EncodedSource(artifacts.encoded_path(cfg, split))
        counters = sequence.Counters()
        block = 4096
        for start in tqdm(range(0, len(records), block), desc=f"over-long ({split})", delay=2):
            for shell in records.read_shells(range(start, min(start + block, len(records)))):
                sequence.survey(shell, spec, counters)
        stats["overlong"], stats["survey"], changed = vars(counters), _survey_key(spec), True
        _say(
            f"encoded/{split}: {counters.overlong_summary(spec.seq_len)} "
            f"(data.overlong={spec.overlong})"
        )
    multihost_utils.sync_global_devices("tfx_jax.stages.encode.recount")
    if changed and jax.process_index() == 0:
        encoded.write_text_atomic(artifacts.made_by_path(cfg), json.dumps(made_by, indent=2))
    return report


def _check_losses(cfg: Config, report: dict, spec: sequence.SequenceSpec) -> None:
    """DataLossError for the first split that is empty or would lose too much to its length."""
    for split, stats in report.items():
        counters = sequence.Counters(**stats["overlong"])
        if not stats["examples"]:
            why = "the split is empty"
            if stats["skipped"]:
                reasons = encoded.EncodeStats(
                    skipped=stats["skipped"], too_small=stats["too_small"]
                ).reasons()
                why = (
                    f"all {stats['skipped']} were skipped ({reasons}; the log names them, "
                    "and data.on_error=raise stops at the first)"
                )
            raise sources.DataLossError(f"encoded/{split} has no examples: {why}.")
        if counters.lost > spec.max_lost_fraction * counters.examples:
            raise sources.DataLossError(sequence.lost_message(counters, spec, f"encoded/{split}"))


def _image_encoder(cfg: Config) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, H, W, 3] -> scaled latents with the frozen VAE on this process's
    devices: split into chunks of ENCODE_CHUNK images (the last padded), one chunk per local
    device per call. Every device runs the same program on the same chunk whatever the device
    count, so the records do not depend on how many devices or processes encoded them."""
    model, params, scale = artifacts.load_vae(cfg)
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    split, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    fn = jax.jit(
        lambda p, x: vae.encode_images(p, model, x, scale),
        in_shardings=(replicated, split),
        out_shardings=split,
    )
    group = ENCODE_CHUNK * len(devices)

    def encode_images(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), group):
            x = images[start : start + group]
            n = len(x)
            if n < group:
                x = np.concatenate([x, np.zeros((group - n, *x.shape[1:]), x.dtype)])
            out.append(np.asarray(fn(params, jax.device_put(x, split)))[:n])
        return np.concatenate(out)

    return encode_images


def prepare_all(cfg: Config) -> None:
    """Every stage whose output is missing or stale, in order (what `make demo` runs first)."""
    build_dataset(cfg)
    if not _agree(artifacts.tokenizer_is_current(cfg)):
        build_tokenizer(cfg)
    if sources.of(cfg).has_images and not _agree(artifacts.vae_is_current(cfg)):
        # Retraining a stale VAE is this stage's job: checkpoints of other settings move aside.
        train_vae(replace_path(cfg, "checkpoint.on_config_mismatch", "restart"))
    if cfg.data.latents == "precomputed":
        encode(cfg)  # a no-op (that says so) when the records are current


# ----------------------------------------------------------------------------- processes


def _agree(flag: bool) -> bool:
    """Process 0's `flag` on every process: a decision all processes act on together (each
    looking for itself could see a file another has just written)."""
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def _on_process_zero(name: str, fn: Callable[[], object]) -> None:
    """Runs `fn` on process 0 while the others wait: one writer for what all of them share."""
    if jax.process_index() == 0:
        fn()
    multihost_utils.sync_global_devices(f"tfx_jax.stages.{name}")


def _say(text: str) -> None:
    """Prints on process 0 only (the others would repeat it)."""
    if jax.process_index() == 0:
        print(text)


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
    examples = sources.of(cfg).open_limited(cfg, split)
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
