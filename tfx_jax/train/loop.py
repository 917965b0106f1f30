"""`python -m tfx_jax train`: mesh → sharded state → compiled step → a loop that never loses work.

Read top to bottom:
  setup      mesh, model, optimizer; state created already sharded (eval_shape → jit(init,
             out_shardings)); steps jitted with explicit in/out shardings and donated state,
             lowered and compiled once, memory logged
  resume     checkpoint in the workdir → --resume PATH → --init-from PATH (params only) → fresh;
             an incompatible config fails naming the differing keys (the workdir's own
             checkpoints: the mismatch rule of `train/skeleton.py`, shared with the VAE)
  loop       `skeleton.run` with this trainer's step, batches, checkpoint items and hooks:
             progress bar, JSONL + TensorBoard metrics, async checkpoints every N steps and at
             the end, then the evaluators (`train/evaluators.py`); SIGTERM/SIGINT at any moment
             end in a committed checkpoint or none (`train/preemption.py`); a failed write stops
             the run naming the path
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh
from tqdm.auto import tqdm

from tfx_jax import artifacts, layout, sharding
from tfx_jax.checkpoint import Checkpointer, abstract_like, config_differences, decide_resume
from tfx_jax.config import Config, ConfigError, TrainConfig, validate
from tfx_jax.data import sources
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion
from tfx_jax.observability import flops, metric_writers
from tfx_jax.observability.profiling import ProfileWindow
from tfx_jax.sharding import mesh_context
from tfx_jax.train import skeleton
from tfx_jax.train.evaluators import SampleGrid, evaluate, run_evaluators
from tfx_jax.train.optim import learning_rate_schedule, make_optimizer
from tfx_jax.train.preemption import Preemption
from tfx_jax.train.skeleton import InputPipelineError as InputPipelineError  # the CLI's name
from tfx_jax.train.steps import TrainState, make_eval_step, make_train_step

log = logging.getLogger("tfx_jax")


class NonFiniteLossError(RuntimeError):
    """Raised with train.nan_policy=stop; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- setup


def _train_state_init_fn(
    cfg: Config, model: nn.Module, tx: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    def init_fn(rng):
        params = model.init(rng, ModelInputs.dummy(cfg))["params"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero)

    return init_fn


def abstract_train_state(
    cfg: Config, mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation, rng: Any
) -> tuple[TrainState, Any]:
    """The train state's shapes and shardings, without creating it (nothing runs on `mesh`).

    Returns:
      (state, state_shardings): `jax.ShapeDtypeStruct`s carrying their NamedShardings, and the
      shardings tree (the jit in/out shardings). `tfx_jax.dryrun` compiles the step on these.
    """
    init_fn = _train_state_init_fn(cfg, model, tx)
    with mesh_context(mesh, cfg):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract), mesh, cfg.mesh.rules
        )
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(abstract),
        shardings,
    )
    return state, shardings


