"""The device mesh and the mapping from logical axis names to it.

Model code only ever names axes logically (`embed`, `heads`, `act_batch`, ...); the rules table in
`MeshConfig.rules` is the one place those names meet the physical mesh axes (data, fsdp, tensor).
Everything here is a thin layer over `jax.sharding` and `flax.linen` partitioning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx_jax.config import ConfigError, MeshConfig, resolve_mesh_shape


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over `devices` (default: all global devices).

    Axis types are Auto: linen's logical partitioning relies on the compiler propagating shardings
    (recent jax defaults `make_mesh` to Explicit, which linen rejects — docs/DESIGN.md).
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # a multi-slice TPU pod: the slow links (DCN) carry data, else fsdp
        return _multi_slice_mesh(mesh_cfg, shape, devices, slices)
    return jax.make_mesh(
        shape,
        mesh_cfg.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=devices,
    )


def _multi_slice_mesh(
    mesh_cfg: MeshConfig, shape: tuple[int, ...], devices: list[Any], slices: int
) -> Mesh:
    """Slices joined over the data-centre network (DCN): the first of (data, fsdp) that the
    slice count divides spans them (over data, only the gradient all-reduce crosses DCN);
    tensor never does."""
    names = mesh_cfg.axis_names
    for axis in ("data", "fsdp"):
        i = names.index(axis)
        if shape[i] % slices == 0:
            break
    else:
        raise ConfigError(
            f"mesh={dict(zip(names, shape, strict=True))} over {slices} TPU slices: mesh.data or "
            f"mesh.fsdp must be a multiple of {slices} (one part per slice)."
        )
    dcn = tuple(slices if j == i else 1 for j in range(len(shape)))
    ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def mesh_context(mesh: Mesh, cfg: Any):
    """Everything traced inside sees the mesh and the config's logical-axis rules."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(cfg.mesh.rules))
    return stack


def logical_sharding(mesh: Mesh, rules: Any, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding for one array whose dims carry the given logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def tree_shardings(mesh: Mesh, rules: Any, abstract_tree: Any) -> Any:
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays.

    Leaves without logical metadata (optimizer counters, the step) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Any, ndim: int) -> NamedSharding:
    """Sharding of a batch array: the leading dim over the batch axes, the rest replicated."""
    return logical_sharding(mesh, rules, ("act_batch",) + (None,) * (ndim - 1))


def batch_parallel_size(mesh: Mesh, rules: Any) -> int:
    """How many ways the batch dimension is split."""
    spec = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """Turns this process's slice of the global batch into global, batch-sharded `jax.Array`s.

    On one process the local slice is the whole batch; on several, each process passes its own
    rows (the data pipeline shards by `jax.process_index()`).
    """
    out = {}
    for key, value in batch.items():
        sharding = batch_sharding(mesh, rules, np.ndim(value))
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def put_host_array(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds in full (the same values everywhere), placed on a
    sharding that may span several processes: each process writes only its own shards."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every process's host.

    `np.asarray` only works when this process holds every shard; otherwise the shards are
    gathered from all processes (a collective: every process must call it, in the same order).
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
