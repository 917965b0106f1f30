"""`python -m tfx_jax vae`: trains the KL-VAE on all devices with the main loop's machinery.

`run` shards batches over a mesh of all devices and drives the pure steps of `train.vae_steps`
through the loop `train.loop.train` runs too (`train.skeleton`: resume and the config-mismatch
rule, JSONL + TensorBoard metrics, Orbax checkpoints with exact resume, a save at the next step
boundary on SIGTERM); it returns the params, the latent scale factor and the held-out PSNR. The
codec used at inference (uint8 conversion, encode/decode, the latent scale factor) lives beside
the model in `tfx_jax.models.vae`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from etils import epath

from tfx_jax import sharding
from tfx_jax.checkpoint import abstract_like, differences
from tfx_jax.config import validate
from tfx_jax.models.vae import VAE, encode_images, latent_scale_factor
from tfx_jax.observability.metric_writers import MetricWriter, image_grid, make_writers
from tfx_jax.train import skeleton
from tfx_jax.train.preemption import Preempted, Preemption
from tfx_jax.train.vae_steps import init_state, make_eval_step, make_train_step

CHECKPOINT_DIR = "checkpoints"
SCALE_SAMPLE_SIZE = 1024  # training images encoded for the latent scale factor
GRID_IMAGES = 8  # held-out originals (top row) and reconstructions (bottom row) in the grid


def resume_settings(cfg: Any, train_images_uint8: np.ndarray) -> dict[str, Any]:
    """Everything that determines the VAE's training trajectory, as JSON-able values.

    A checkpoint resumes only if its saved settings equal these. `vae.steps` is deliberately not
    one of them: the learning rate is constant, so a run to N steps passes through exactly the
    states of a run to k < N steps, and raising `vae.steps` continues a finished run. The mesh is
    not one either (a checkpoint restores onto any mesh). The training images are fingerprinted,
    since the batch order is a function of their count and the seed.
    """
    v = cfg.vae
    images = np.ascontiguousarray(train_images_uint8)
    return {
        "latent_channels": cfg.model.latent_channels,
        "downsample": v.downsample,
        "channels": list(v.channels),
        "batch_size": v.batch_size,
        "learning_rate": v.learning_rate,
        "kl_weight": v.kl_weight,
        "recon": "l1",
        "image_size": cfg.data.image_size,
        "seed": cfg.data.seed,
        "train_images": len(images),
        "train_images_sha256": hashlib.sha256(images.data).hexdigest(),
    }


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(num_images)


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> np.ndarray:
    """Training-image indices of the global batch for `step` (0-based): a pure function.

    Each epoch is a fresh permutation seeded by (seed, epoch), cut into `num_images // batch_size`
    batches (the remainder is dropped). Every process computes the same global batch from the step
    alone, so batch order needs no iterator state: it is exact on resume and independent of the
    number of processes.
    """
    steps_per_epoch = num_images // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"need at least batch_size={batch_size} images, got {num_images}")
    epoch, within = divmod(step, steps_per_epoch)
    return _epoch_order(seed, epoch, num_images)[within * batch_size : (within + 1) * batch_size]


def put_images(
    images_uint8: np.ndarray, indices: np.ndarray, batch_sharding: jax.sharding.Sharding
) -> jax.Array:
    """The global batch `images_uint8[indices]` as one array sharded by `batch_sharding`.

    Every process holds all images, so each one materialises exactly the rows its own devices
    hold (whatever the device order of the mesh) and contributes nothing else: the multi-process
    equivalent of `sharding.put_global_batch` without a per-process data pipeline. Images stay
    uint8 on the way to the devices (a quarter of the float32 bytes).
    """
    shape = (len(indices), *images_uint8.shape[1:])

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        return images_uint8[indices[index[0]]][(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, batch_sharding, rows)


def _chunks(num: int, size: int):
    """(indices, valid) per chunk of `size` over range(num); the last chunk repeats its final
    index so every chunk has the shape the compiled functions expect."""
    for start in range(0, num, size):
        valid = min(size, num - start)
        yield np.minimum(np.arange(start, start + size), num - 1), valid


def _check_images(name: str, images: np.ndarray, image_size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"{name} must be uint8 [N, {image_size}, {image_size}, 3] (data.image_size="
            f"{image_size}), got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    return images


def _differences(settings: dict, steps: int) -> Callable[[dict, int], list[str]]:
    """What makes a saved VAE checkpoint another run (the skeleton's mismatch rule): other
    `resume_settings`, or a step past `vae.steps` (it cannot give the state at `vae.steps`)."""

    def diffs(meta: dict, step: int) -> list[str]:
        out = differences(meta.get("settings", {}), settings)
        if step > steps:
            out.append(f"step {step} > vae.steps={steps}")
        return out

    return diffs


class _StepClock:
    """Wall time of the train steps alone, for `seconds_per_step`: the devices are waited for
    at the first step (which compiles: not counted), at log and save steps; the eval and
    checkpoint work after such a sync is not counted either."""

    def __init__(self, start: int):
        self.start, self.seconds, self.steps = start, 0.0, 0
        self._t: float | None = None
        self._synced: int | None = None

    def synced(self, step: int) -> None:
        """The devices have just finished `step`."""
        if self._synced == step:
            return
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.steps = step - self.start - 1
        self._synced = step

    def step_done(self, step: int) -> None:
        """`step`'s log and save work is done: the clock runs again."""
        if self._synced == step:
            self._t = time.perf_counter()

    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted pieces of a VAE run on one mesh, with explicit in/out shardings.

    The VAE's parameters (and Adam's moments) name their axes conv_in/conv_out, and the
    project's rules map these to no mesh axis, so the whole state is replicated: right for a small
    conv net, whose weights are a few MB and whose cost is activations, which the batch sharding
    splits. A rules table that maps them to `fsdp` would shard the state with no change here.
    """

    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    init: Callable  # rng -> state, created already sharded (never whole on one device)
    train_step: Callable  # (state, uint8 batch, rng) -> (state, metrics); state donated
    reconstruct: Callable  # (params, uint8 batch) -> (uint8 reconstructions, PSNR [B])
    encode: Callable  # (params, uint8 batch) -> unscaled posterior means


@functools.lru_cache(maxsize=2)
def _programs(
    model: VAE,
    learning_rate: float,
    kl_weight: float,
    image_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    rules: tuple,
) -> _Programs:
    """Builds (and caches) the jitted functions for these settings.

    Cached so that another `run` with the same settings in this process (a resume, the tests, a
    notebook) reuses the same `jax.jit` objects and hence their compiled executables; jit's own
    cache still keys on shapes, shardings and jax's config, so a hit is always safe.
    """
    optimizer = optax.adam(learning_rate)
    init = functools.partial(init_state, model, optimizer, image_shape=image_shape)
    state_shardings = sharding.tree_shardings(mesh, rules, jax.eval_shape(init, jax.random.key(0)))
    batch_shard = sharding.batch_sharding(mesh, rules, 1 + len(image_shape))
    params_shard, repl = state_shardings.params, sharding.replicated(mesh)

    return _Programs(
        state_shardings=state_shardings,
        batch_sharding=batch_shard,
        init=jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_shardings),
        train_step=jax.jit(
            make_train_step(model, optimizer, kl_weight=kl_weight),
            in_shardings=(state_shardings, batch_shard, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0,),
        ),
        # Small outputs (per-image PSNR, a chunk of images, latents) come back replicated, so
        # every process can read them whole.
        reconstruct=jax.jit(
            make_eval_step(model), in_shardings=(params_shard, batch_shard), out_shardings=repl
        ),
        encode=jax.jit(
            lambda params, x: encode_images(params, model, x, 1.0),
            in_shardings=(params_shard, batch_shard),
            out_shardings=repl,
        ),
    )


def _hashable_rules(rules) -> tuple:
    """Rules as nested tuples (a config rebuilt from JSON holds lists)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _evaluate(programs: _Programs, params, held_out: np.ndarray, chunk: int):
    """(mean per-image PSNR over all held-out images, grid image).

    Held-out images go through the batch-sharded reconstruction in chunks of `chunk` images (the
    last one padded, its padding dropped). The grid shows the first `GRID_IMAGES` originals above
    their reconstructions.
    """
    psnrs, first = [], None
    for indices, valid in _chunks(len(held_out), chunk):
        batch = put_images(held_out, indices, programs.batch_sharding)
        x_hat, psnr_B = jax.device_get(programs.reconstruct(params, batch))
        psnrs.append(psnr_B[:valid])
        first = x_hat[:valid] if first is None else first
    n = min(GRID_IMAGES, len(first))
    grid = image_grid(np.concatenate([held_out[:n], first[:n]]), cols=n)
    return float(np.mean(np.concatenate(psnrs))), grid