def create_train_state(
    cfg: Config, mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array
) -> tuple[TrainState, Any]:
    """Creates the train state already sharded on `mesh` (never materialised on one device).

    Returns:
      (state, state_shardings): the shardings tree doubles as the jit in/out shardings.
    """
    init_fn = _train_state_init_fn(cfg, model, tx)
    _, shardings = abstract_train_state(cfg, mesh, model, tx, rng)
    with mesh_context(mesh, cfg):
        state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def jit_train_step(
    cfg: Config,
    mesh: Mesh,
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    state_shardings: Any,
) -> Any:
    """The train step jitted with explicit in/out shardings and the state donated."""
    batch_shardings = {
        k: sharding.batch_sharding(mesh, cfg.mesh.rules, len(v.shape))
        for k, v in layout.batch_spec(cfg).items()
    }
    repl = sharding.replicated(mesh)
    return jax.jit(
        make_train_step(model, cfg, tx, lr_fn),
        in_shardings=(state_shardings, batch_shardings, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Trainer:
    """The compiled pieces of one run: model, optimizer, sharded state, jitted steps."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        validate(cfg, num_devices=mesh.size if mesh else jax.device_count())
        self.cfg = cfg
        self.mesh = mesh or sharding.make_mesh(cfg.mesh)
        self.model = Transfusion(cfg.model)
        self.lr_fn = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        self.tx = make_optimizer(cfg.optimizer, cfg.train.steps)
        rng = jax.random.key(cfg.train.seed)
        self.init_rng = jax.random.split(rng)[0]
        self.state, self.state_shardings = create_train_state(
            cfg, self.mesh, self.model, self.tx, self.init_rng
        )
        # The step key lives replicated on the mesh (made there by a jit, which works across
        # processes): no transfer per step.
        self.step_rng = jax.jit(
            lambda: jax.random.split(jax.random.key(cfg.train.seed))[1],
            out_shardings=sharding.replicated(self.mesh),
        )()
        rules = cfg.mesh.rules
        self.batch_shardings = {
            k: sharding.batch_sharding(self.mesh, rules, len(v.shape))
            for k, v in layout.batch_spec(cfg).items()
        }
        repl = sharding.replicated(self.mesh)
        self._train_step = jit_train_step(
            cfg, self.mesh, self.model, self.tx, self.lr_fn, self.state_shardings
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
            lowered = self._train_step.lower(self.state, layout.batch_spec(self.cfg), self.step_rng)
            self.compiled_train_step = lowered.compile()
        return self.compiled_train_step

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # "stats/..." entries (a mixture's per-source counts) stay on the host.
        arrays = {k: v for k, v in batch.items() if not k.startswith("stats/")}
        return sharding.put_global_batch(arrays, self.mesh, self.cfg.mesh.rules)

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

    def abstract_state(self) -> Any:
        """Restore target: the state's shapes with this mesh's shardings."""
        return abstract_like(self.state, self.state_shardings)


# ----------------------------------------------------------------------------- data


def make_batches(cfg: Config, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
    """This process's batches for the configured source (checkpointable iterators)."""
    if split == "train":
        return artifacts.batches(cfg)
    if split not in sources.of(cfg).splits(cfg):
        raise ValueError(
            f"data.source={cfg.data.source} has no {split} split to evaluate on: map one with "
            "data.tfds_splits (e.g. validation=test) or set train.eval_every=0."
        )
    return artifacts.batches(cfg, split, shuffle=False, num_epochs=None)


# ----------------------------------------------------------------------------- loop


def check_workdir_writable(workdir: epath.Path) -> None:
    """Fails before any compile if the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e}); choose another.") from e


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("loss", "lm_loss", "diffusion_loss", "grad_norm", "lr", "tokens_per_s")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def _meta(cfg: Config, step: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"config": cfg.to_dict(), "step": step, "seed": cfg.train.seed}
    source = sources.of(cfg)
    if not source.makes_batches:  # the tokenizer and VAE the data was made with
        meta["tokenizer"] = str(artifacts.tokenizer_path(cfg))
        if source.has_images:
            meta["vae"] = str(artifacts.vae_dir(cfg))
    return meta


def restore_into(
    trainer: Trainer, ckpt: Checkpointer, step: int, data_iter: Any, params_only: bool = False
) -> dict:
    """Restores `step` onto this trainer's mesh (any shape or device count).

    `params_only` (--init-from) reads the parameters alone: the optimizer, schedule, data and
    objective may all differ (fine-tuning); only the model's own settings must match.
    """
    meta = ckpt.read_meta(step)
    diffs = config_differences(meta["config"], trainer.cfg)
    if params_only:
        diffs = [d for d in diffs if d.startswith("model.")]
    if diffs:
        raise ConfigError(
            f"checkpoint {ckpt.directory} step {step} was trained with a different config; "
            "resuming would change the experiment. Differing keys: " + "; ".join(diffs)
        )
    if params_only:
        abstract = abstract_like(trainer.state.params, trainer.state_shardings.params)
        trainer.state = trainer.state.replace(params=ckpt.restore_params(step, abstract))
        return meta
    data_dir = ckpt.directory / str(step) / "data"
    can_restore_data = (
        not params_only
        and data_iter is not None
        and hasattr(data_iter, "get_state")
        and data_dir.exists()
    )
    ours = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if can_restore_data and not (data_dir / ours).exists():
        # Saved with another process count. A stream whose position is global (the same in
        # every process: the packed pipeline plans global batches, the synthetic stream makes
        # them from (seed, step)) resumes from any process's file.
        saved = sorted(data_dir.glob("process_*.json"))
        if saved and sources.of(trainer.cfg).position_is_global:
            text = saved[0].read_text()
            is_grain = isinstance(data_iter, grain.DatasetIterator)
            data_iter.set_state(json.loads(text) if is_grain else text.encode())
            log.info("data position restored from %s (saved by another process count)", saved[0])
        else:
            log.warning(
                "data position was saved with another process count (%s); the input pipeline "
                "restarts from its seed",
                [p.name for p in saved],
            )
        can_restore_data = False
    state, meta = ckpt.restore(
        step, trainer.abstract_state(), data_iter if can_restore_data else None
    )
    trainer.state = state
    return meta


def train(
    cfg: Config,
    workdir: str | epath.PathLike,
    batches: Iterator[dict[str, np.ndarray]] | None = None,
    resume: str | None = None,
    init_from: str | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Trains to `cfg.train.steps`, resuming if possible; returns the logged metrics.

    The loop is `train.skeleton.run`, shared with the VAE. The workdir's checkpoints made with
    a config that changes the experiment are refused, naming the keys (or, with
    checkpoint.on_config_mismatch=restart, moved to checkpoints.stale/: `skeleton.resume_step`).
    SIGTERM/SIGINT at any moment end in a committed checkpoint or none (`train.preemption`):
    during start-up the run stops before its first step with nothing new to save; inside the
    loop the current step is saved and committed first; a second signal stops at once (exit
    128 + signal) unless a checkpoint is being written. A failed checkpoint or metric write stops
    the run with `CheckpointWriteError` / `OSError` naming the path; committed checkpoints stay.

    `after_step(step)`, if given, is called after each step's checkpoint and eval (a hook for
    tests, e.g. a crash right after a given step).
    """
    with Preemption() as preempt:
        return _train(cfg, workdir, batches, resume, init_from, after_step, preempt)


def _train(cfg, workdir, batches, resume, init_from, after_step, preempt) -> list[dict]:
    workdir = epath.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    is_main = jax.process_index() == 0
    check_workdir_writable(workdir)
    validate(cfg, num_devices=jax.device_count())
    skeleton.resume_step(  # the config-mismatch rule, before anything compiles
        ckpt_dir,
        lambda meta, _: config_differences(meta["config"], cfg),
        cfg.checkpoint.on_config_mismatch,
        elsewhere="another --workdir",
        say=log.warning,
    )
    if is_main:
        (workdir / "config.json").write_text(cfg.to_json())

    trainer = Trainer(cfg)
    log.info(
        "mesh %s over %d devices (%d processes); %s parameters",
        dict(trainer.mesh.shape),
        trainer.mesh.size,
        jax.process_count(),
        f"{param_count(trainer.state.params):,}",
    )
    data_iter = batches if batches is not None else make_batches(cfg)
    if preempt.requested:
        skeleton.stopped_before_start(preempt, ckpt_dir, "start-up")
        return []
    with skeleton.checkpoints(ckpt_dir, cfg.checkpoint, preempt) as ckpt:
        decision = decide_resume(workdir, resume, init_from)
        if decision.kind == "workdir":
            restore_into(trainer, ckpt, decision.step, data_iter)
            log.info("resumed from %s step %d", decision.path, decision.step)
        elif decision.kind in ("resume", "init_from"):
            other = Checkpointer(decision.path, async_save=False, create=False)
            params_only = decision.kind == "init_from"
            restore_into(trainer, other, decision.step, data_iter, params_only=params_only)
            other.close()
            log.info("%s %s step %d", decision.kind, decision.path, decision.step)

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
        if preempt.requested:
            skeleton.stopped_before_start(preempt, ckpt_dir, "compilation")
            return []
        writer = metric_writers.make_writers(str(workdir), is_main)
        with skeleton.closing([writer.close], preempt):
            return _loop(cfg, workdir, trainer, data_iter, ckpt, writer, after_step, preempt)


def _loop(cfg, workdir, trainer, data_iter, ckpt, writer, after_step, preempt) -> list[dict]:
    """The transformer's part of the loop (`skeleton.run` does the rest): its step, its log
    scalars (losses, throughput, MFU, a mixture's counts) and its evaluators."""
    is_main = jax.process_index() == 0
    eval_iter = make_batches(cfg, "validation") if cfg.train.eval_every else None
    part_evals = {}  # a mixture's components, each evaluated on its own validation split
    components = sources.of(cfg).components(cfg) if eval_iter is not None else None
    if components:
        part_evals = {name: make_batches(p, "validation") for name, _, p in components}
    sampler = None
    if cfg.train.eval_every and cfg.train.eval_samples and sources.of(cfg).has_images:
        sampler = SampleGrid(cfg, cfg.train.eval_samples)
    flops_per_step, peak = _flops_and_peak(cfg)
    profiler = _profiler(cfg.train, workdir, is_main)
    start = int(trainer.state.step)
    if start >= cfg.train.steps:
        log.warning(
            "the checkpoint is at step %d and train.steps=%d: nothing to train (raise "
            "train.steps to continue this run)",
            start,
            cfg.train.steps,
        )
    eval_failures: dict[str, int] = {}
    data_stats: dict[str, int] = {}  # stats/<part>/<what> summed since this process started
    clock = {"t_last": time.time(), "steps_since": 0}  # throughput since the last log step

    def train_step(step: int, batch: dict[str, Any]) -> dict[str, jax.Array]:
        if profiler:
            profiler.on_step(step)
        for key in batch:
            if key.startswith("stats/"):  # a mixture's counts: data/<part>/... below
                data_stats[key] = data_stats.get(key, 0) + int(batch[key])
        clock["steps_since"] += 1
        return trainer.train_step(batch)

    def log_step(step: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if host["finite"] < 1 and cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {step}; the update was not applied and the "
                f"last good checkpoint ({ckpt.latest_step()}) is kept."
            )
        now = time.time()
        dt = max(now - clock["t_last"], 1e-9) / clock["steps_since"]
        host["step"] = step
        host["step_time_s"] = dt
        host["tokens_per_s"] = host["tokens"] / dt
        host.update(_mixture_metrics(data_stats))
        if flops_per_step and peak:
            host["mfu"] = flops_per_step / dt / (peak * trainer.mesh.size)
        clock["t_last"], clock["steps_since"] = now, 0
        return host

    def evaluate_step(step: int) -> dict[str, float]:
        ev = run_evaluators(trainer, eval_iter, sampler, step, writer, eval_failures)
        ev.update(_per_source_eval(trainer, part_evals, step, writer))
        if is_main and "eval/perplexity" in ev:
            tqdm.write(
                f"eval {step:>6} perplexity={ev['eval/perplexity']:.4g} "
                f"diffusion_loss={ev['eval/diffusion_loss']:.4g}"
            )
        return ev

    job = skeleton.Job(
        name="train",
        steps=cfg.train.steps,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.checkpoint.every_steps,
        batches=data_iter,
        train_step=train_step,
        checkpoint=lambda step: (trainer.state, data_iter, _meta(cfg, step)),
        log=log_step,
        line=lambda step, host: f"step {step:>6} {_fmt(host)}",
        postfix=_fmt,
        eval_every=cfg.train.eval_every,
        evaluate=evaluate_step if eval_iter is not None else None,
        after_step=after_step,
        data_hint=" If a data worker was killed for memory, lower data.worker_count.",
    )
    closers = (profiler.close,) if profiler else ()
    return skeleton.run(job, ckpt, writer, preempt, start, closers).history


def _mixture_metrics(stats: dict[str, int]) -> dict[str, float]:
    """data/<part>/{tokens,images,sequences} (totals since start-up) and data/<part>/token_share:
    the mix a run actually trained on, against the configured weights."""
    out = {f"data/{k.removeprefix('stats/')}": float(v) for k, v in stats.items()}
    tokens = {k.removeprefix("stats/").removesuffix("/tokens"): v for k, v in stats.items()
              if k.endswith("/tokens")}  # fmt: skip
    total = max(sum(tokens.values()), 1)
    out.update({f"data/{name}/token_share": v / total for name, v in tokens.items()})
    return out


def _per_source_eval(trainer, part_evals: dict, step: int, writer) -> dict[str, float]:
    """eval/<part>/{lm_loss,diffusion_loss,perplexity} for each source of a mixture."""
    out: dict[str, float] = {}
    for name, batches in part_evals.items():
        try:
            ev = evaluate(trainer, batches, trainer.cfg.train.eval_batches)
        except Exception as e:  # like every evaluator: one line, training goes on
            if trainer.cfg.train.strict_eval:
                raise
            log.error("eval at step %d: source %s failed (%s: %s)", step, name, type(e).__name__, e)
            continue
        for key in ("lm_loss", "diffusion_loss", "perplexity"):
            out[f"eval/{name}/{key}"] = ev[f"eval/{key}"]
    if out:
        writer.write_scalars(step, out)
    return out


def _flops_and_peak(cfg: Config) -> tuple[float, float]:
    """Model FLOPs per step from the config, and the per-device peak (0 if unknown)."""

    peak = flops.peak_flops_per_device(cfg.train.peak_tflops)
    return flops.train_flops_per_step(cfg), peak or 0.0


def _profiler(t: TrainConfig, workdir: epath.Path, is_main: bool):
    if not t.profile_steps or not is_main:
        return None
    return ProfileWindow(str(workdir / "profile"), t.profile_start, t.profile_steps)
