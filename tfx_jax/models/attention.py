"""Attention implementations behind one seam.

An implementation is a pair of pure functions:
  prepare(segment_ids, image_ids, image_attention=...) -> aux   # once per forward, outside the
                                                                 # layer scan
  apply(q_BTNH, k_BSKH, v_BSKH, aux) -> o_BTNH

so a kernel can precompute whatever form of the mask it wants (dense, key ranges, block lists),
always from `models/mask.py` (`image_attention`: "bidirectional" or "causal" inside images,
`model.image_attention`).
`xla` is the reference that runs everywhere; `cudnn` is the fused GPU kernel (12x the default on
an H100, see ENVIRONMENT.md); `dot_product` is jax.nn's default dispatch. Block-sparse kernels
register here with `register`: `splash` (the project's Pallas TPU kernel, `tpu_attention`) and
`tokamax` (GPU). `auto` picks the best registered kernel for the platform when traced
(`resolve_auto`; `target_platform` overrides the platform for ahead-of-time compiles, e.g. for a
TPU pod on a CPU machine).

Legend: B batch, T query length, S key length, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.models import tpu_attention
from tfx_jax.models.mask import attention_mask, key_ranges


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    prepare: Callable[..., Any]
    apply: Callable[..., jax.Array]


IMPLEMENTATIONS: dict[str, AttentionImpl] = {}


def register(name: str, prepare: Callable[..., Any], apply: Callable[..., jax.Array]) -> None:
    IMPLEMENTATIONS[name] = AttentionImpl(prepare, apply)


def get(name: str) -> AttentionImpl:
    """The implementation `name`; `auto` is resolved for the target platform (`resolve_auto`)."""
    if name not in IMPLEMENTATIONS:
        raise KeyError(f"attention implementation {name!r}: use one of {sorted(IMPLEMENTATIONS)}")
    if name == "auto":
        name = resolve_auto()
    return IMPLEMENTATIONS[name]


# ----------------------------------------------------------------------------- auto

# The platform `auto` resolves for when it is not the one JAX runs on (an ahead-of-time compile
# for TPU on a CPU machine: tfx_jax.dryrun). None = jax.default_backend() at trace time.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attention_target_platform", default=None
)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Within this block `auto` resolves for `platform` ("tpu", "gpu", "cpu")."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def resolve_auto(platform: str | None = None) -> str:
    """The implementation `auto` means on `platform` (default: the target set by
    `target_platform`, else the backend being traced for).

    TPU: `splash` (block-sparse, `tpu_attention`); GPU: `pallas_gpu` (block-sparse forward and
    backward, `gpu_attention`: fwd+bwd 0.45x cuDNN *causal* and 3.6x faster than tokamax's on one
    H200, benchmarks/RESULTS.md); anything else (CPU): `xla`.
    """
    platform = platform or _TARGET_PLATFORM.get() or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if platform == "tpu":
        return "splash" if "splash" in IMPLEMENTATIONS else "xla"
    return "xla"


def decode_impl(name: str) -> AttentionImpl:
    """The implementation used with a KV cache, whose mask is always dense [B, 1, T, S].

    Kernels that take the dense mask serve decoding too; one that prepares another form (key
    ranges, block lists) falls back to the `xla` reference there.
    """
    impl = get(name)
    return impl if impl.prepare is dense_mask else IMPLEMENTATIONS["xla"]


def dense_mask(segment_ids: jax.Array, image_ids: jax.Array, **index: Any) -> jax.Array:
    """[B, 1, T, S] boolean mask, broadcast over heads."""
    return attention_mask(segment_ids, segment_ids, image_ids, image_ids, **index)[:, None]


def xla_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_B1TS: jax.Array):
    """Reference attention: einsum + fp32 softmax; grouped-query heads share K/V."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH).astype(jnp.float32)
    logits_BKGTS = logits_BKGTS * (H**-0.5)
    big_neg = jnp.finfo(jnp.float32).min
    logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, big_neg)
    probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


def _jax_nn(implementation: str | None):
    def apply(q_BTNH, k_BSKH, v_BSKH, mask_B1TS):
        # One combined mask, never `is_causal=True` as well: jax ANDs them, which would erase the
        # bidirectional image blocks (ENVIRONMENT.md).
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, implementation=implementation
        )

    return apply


