"""The model's parameters without the trainer: abstract shapes, shardings, and restoring them.

Generation, export, evaluation and the demo need the parameters only. They never build the train
state: no optimizer, no train step, no optimizer moments on device (for AdamW those are twice the
parameters, so a trainer-sized load costs ~3x the memory needed to sample).

    abstract_params(cfg)          boxed ShapeDtypeStructs of `Transfusion.init` (logical names)
    param_shardings(cfg, mesh)    NamedShardings by the config's logical-axis rules
    put_params(cfg, params, mesh) place host or device params as training shards them
    restore_params(path, mesh)    (cfg, params, step): only `state.params` of a checkpoint is
                                  read (Orbax partial restore), straight onto `mesh`'s shardings
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from etils import epath
from jax.sharding import Mesh

from tfx_jax import sharding
from tfx_jax.checkpoint import Checkpointer, saved_config
from tfx_jax.config import Config, ConfigError, MeshConfig
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion
from tfx_jax.sharding import mesh_context


def abstract_params(cfg: Config) -> Any:
    """The parameter tree's shapes and dtypes, boxed with their logical axis names."""
    # The kernel and the remat policy do not change the parameters; the reference kernel traces
    # on any backend (a GPU-only kernel might refuse to trace on a CPU host).
    model = Transfusion(dataclasses.replace(cfg.model, attention_impl="xla", remat_policy="none"))
    return jax.eval_shape(model.init, jax.random.key(0), ModelInputs.spec(cfg, length=8))["params"]


def param_shardings(cfg: Config, mesh: Mesh) -> Any:
    """NamedShardings of every parameter on `mesh`, by the config's rules table."""
    with mesh_context(mesh, cfg):
        return sharding.tree_shardings(mesh, cfg.mesh.rules, abstract_params(cfg))


def abstract_on_mesh(cfg: Config, mesh: Mesh) -> Any:
    """Unboxed `ShapeDtypeStruct`s carrying their shardings: a restore target on any mesh."""
    abstract = nn.meta.unbox(abstract_params(cfg))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        param_shardings(cfg, mesh),
    )


def put_params(cfg: Config, params: Any, mesh: Mesh) -> Any:
    """Params (host arrays, the same on every process, or `jax.Array`s on any placement)
    sharded as the trainer shards them, on a mesh that may span several processes."""

    def put(x, s):
        if isinstance(x, jax.Array):
            return x if x.sharding == s else jax.device_put(x, s)
        return sharding.put_host_array(x, s)

    return jax.tree.map(put, nn.meta.unbox(params), param_shardings(cfg, mesh))


def inference_mesh(mesh: MeshConfig) -> Mesh:
    """The saved config's mesh over this job's devices, or all-data when it no longer fits
    (a checkpoint from a pod sampled on one host): parameters then shard by `tensor`/`fsdp`
    = 1, i.e. they are replicated."""
    try:
        return sharding.make_mesh(mesh)
    except ConfigError:
        return sharding.make_mesh(MeshConfig(rules=mesh.rules))


def checkpoint_root(path: str | epath.PathLike) -> epath.Path:
    """A run's workdir or its checkpoints directory -> the checkpoints directory."""
    root = epath.Path(path)
    return root / "checkpoints" if (root / "checkpoints").exists() else root


def restore_params(
    path: str | epath.PathLike, mesh: Mesh | None = None, step: int | None = None
) -> tuple[Config, Any, int]:
    """Restores only the parameters of a checkpoint, sharded onto `mesh`.

    Args:
      path: a run's workdir or its `checkpoints/` directory.
      mesh: where the params go (default: the saved config's mesh over this job's devices; any
        shape or device count works: the target tree carries the shardings).
      step: default the newest complete step.

    Returns:
      (the config the checkpoint was trained with, params, step).
    """
    root = checkpoint_root(path)
    ckpt = Checkpointer(root, async_save=False, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{root}: no complete checkpoint to load.")
        if step not in ckpt.all_steps():
            raise ConfigError(f"{root}: no step {step}; complete steps: {ckpt.all_steps()}.")
        cfg = saved_config(ckpt.read_meta(step))
        mesh = mesh or inference_mesh(cfg.mesh)
        params = ckpt.restore_params(step, abstract_on_mesh(cfg, mesh))
    finally:
        ckpt.close()
    return cfg, params, step
