"""Block-sparse flash attention for GPU (Pallas, Triton backend) over the packed Transfusion mask.

The mask is, for every query, one contiguous key range [k_start, k_end) (`mask.key_ranges`). So
for a block of queries and a block of keys it is known from a few numbers per block, computed in
XLA before the kernels run (`block_tables`):

  lo, hi            the key blocks [lo, hi) that hold any key a query of the block may see
                    (from the smallest k_start and the largest k_end of the block's queries);
  full_lo, full_hi  the key blocks [full_lo, full_hi) inside it that every query sees whole.

Each kernel loops over [lo, full_lo) and [full_hi, hi) with the element mask rebuilt from the
queries' k_start / k_end, and over [full_lo, full_hi) with no mask arithmetic; every other block
pair is never touched. The dK/dV kernel loops over query blocks instead, with the transposed
tables (`key_block_tables`: per key block, the query blocks that can see it). Documents do not see
each other, text is causal and padding sees only itself, so in a packed row most pairs are
skipped: the work is that of the documents, not of the row.

Three kernels under one `jax.custom_vjp`, in the FlashAttention-2 arrangement (Dao 2023):
forward (online softmax over key blocks, base-2 exponentials; saves the log-sum-exp), dQ (over
key blocks) and dK/dV (over query blocks and the query heads of a grouped-query group), with
delta = rowsum(dO * O) in XLA between them. Learned from jax's deprecated Pallas GPU
`ops/gpu/attention.py` and Triton's fused-attention tutorial (which mask with `causal` or
segment ids over every block, or skip only causally); no code is shared with them.

fp32 accumulation everywhere; fp32 inputs use IEEE-precision dots (not TF32). Off a GPU the same
kernels run in Pallas interpret mode (`interpret=True`, slow, for tests).

Legend: B batch, T query length (= S key length), N query heads, K kv heads, G = N / K, H head
dim; bq / bk query / key block sizes, nq / nk block counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tfx_jax.models.remat import ATTENTION_RESIDUALS

# A large finite negative (not -inf: a query whose first blocks are all masked would give
# exp2(-inf - -inf) = NaN). exp2(MASK - lse) is exactly 0.
MASK = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the three kernels (powers of two, >= 16 on a
    GPU). Small blocks skip more of a packed mask (documents of a few hundred tokens leave most
    visited blocks partial); large ones feed the tensor cores better. The defaults are the
    fastest fwd+bwd of the four configurations timed on one H200 at B 4, T 4096, 16 x 128 heads,
    bf16 (benchmarks/RESULTS.md): thin 32-row query blocks streamed past 64-key blocks in dK/dV,
    32-key blocks past 64-query blocks in dQ, 4 warps in the backward."""

    fwd_q: int = 128
    fwd_k: int = 64
    dq_q: int = 64
    dq_k: int = 32
    dkv_q: int = 32
    dkv_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 3

    def clipped(self, T: int) -> BlockSizes:
        """Blocks no larger than T rounded up to a power of two (short sequences)."""
        cap = max(16, 1 << (T - 1).bit_length())
        sizes = {f.name: min(getattr(self, f.name), cap) for f in dataclasses.fields(self)[:6]}
        return dataclasses.replace(self, **sizes)

    @property
    def largest(self) -> int:
        return max(self.fwd_q, self.fwd_k, self.dq_q, self.dq_k, self.dkv_q, self.dkv_k)


# ----------------------------------------------------------------------------- block tables