def shard_map_specs(
    mesh: Any, batch: int, q_heads: int, kv_heads: int
) -> tuple[jax.sharding.PartitionSpec, jax.sharding.PartitionSpec]:
    """PartitionSpecs for a `shard_map` over the batch and head dims: (one spec for q/out
    [B, T, N, H] and k/v [B, S, K, H], one for the per-query key ranges [B, T]).

    The mesh axes come from the logical names (`act_batch`, `act_heads`, `act_kv_heads`) through
    the active logical-axis rules (`sharding.mesh_context` sets them from `MeshConfig.rules`), so
    this code never names a mesh axis. A dim is replicated when its axes are not in `mesh` or do
    not divide it; the heads are split only when q and k/v heads get the same axes and those
    divide both counts (a kv head's group of query heads must stay on its device).
    """

    def axes(logical: str, *dims: int) -> tuple[str, ...] | None:
        spec = nn.logical_to_mesh_axes((logical,))[0]
        names = (spec,) if isinstance(spec, str) else tuple(spec or ())
        names = tuple(n for n in names if n in mesh.axis_names)
        size = int(np.prod([mesh.shape[n] for n in names]))
        return names if names and all(d % size == 0 for d in dims) else None

    b = axes("act_batch", batch)
    h = axes("act_heads", q_heads, kv_heads)
    if h != axes("act_kv_heads", q_heads, kv_heads):
        h = None
    P = jax.sharding.PartitionSpec
    return P(b, None, h, None), P(b, None)


def _tokamax(q_BTNH, k_BSKH, v_BSKH, ranges_BT):
    """tokamax's Pallas flash attention with the mask as key ranges (GPU: Mosaic GPU kernel;
    elsewhere its XLA implementation, for checking). Measured on an H100 at T=4096: forward
    0.32 ms vs 1.68 ms for cuDNN with the dense mask (ENVIRONMENT.md; benchmarks/RESULTS.md).

    tokamax is an optional dependency (a 0.0.x package whose range-mask entry point is private:
    `tokamax._src.ops.attention`), imported only when this implementation is chosen. Pallas
    kernels cannot be auto-partitioned, so on a mesh the call is a `shard_map` over the batch
    and head axes: attention is independent per row and per head.
    """
    try:
        from tokamax._src.ops.attention import api, base
    except ImportError as e:
        raise ImportError(
            "model.attention_impl=tokamax needs the tokamax package (pip install tokamax; "
            "it needs jax >= 0.11.1, and its optional xprof import may be stubbed)."
        ) from e
    on_gpu = jax.default_backend() == "gpu"
    impl = api.IMPLEMENTATIONS["mosaic_gpu" if on_gpu else "xla"]

    def local(q, k, v, k_start, k_end):
        mask = base.Mask(k_start=k_start[:, None, :], k_end=k_end[:, None, :])
        return impl(q, k, v, mask=mask)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BTNH, k_BSKH, v_BSKH, *ranges_BT)

    qkv, rng = shard_map_specs(mesh, q_BTNH.shape[0], q_BTNH.shape[2], k_BSKH.shape[2])
    return jax.shard_map(local, in_specs=(qkv, qkv, qkv, rng, rng), out_specs=qkv)(
        q_BTNH, k_BSKH, v_BSKH, *ranges_BT
    )


def _splash(q_BTNH, k_BSKH, v_BSKH, ranges: tpu_attention.BlockRanges):
    """The block-sparse Pallas TPU kernel (`tpu_attention`) over the key ranges of the packed
    mask: fully masked blocks are skipped in the forward and both backward kernels.

    Compiled by Mosaic when the target is a TPU (also ahead of time on a CPU host, inside
    `target_platform("tpu")`); anywhere else it runs in Pallas interpret mode (correct, slow:
    for tests). On a mesh it is a `shard_map` over the batch and head axes like `_tokamax`.
    """
    interpret = (_TARGET_PLATFORM.get() or jax.default_backend()) != "tpu"
    local = functools.partial(tpu_attention.attention, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BTNH, k_BSKH, v_BSKH, ranges)
    qkv, rows = shard_map_specs(mesh, q_BTNH.shape[0], q_BTNH.shape[2], k_BSKH.shape[2])
    specs = tpu_attention.BlockRanges(*[rows] * len(tpu_attention.BlockRanges._fields))
    # Interpret mode evaluates the index maps with unvarying grid indices against the varying
    # scalar-prefetch tables, which the manual-axes check rejects (jax 0.12); Mosaic does not.
    return jax.shard_map(
        local, in_specs=(qkv, qkv, qkv, specs), out_specs=qkv, check_vma=not interpret
    )(q_BTNH, k_BSKH, v_BSKH, ranges)


register("xla", dense_mask, xla_attention)
register("dot_product", dense_mask, _jax_nn(None))
register("cudnn", dense_mask, _jax_nn("cudnn"))
# Per-query key ranges: the form block-sparse kernels skip blocks with.
register("tokamax", key_ranges, _tokamax)
# The project's block-sparse Pallas (Triton) GPU kernel over the same ranges; it takes
# shard_map_specs as an argument so that it need not import this module.
from tfx_jax.models import gpu_attention  # noqa: E402

register("pallas_gpu", key_ranges, gpu_attention.make_apply(shard_map_specs))
# The same ranges padded to whole blocks, with per-block skip/full tables.
register("splash", tpu_attention.prepare, _splash)
# The best kernel for the platform, chosen when traced (`resolve_auto`); `get` resolves it, so
# these two are only reached by code that reads the table directly.
register("auto", lambda *a, **k: get("auto").prepare(*a, **k), lambda *a: get("auto").apply(*a))