def _scale_factor(programs: _Programs, params, images: np.ndarray, chunk: int) -> float:
    """`latent_scale_factor` over the posterior means of the first `SCALE_SAMPLE_SIZE` training
    images, encoded batch-sharded (padding rows dropped before the statistics)."""
    sample = images[:SCALE_SAMPLE_SIZE]
    latents = []
    for indices, valid in _chunks(len(sample), chunk):
        batch = put_images(sample, indices, programs.batch_sharding)
        latents.append(np.asarray(jax.device_get(programs.encode(params, batch)))[:valid])
    return latent_scale_factor(np.concatenate(latents))


def _fmt(scalars: dict[str, float]) -> str:
    keys = ("vae/loss", "vae/recon", "vae/psnr", "vae/eval_psnr")
    return "  ".join(f"{k[4:]} {scalars[k]:.4g}" for k in keys if k in scalars)


def _job(
    cfg: Any,
    programs: _Programs,
    settings: dict,
    state: Any,
    rng: jax.Array,
    data: tuple[np.ndarray, np.ndarray],
    writer: MetricWriter,
    clock: _StepClock,
    say: Callable[[str], None],
) -> tuple[skeleton.Job, dict[str, Any]]:
    """The VAE's part of `skeleton.run`: batches from (seed, step), the sharded step, scalars
    with held-out PSNR (and the reconstruction grid) at log steps, state + settings saved.

    Returns:
      (job, live): `live["state"]` is the state the steps have reached.
    """
    images, held_out = data
    v, seed = cfg.vae, cfg.data.seed
    live = {"state": state, "metrics": None}

    def batches():
        step = int(state.step)  # 0-based: the batch of the step being made
        while True:
            indices = batch_indices(step, len(images), v.batch_size, seed)
            yield put_images(images, indices, programs.batch_sharding)
            step += 1

    def train_step(step: int, batch: jax.Array):
        live["state"], live["metrics"] = programs.train_step(live["state"], batch, rng)
        if step == clock.start + 1:  # compiled: the clock starts after it
            jax.block_until_ready(live["metrics"])
            clock.synced(step)
        return live["metrics"]  # steps stay queued on the devices: no host sync

    def log_step(step: int, metrics) -> dict[str, float]:
        metrics = jax.device_get(metrics)  # waits for the step
        clock.synced(step)
        scalars = {f"vae/{k}": float(x) for k, x in metrics.items()}
        scalars["vae/eval_psnr"], grid = _evaluate(
            programs, live["state"].params, held_out, v.batch_size
        )
        writer.write_images(step, {"vae/reconstructions": grid})
        return scalars

    def checkpoint(step: int):
        jax.block_until_ready(live["metrics"])
        clock.synced(step)
        return live["state"], None, {"settings": settings, "step": step}

    job = skeleton.Job(
        name="vae",
        steps=v.steps,
        log_every=v.log_every,
        checkpoint_every=v.checkpoint_every,
        batches=batches(),
        train_step=train_step,
        checkpoint=checkpoint,
        log=log_step,
        line=lambda step, scalars: f"  vae step {step:>6}  {_fmt(scalars)}",
        postfix=_fmt,
        after_step=clock.step_done,
        say=say,
    )
    return job, live