def block_tables(k_start_BT: jax.Array, k_end_BT: jax.Array, bq: int, bk: int) -> jax.Array:
    """Per query block, the key blocks its queries may see: [B, 4, nq] int32 rows
    (lo, hi, full_lo, full_hi).

    [lo, hi) covers every key block holding a visible key of some query of the block (a
    superset when the block's ranges leave a gap, which only costs masked work); [full_lo,
    full_hi) is inside it and every query of the block sees each of those key blocks whole. With
    no full block it is (hi, hi), so the kernels' first masked loop runs over all of [lo, hi).
    """
    B, T = k_start_BT.shape
    ks = k_start_BT.reshape(B, T // bq, bq)
    ke = k_end_BT.reshape(B, T // bq, bq)
    lo = ks.min(-1) // bk
    hi = -(-ke.max(-1) // bk)
    full_lo = jnp.clip(-(-ks.max(-1) // bk), lo, hi)
    full_hi = jnp.clip(ke.min(-1) // bk, full_lo, hi)
    empty = full_hi <= full_lo
    full_lo = jnp.where(empty, hi, full_lo)
    full_hi = jnp.where(empty, hi, full_hi)
    return jnp.stack([lo, hi, full_lo, full_hi], axis=1).astype(jnp.int32)


def key_block_tables(q_tab_B4Q: jax.Array, nk: int) -> jax.Array:
    """The transpose of `block_tables` for the dK/dV pass: per key block, the query blocks that
    may see it, [B, 4, nk] int32 rows (lo, hi, full_lo, full_hi) in query blocks.

    [lo, hi) spans every query block whose [lo, hi) holds the key block; [full_lo, full_hi) is
    the first run of query blocks that see it whole (for `mask.key_ranges` layouts k_start and
    k_end never decrease along the row, so that run is all of them; otherwise blocks outside the
    run are only masked needlessly). (hi, hi) when there is none.
    """
    lo, hi, f_lo, f_hi = (q_tab_B4Q[:, c, :, None] for c in range(4))  # [B, nq, 1]
    nq = q_tab_B4Q.shape[2]
    j = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    seen = (lo <= j) & (j < hi)  # [B, nq, nk]
    full = (f_lo <= j) & (j < f_hi)
    q_hi = jnp.where(seen, i + 1, 0).max(1)
    q_lo = jnp.minimum(jnp.where(seen, i, nq).min(1), q_hi)
    run_lo = jnp.where(full, i, nq).min(1)
    run_hi = jnp.where((i >= run_lo[:, None, :]) & ~full, i, nq).min(1)
    run_hi = jnp.minimum(run_hi, q_hi)
    empty = run_hi <= run_lo
    run_lo = jnp.where(empty, q_hi, run_lo)
    run_hi = jnp.where(empty, q_hi, run_hi)
    return jnp.stack([q_lo, q_hi, run_lo, run_hi], axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Static:
    blocks: BlockSizes
    groups: int  # G query heads per kv head
    scale: float  # H ** -0.5 (softmax scale, natural log units)
    precision: Any  # dot precision: HIGHEST for fp32 inputs (no TF32)
    interpret: bool

    @property
    def scale2(self) -> float:  # logits in base-2 units: exp(x) = exp2(x * log2 e)
        return self.scale * LOG2E


def _visible(ks_R: jax.Array, ke_R: jax.Array, first_key: jax.Array, n: int) -> jax.Array:
    """[R, n] element mask: key first_key + c is in the range [ks, ke) of query row r."""
    col = first_key + jnp.arange(n, dtype=jnp.int32)
    return (col[None, :] >= ks_R[:, None]) & (col[None, :] < ke_R[:, None])


def _three_loops(tab_ref, i, step, carry):
    """Masked blocks [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi)."""
    lo, hi, full_lo, full_hi = (tab_ref[c, i] for c in range(4))
    carry = jax.lax.fori_loop(lo, full_lo, functools.partial(step, True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(step, False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(step, True), carry)


def _fwd_kernel(tab_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, s: _Static):
    bk = s.blocks.fwd_k
    q = q_ref[...]  # [bq, H]
    ks, ke = ks_ref[...], ke_ref[...]
    bq, H = q.shape

    def step(masked, j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        x = plgpu.dot(q, k, trans_b=True, precision=s.precision) * s.scale2  # [bq, bk]
        if masked:
            x = jnp.where(_visible(ks, ke, j * bk, bk), x, MASK)
        m_new = jnp.maximum(m, x.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(x - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=s.precision)
        return acc, m_new, l

    init = (
        jnp.zeros((bq, H), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _three_loops(tab_ref, pl.program_id(0), step, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)  # base 2, in scale2 units


def _dq_kernel(
    tab_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *, s: _Static
):
    bk = s.blocks.dq_k
    q, do = q_ref[...], do_ref[...]  # [bq, H]
    lse, di = lse_ref[...], di_ref[...]  # [bq]
    ks, ke = ks_ref[...], ke_ref[...]

    def step(masked, j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        x = plgpu.dot(q, k, trans_b=True, precision=s.precision) * s.scale2
        if masked:
            x = jnp.where(_visible(ks, ke, j * bk, bk), x, MASK)
        p = jnp.exp2(x - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=s.precision)
        ds = p * (dp - di[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=s.precision)

    dq = _three_loops(tab_ref, pl.program_id(0), step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * s.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    tab_ref,
    ks_ref,
    ke_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    dk_ref,
    dv_ref,
    *,
    s: _Static,
):
    """One key block of one kv head: dK and dV summed over the G query heads of its group and
    over the query blocks that can see it (refs: q/do [T, G, H], lse/di [G, T], ks/ke [T])."""
    bq = s.blocks.dkv_q
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    bk = k.shape[0]

    def step(g, masked, i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [bq, H]
        lse, di = lse_ref[g, rows], di_ref[g, rows]  # [bq]
        x_T = plgpu.dot(k, q, trans_b=True, precision=s.precision) * s.scale2  # [bk, bq]
        if masked:
            key = j * bk + jnp.arange(bk, dtype=jnp.int32)
            ks, ke = ks_ref[rows], ke_ref[rows]
            x_T = jnp.where((key[:, None] >= ks[None, :]) & (key[:, None] < ke[None, :]), x_T, MASK)
        p_T = jnp.exp2(x_T - lse[None, :])
        dv = dv + plgpu.dot(p_T.astype(do.dtype), do, precision=s.precision)
        dp_T = plgpu.dot(v, do, trans_b=True, precision=s.precision)
        ds_T = p_T * (dp_T - di[None, :])
        dk = dk + plgpu.dot(ds_T.astype(q.dtype), q, precision=s.precision)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(s.groups):  # static: G is small, and each head reuses the k/v block
        carry = _three_loops(tab_ref, j, functools.partial(step, g), carry)
    dk, dv = carry
    dk_ref[...] = (dk * s.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _out(like: jax.Array, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
    """An output shaped (by default) like `like`, varying over the same manual mesh axes (what
    pallas_call needs inside a shard_map that checks them)."""
    return jax.ShapeDtypeStruct(
        like.shape if shape is None else shape,
        like.dtype if dtype is None else dtype,
        manual_axis_type=jax.typeof(like).manual_axis_type,
    )


def _call(s: _Static, kernel, name: str, grid, in_specs, out_specs, out_shape, fwd: bool):
    warps = s.blocks.fwd_warps if fwd else s.blocks.bwd_warps
    stages = s.blocks.fwd_stages if fwd else s.blocks.bwd_stages
    return pl.pallas_call(
        functools.partial(kernel, s=s),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=s.interpret,
        name=name,
    )


def _forward(s: _Static, q, k, v, ks, ke):
    """q [B, T, N, H], k/v [B, T, K, H], ks/ke [B, T] -> (o [B, T, N, H], lse [B, N, T])."""
    B, T, N, H = q.shape
    G, bq, bk = s.groups, s.blocks.fwd_q, s.blocks.fwd_k
    nq = T // bq
    tab = block_tables(ks, ke, bq, bk)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, bq), lambda i, b, n: (b, i))
    o, lse = _call(
        s,
        _fwd_kernel,
        "transfusion_attention_fwd",
        grid=(nq, B, N),
        in_specs=[
            pl.BlockSpec((None, 4, nq), lambda i, b, n: (b, 0, 0)),
            row_spec,
            row_spec,
            q_spec,
            kv_spec,
            kv_spec,
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
        out_shape=[_out(q), _out(q, (B, N, T), jnp.float32)],
        fwd=True,
    )(tab, ks, ke, q, k, v)
    return o, lse


def _backward(s: _Static, q, k, v, ks, ke, o, lse, do):
    B, T, N, H = q.shape
    K, G, bl = k.shape[2], s.groups, s.blocks
    di = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))

    # dQ: per query block, over the key blocks it sees.
    nq = T // bl.dq_q
    q_spec = pl.BlockSpec((None, bl.dq_q, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, bl.dq_q), lambda i, b, n: (b, i))
    stat_spec = pl.BlockSpec((None, None, bl.dq_q), lambda i, b, n: (b, n, i))
    dq = _call(
        s,
        _dq_kernel,
        "transfusion_attention_dq",
        grid=(nq, B, N),
        in_specs=[
            pl.BlockSpec((None, 4, nq), lambda i, b, n: (b, 0, 0)),
            row_spec,
            row_spec,
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=q_spec,
        out_shape=_out(q),
        fwd=False,
    )(block_tables(ks, ke, bl.dq_q, bl.dq_k), ks, ke, q, k, v, do, lse, di)

    # dK/dV: per key block of each kv head, over the query blocks (and group heads) that see it.
    nk = T // bl.dkv_k
    k_tab = key_block_tables(block_tables(ks, ke, bl.dkv_q, bl.dkv_k), nk)
    group_spec = pl.BlockSpec((None, T, G, H), lambda j, b, h: (b, 0, h, 0))
    stat_spec = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    row_spec = pl.BlockSpec((None, T), lambda j, b, h: (b, 0))
    kv_spec = pl.BlockSpec((None, bl.dkv_k, None, H), lambda j, b, h: (b, j, h, 0))
    dk, dv = _call(
        s,
        _dkv_kernel,
        "transfusion_attention_dkv",
        grid=(nk, B, K),
        in_specs=[
            pl.BlockSpec((None, 4, nk), lambda j, b, h: (b, 0, 0)),
            row_spec,
            row_spec,
            group_spec,
            kv_spec,
            kv_spec,
            group_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[_out(k), _out(v)],
        fwd=False,
    )(k_tab, ks, ke, q, k, v, do, lse, di)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(s: _Static, q, k, v, ks, ke):
    return _forward(s, q, k, v, ks, ke)[0]


def _attention_fwd(s, q, k, v, ks, ke):
    o, lse = _forward(s, q, k, v, ks, ke)
    # Named, so that a remat policy may keep them (model.remat_policy=dots_no_batch_attention)
    # and the backward then needs no second forward kernel.
    o, lse = (checkpoint_name(x, n) for x, n in zip((o, lse), ATTENTION_RESIDUALS, strict=True))
    return o, (q, k, v, ks, ke, o, lse)


def _attention_bwd(s, res, do):
    dq, dk, dv = _backward(s, *res, do)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- entry points


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    ranges_BT: tuple[jax.Array, jax.Array],
    *,
    blocks: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of q over k/v where query t sees keys [k_start[t], k_end[t]) (`ranges_BT`, from
    `mask.key_ranges`), on one device (a shard_map body on a mesh: Pallas kernels are not
    auto-partitioned). Differentiable in q, k, v.

    Grouped-query heads (N a multiple of K) share their kv head's blocks. T is padded to whole
    blocks (padded queries see only themselves and are sliced off). `interpret` defaults to
    "not on a GPU" (Pallas interpret mode: correct and slow, for tests).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    k_start, k_end = ranges_BT
    if k_BSKH.shape[1] != T or k_start.shape != (B, T):
        raise ValueError(
            f"pallas_gpu attention is self-attention over key ranges: q {q_BTNH.shape}, "
            f"k {k_BSKH.shape} and ranges {k_start.shape} must share B and T"
        )
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blocks = (blocks or BlockSizes()).clipped(T)
    if not interpret and (H < 16 or H & (H - 1)):
        raise ValueError(
            f"model.attention_impl=pallas_gpu needs a head_dim that is a power of two >= 16 "
            f"(Triton tiles), got {H}: use attention_impl=cudnn or tokamax"
        )
    Tp = -(-T // blocks.largest) * blocks.largest
    if Tp != T:  # padded queries see only themselves; no real query sees a padded key
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q_BTNH, k_BSKH, v_BSKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BSKH, v_BSKH))
        idx = jnp.broadcast_to(jnp.arange(T, Tp, dtype=jnp.int32), (B, Tp - T))
        k_start = jnp.concatenate([k_start, idx], axis=1)
        k_end = jnp.concatenate([k_end, idx + 1], axis=1)
    s = _Static(
        blocks=blocks,
        groups=N // K,
        scale=H**-0.5,
        precision=jax.lax.Precision.HIGHEST if q_BTNH.dtype == jnp.float32 else None,
        interpret=interpret,
    )
    o = _attention(s, q_BTNH, k_BSKH, v_BSKH, k_start.astype(jnp.int32), k_end.astype(jnp.int32))
    return o[:, :T]


def make_apply(shard_map_specs: Callable[..., Any], **options: Any) -> Callable[..., jax.Array]:
    """The `apply` of the `pallas_gpu` attention implementation: `attention` on one device, or a
    `shard_map` over the batch and head axes on a mesh (attention is independent per row and per
    head), with the PartitionSpecs from `shard_map_specs(mesh, B, N, K)`
    (`attention.shard_map_specs`, passed in so this module does not import the registry that
    imports it). `options` go to `attention` (blocks, interpret)."""
    local = functools.partial(attention, **options)

    def apply(q_BTNH, k_BSKH, v_BSKH, ranges_BT):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return local(q_BTNH, k_BSKH, v_BSKH, ranges_BT)
        qkv, rows = shard_map_specs(mesh, q_BTNH.shape[0], q_BTNH.shape[2], k_BSKH.shape[2])
        body = lambda q, k, v, ks, ke: local(q, k, v, (ks, ke))
        # check_vma=False: Pallas' interpret mode (CPU) does not track the manual axes its
        # block slices vary over; every output here varies over all of them anyway.
        specs = dict(in_specs=(qkv, qkv, qkv, rows, rows), out_specs=qkv, check_vma=False)
        return jax.shard_map(body, **specs)(q_BTNH, k_BSKH, v_BSKH, *ranges_BT)

    return apply
