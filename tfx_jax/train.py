"""`python -m tfx_jax train`: set up the mesh, create sharded state, compile once, run the loop.

Read top to bottom: mesh → model/optimizer → sharded state (eval_shape → jit(init,
out_shardings)) → jitted step with explicit in/out shardings and donated state (lowered and
compiled once, memory logged) → loop with a progress bar and a JSONL metrics file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from tfx_jax import sharding
from tfx_jax.config import Config, validate
from tfx_jax.models.transformer import Transfusion
from tfx_jax.optim import learning_rate_schedule, make_optimizer
from tfx_jax.steps import TrainState, make_eval_step, make_train_step

log = logging.getLogger("tfx_jax")


# ----------------------------------------------------------------------------- setup


def mesh_context(mesh: Mesh, cfg: Config):
    """Everything traced inside sees the mesh and the logical-axis rules."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(cfg.mesh.rules))
    return stack


def dummy_inputs(cfg: Config, batch: int = 1) -> tuple[jax.Array, ...]:
    """Model inputs of the right shapes (for init and eval_shape)."""
    m, T, M = cfg.model, cfg.data.seq_len, cfg.max_images_per_row
    ints = jnp.zeros((batch, T), jnp.int32)
    return (
        ints,
        ints,
        ints,
        ints,  # tokens, segment_ids, positions, image_ids
        ints - 1,  # slot_BT
        jnp.zeros((batch, M), jnp.int32),  # start_BM
        jnp.zeros((batch, M, m.latent_size, m.latent_size, m.latent_channels), jnp.float32),
        jnp.zeros((batch, M, m.num_patches), jnp.int32),  # t_BMI
    )


def batch_spec(cfg: Config, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch (see `tfx_jax.layout`)."""
    B = batch_size or cfg.data.global_batch_size
    T, P = cfg.data.seq_len, cfg.model.patch_dim
    spec = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("tokens", "segment_ids")}
    spec |= {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("positions", "image_ids")}
    spec["patches"] = jax.ShapeDtypeStruct((B, T, P), jnp.float32)
    return spec


def create_train_state(
    cfg: Config, mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array
) -> tuple[TrainState, Any]:
    """Creates the train state already sharded on `mesh` (never materialised on one device).

    Returns:
      (state, state_shardings): the shardings tree doubles as the jit in/out shardings.
    """

    def init_fn(rng):
        params = model.init(rng, *dummy_inputs(cfg))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with mesh_context(mesh, cfg):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract), mesh, cfg.mesh.rules
        )
        state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Trainer:
    """The compiled pieces of one run: model, optimizer, sharded state, jitted steps."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        validate(cfg, num_devices=len(mesh.devices.flat) if mesh else jax.device_count())
        self.cfg = cfg
        self.mesh = mesh or sharding.make_mesh(cfg.mesh)
        self.model = Transfusion(cfg.model)
        self.lr_fn = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.tx = make_optimizer(cfg.optimizer, cfg.train.steps)
        rng = jax.random.key(cfg.train.seed)
        self.init_rng, self.step_rng = jax.random.split(rng)
        self.state, self.state_shardings = create_train_state(
            cfg, self.mesh, self.model, self.tx, self.init_rng
        )
        rules = cfg.mesh.rules
        self.batch_shardings = {
            k: sharding.batch_sharding(self.mesh, rules, len(v.shape))
            for k, v in batch_spec(cfg).items()
        }
        repl = sharding.replicated(self.mesh)
        self._train_step = jax.jit(
            make_train_step(self.model, cfg, self.tx, self.lr_fn),
            in_shardings=(self.state_shardings, self.batch_shardings, repl),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            make_eval_step(self.model, cfg),
            in_shardings=(self.state_shardings.params, self.batch_shardings, repl),
            out_shardings=repl,
        )
        self.compiled_train_step = None

    def compile(self) -> Any:
        """Lowers and compiles the train step once; returns the compiled executable."""
        with mesh_context(self.mesh, self.cfg):
            lowered = self._train_step.lower(self.state, batch_spec(self.cfg), self.step_rng)
            self.compiled_train_step = lowered.compile()
        return self.compiled_train_step

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.put_global_batch(batch, self.mesh, self.cfg.mesh.rules)

    def train_step(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        if self.compiled_train_step is None:
            self.compile()
        if isinstance(next(iter(batch.values())), np.ndarray):
            batch = self.put_batch(batch)
        self.state, metrics = self.compiled_train_step(self.state, batch, self.step_rng)
        return metrics

    def eval_step(self, batch: dict[str, Any], rng: jax.Array | None = None):
        if isinstance(next(iter(batch.values())), np.ndarray):
            batch = self.put_batch(batch)
        rng = self.step_rng if rng is None else rng
        with mesh_context(self.mesh, self.cfg):
            return self._eval_step(self.state.params, batch, rng)


# ----------------------------------------------------------------------------- data


def make_batches(cfg: Config) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches for the configured source."""
    if cfg.data.source == "synthetic":
        from tfx_jax.data import synthetic

        m = cfg.model
        per_process = cfg.data.global_batch_size // jax.process_count()
        return synthetic.batches(
            cfg.data.seed + jax.process_index(),
            per_process,
            cfg.data.seq_len,
            m.vocab_size,
            m.latent_size,
            m.latent_channels,
            m.patch_size,
            cfg.max_images_per_row,
        )
    raise ValueError(f"data.source={cfg.data.source!r}: unknown source (available: 'synthetic').")


# ----------------------------------------------------------------------------- loop


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("loss", "lm_loss", "diffusion_loss", "grad_norm", "lr", "tokens_per_s")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def train(
    cfg: Config, workdir: str | Path, batches: Iterator[dict[str, np.ndarray]] | None = None
) -> list[dict[str, float]]:
    """Trains `cfg.train.steps` steps; returns the logged metrics (also workdir/metrics.jsonl)."""
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json())
    trainer = Trainer(cfg)
    log.info(
        "mesh %s over %d devices; %s parameters",
        dict(trainer.mesh.shape),
        trainer.mesh.size,
        f"{param_count(trainer.state.params):,}",
    )
    t0 = time.time()
    compiled = trainer.compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        log.info(
            "compiled train step in %.1fs; per-device memory: args %.1f MiB, temp %.1f MiB",
            time.time() - t0,
            mem.argument_size_in_bytes / 2**20,
            mem.temp_size_in_bytes / 2**20,
        )
    batches = batches if batches is not None else make_batches(cfg)
    history: list[dict[str, float]] = []
    metrics_file = (workdir / "metrics.jsonl").open("a") if is_main else None
    bar = tqdm(total=cfg.train.steps, desc="train", disable=not is_main, dynamic_ncols=True)
    tokens_since, t_last = 0.0, time.time()
    for step in range(1, cfg.train.steps + 1):
        metrics = trainer.train_step(next(batches))
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            tokens_since += host["tokens"]
            host["tokens_per_s"] = host["tokens"] * cfg.train.log_every / max(now - t_last, 1e-9)
            host["step"] = step
            t_last = now
            history.append(host)
            bar.set_postfix_str(_fmt(host))
            if metrics_file:
                metrics_file.write(json.dumps(host) + "\n")
                metrics_file.flush()
                bar.write(f"step {step:>6} {_fmt(host)}")
    bar.close()
    if metrics_file:
        metrics_file.close()
    return history