def run(
    cfg: Any,
    train_images_uint8: np.ndarray,
    eval_images_uint8: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains the VAE of `cfg` to `cfg.vae.steps` on all devices, resuming from `out_dir`.

    Data parallel over the mesh's batch axes (`act_batch`: data x fsdp), state replicated (see
    `_Programs`); the loop is `train.skeleton.run`, shared with the transformer. Every
    `vae.log_every` steps (and at the last): train scalars and held-out PSNR to
    `out_dir/metrics.jsonl` and `out_dir/tensorboard/`, with a grid of held-out originals above
    their reconstructions (TensorBoard image `vae/reconstructions`). Every
    `vae.checkpoint_every` steps, at the last and on SIGTERM/SIGINT: an Orbax checkpoint in
    `out_dir/checkpoints` (state + settings; kept and saved as `checkpoint.*` says, like
    `train`'s checkpoints).

    Resume: a checkpoint whose `resume_settings` equal the current ones continues from its latest
    step and ends with the same params as an uninterrupted run. Any other (other settings, or a
    step past `vae.steps`) is refused naming what differs, or with
    checkpoint.on_config_mismatch=restart moved to `checkpoints.stale/` and the run starts fresh
    (`skeleton.resume_step`; `data all` retrains a stale VAE so). SIGTERM: the current step is
    saved and `Preempted` (exit code 0) raised.

    Args:
      cfg: the run's `Config` (vae.*, model.latent_channels, data.image_size, data.seed, mesh.*,
        checkpoint.keep / keep_every / async_save / on_config_mismatch).
      train_images_uint8: [N, S, S, 3] uint8, S = data.image_size, N >= vae.batch_size; every
        process passes all of them (each one feeds only its devices' rows of every batch).
      eval_images_uint8: [M, S, S, 3] uint8 held-out images (PSNR only; never trained on).
      out_dir: the run directory, created if missing (metrics are written with local file
        APIs, as in `train`).
      log: called with human-readable progress lines, on process 0 only.

    Returns:
      {"params": unboxed host (numpy) params, "scale_factor": float, "heldout_psnr_db": float
      (mean per-image PSNR of the posterior-mean reconstructions of all held-out images),
      "steps": int (the final step), "seconds_per_step": float (mean wall time of this call's
      steps after its first, which compiles; eval and checkpoint time excluded; NaN if fewer than
      two ran), "resumed_from_step": int or None, "history": the logged scalars, "mesh_shape":
      {axis: size}}.

    Raises:
      ConfigError: a checkpoint in `out_dir` made with other settings (checkpoint.
        on_config_mismatch=refuse, the default).
      Preempted: after SIGTERM, once the checkpoint is written.
    """
    validate(cfg)
    v, seed = cfg.vae, cfg.data.seed
    images = _check_images("train_images_uint8", train_images_uint8, cfg.data.image_size)
    held_out = _check_images("eval_images_uint8", eval_images_uint8, cfg.data.image_size)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda msg: None)
    out_dir = str(out_dir)
    if "://" not in out_dir:  # Orbax/TensorStore need absolute local paths
        out_dir = os.path.abspath(out_dir)
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    ways = sharding.batch_parallel_size(mesh, rules)
    if v.batch_size % ways:
        raise ValueError(
            f"vae.batch_size={v.batch_size} is not divisible by the batch-parallel size {ways} "
            f"of mesh {dict(mesh.shape)}: change vae.batch_size or mesh.*"
        )
    if len(images) < v.batch_size:
        raise ValueError(f"need at least vae.batch_size={v.batch_size} images, got {len(images)}")

    model = VAE(
        latent_channels=cfg.model.latent_channels,
        downsample=v.downsample,
        channels=tuple(v.channels),
    )
    rng_init, rng_steps = jax.random.split(jax.random.key(seed))
    ckpt_dir = out_dir / CHECKPOINT_DIR
    settings = resume_settings(cfg, images)

    with sharding.mesh_context(mesh, cfg):
        with Preemption("a VAE checkpoint") as preempt:
            resumed_from = skeleton.resume_step(
                ckpt_dir,
                _differences(settings, v.steps),
                cfg.checkpoint.on_config_mismatch,
                elsewhere="another data.data_dir",
                say=lambda line: say(f"VAE: {line}"),
            )
            programs = _programs(
                model,
                v.learning_rate,
                v.kl_weight,
                images.shape[1:],
                mesh,
                _hashable_rules(cfg.mesh.rules),
            )
            state = programs.init(rng_init)
            with skeleton.checkpoints(ckpt_dir, cfg.checkpoint, preempt) as ckpt:  # as `train`'s
                if resumed_from is not None:
                    state, _ = ckpt.restore(
                        resumed_from, abstract_like(state, programs.state_shardings)
                    )
                start = int(state.step)
                say(
                    f"VAE: {len(images)} training / {len(held_out)} held-out images, mesh "
                    f"{dict(mesh.shape)}, global batch {v.batch_size}, steps {start} -> {v.steps} "
                    f"({f'resumed from {ckpt_dir}' if resumed_from is not None else 'fresh start'})"
                )
                writer = make_writers(str(out_dir), is_main)
                with skeleton.closing([writer.close], preempt):
                    clock = _StepClock(start)
                    data = (images, held_out)
                    job, live = _job(
                        cfg, programs, settings, state, rng_steps, data, writer, clock, say
                    )
                    outcome = skeleton.run(job, ckpt, writer, preempt, start)
        # Out of the blocks: the last save is committed, the previous signal handlers are back.
        step, state = outcome.step, live["state"]
        if outcome.preempted and step < v.steps:
            say(f"VAE: preempted; checkpoint of step {step} written to {ckpt_dir}")
            raise Preempted(step)
        heldout_psnr, _ = _evaluate(programs, state.params, held_out, v.batch_size)
        scale = _scale_factor(programs, state.params, images, v.batch_size)
        replicate = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))
        params = jax.device_get(replicate(state.params))  # whole on every process

    say(f"VAE: step {step}, held-out PSNR {heldout_psnr:.2f} dB, latent scale factor {scale:.4g}")
    return {
        "params": params,
        "scale_factor": scale,
        "heldout_psnr_db": heldout_psnr,
        "steps": step,
        "seconds_per_step": clock.seconds_per_step(),
        "resumed_from_step": resumed_from,
        "history": outcome.history,
        "mesh_shape": dict(mesh.shape),
    }
