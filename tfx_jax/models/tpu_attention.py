"""Block-sparse flash attention for TPU (Pallas / Mosaic) over the packed Transfusion mask.

The mask is, for every query, one contiguous key range [k_start, k_end) (`mask.key_ranges`). So
for a block of queries and a block of keys it is known from four numbers per query block,
computed in XLA before the kernels run (`prepare`, `block_tables`):

  lo, hi            the first and last key block any query of the block may see; every block in
                    between has a visible key (each query's range contains the query itself and
                    the queries are consecutive, so the union of their ranges is one interval);
  full_lo, full_hi  the key blocks [full_lo, full_hi) every query of the block sees whole.

A (query block, key block) pair is then *skipped* (outside [lo, hi]), *full* (no mask
arithmetic) or *partial* (the element mask is rebuilt from the queries' k_start / k_end). The
tables reach the kernels through scalar prefetch (SMEM).

Skipped pairs cost nothing, not even a grid step: the grid runs over one block dimension only
(query blocks of `BLOCK` for the forward and dQ, key blocks of `BLOCK` for dK/dV), the other
side of the row is resident in VMEM for the whole grid step (one head's K and V, or Q and dO,
fetched once per head and row), and a `fori_loop` inside the kernel walks only the visible
128-wide sub-blocks, from lo to hi. A kernel with a grid step per (query block, key block)
pair would still pay the ~0.35 us step overhead for every skipped pair: at T 4096 that is 64
steps per head and row, two thirds of them masked with packed documents.

Three kernels under one `jax.custom_vjp`, in the FlashAttention-2 arrangement (Dao 2023):
forward (online softmax; saves the log-sum-exp), dQ, and dK/dV (per query head; a grouped-query
group's partial dK/dV are summed after). Learned from jax's Pallas TPU flash_attention and
splash_attention (which take a static or dense per-head mask, not a per-row runtime one); no code
is shared with them.

On a machine that is not a TPU the same kernels run in Pallas interpret mode (`interpret=True`,
slow, for tests). Legend: B batch, T query length (= key length), N query heads, K kv heads,
G = N / K, H head dim; M the grid block, SUB the inner block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tfx_jax.models.mask import key_ranges

# The grid block (queries per forward / dQ step, keys per dK/dV step). Larger blocks mean fewer
# grid steps and longer MXU runs; smaller ones skip more of a packed mask, because a pair is
# computed when any of its queries sees any of its keys. 512 x 128 pairs computed 23% of the
# pairs on the paper config's synthetic rows (T 4096, ~16 documents each), 512 x 512 34%.
BLOCK = 512
LANES = 128
# The inner block: one lane width, so per-query vectors broadcast to (M, SUB) tiles as they are.
SUB = LANES
# A large finite negative (not -inf: exp(-inf - -inf) is NaN), as in splash attention.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # x @ y.T: contract both last dims
_DEFAULT_VMEM = 16 * 2**20  # the smallest default scoped VMEM limit of the TPU generations


class BlockRanges(NamedTuple):
    """What `prepare` makes of the mask; every field is [B, ...] (shard_map splits the batch).

    k_start, k_end: [B, Tp] int32 per-query key range, Tp = T padded to whole blocks (padded
      queries see only themselves).
    fwd_blocks: [B, Tp/M * 4] per query block of M: (lo, hi, full_lo, full_hi) in key blocks
      of SUB (the forward and dQ walk).
    bwd_blocks: [B, Tp/SUB * 4] per query block of SUB: the same in key blocks of M.
    bwd_span: [B, Tp/M * 2] per key block of M: the first and last query block of SUB that
      sees it (the dK/dV walk; each pair inside is still classified by `bwd_blocks`).
    """

    k_start: jax.Array
    k_end: jax.Array
    fwd_blocks: jax.Array
    bwd_blocks: jax.Array
    bwd_span: jax.Array


def block_size(seq_len: int, block: int | None = None) -> tuple[int, int]:
    """(grid block, padded length) for a sequence of `seq_len` (block: default `BLOCK`)."""
    block = min(block or BLOCK, -(-seq_len // LANES) * LANES)
    if block % SUB:
        raise ValueError(f"attention block {block} is not a multiple of {SUB}")
    return block, -(-seq_len // block) * block


def block_tables(
    k_start: jax.Array, k_end: jax.Array, bq: int, bkv: int
) -> tuple[jax.Array, jax.Array]:
    """(q_blocks [B, T/bq, 4], kv_span [B, T/bkv, 2]) from per-query key ranges [B, T]:
    per query block (lo, hi, full_lo, full_hi) in key blocks of bkv, and per key block the
    first and last query block whose [lo, hi] holds it."""
    B, T = k_start.shape
    nq, nkv = T // bq, T // bkv
    ks = k_start.reshape(B, nq, bq)
    ke = k_end.reshape(B, nq, bq)
    lo = ks.min(-1) // bkv
    hi = (ke.max(-1) - 1) // bkv
    full_lo = -(-ks.max(-1) // bkv)  # ceil: the first block starting at or after every k_start
    full_hi = ke.min(-1) // bkv  # blocks before it end at or before every k_end
    q_blocks = jnp.stack([lo, hi, full_lo, full_hi], axis=-1).astype(jnp.int32)

    j = jnp.arange(nkv)
    sees_BQK = (lo[:, :, None] <= j) & (j <= hi[:, :, None])
    first = jnp.argmax(sees_BQK, axis=1)
    last = nq - 1 - jnp.argmax(sees_BQK[:, ::-1], axis=1)
    # A key block nobody sees (impossible: a key is seen by its own query) gets an empty walk.
    seen = sees_BQK.any(1)
    kv_span = jnp.stack([jnp.where(seen, first, 1), jnp.where(seen, last, 0)], axis=-1)
    return q_blocks, kv_span.astype(jnp.int32)


def pair_kinds(q_blocks: jax.Array, nkv: int) -> jax.Array:
    """[B, nq, nkv] int8 per (query block, key block): 0 skipped, 1 partial, 2 full — the
    decision the kernels take (for tests and for measuring the sparsity of a layout)."""
    lo, hi, flo, fhi = (q_blocks[..., c, None] for c in range(4))
    j = jnp.arange(nkv)
    visible = (lo <= j) & (j <= hi)
    full = (flo <= j) & (j < fhi)
    return jnp.where(visible, jnp.where(full, 2, 1), 0).astype(jnp.int8)


def prepare(
    segment_ids: jax.Array,
    image_ids: jax.Array,
    block: int | None = None,
    image_attention: str = "bidirectional",
) -> BlockRanges:
    """The mask of a packed batch [B, T] as key ranges padded to whole blocks, and the tables
    (`image_attention`: as in `mask.key_ranges`)."""
    B, T = segment_ids.shape
    M, Tp = block_size(T, block)
    k_start, k_end = key_ranges(segment_ids, image_ids, image_attention)
    if Tp > T:
        pad = jnp.broadcast_to(jnp.arange(T, Tp, dtype=jnp.int32), (B, Tp - T))
        k_start = jnp.concatenate([k_start, pad], axis=1)
        k_end = jnp.concatenate([k_end, pad + 1], axis=1)
    fwd, _ = block_tables(k_start, k_end, M, SUB)
    bwd, span = block_tables(k_start, k_end, SUB, M)
    return BlockRanges(k_start, k_end, fwd.reshape(B, -1), bwd.reshape(B, -1), span.reshape(B, -1))


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Static:
    block: int  # M
    n_blocks: int  # Tp / M
    groups: int  # G query heads per kv head
    scale: float
    interpret: bool


def _entries(ref, index, width):
    """The `width` int32 entries of record `index` of a flat SMEM table."""
    return tuple(ref[index * width + c] for c in range(width))


def _col(ref):
    """A (1, n) row block as an (n, SUB) lane-broadcast column tile."""
    col = jnp.expand_dims(ref[0], -1)
    return jnp.broadcast_to(col, (col.shape[0], SUB))


def _classified(full, body, *args):
    """body(*args, masked) for a visible pair: without the element mask when it is full."""
    pl.when(full)(functools.partial(body, *args, False))
    pl.when(jnp.logical_not(full))(functools.partial(body, *args, True))


def _fwd_kernel(tab, q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref,
                ks_sc, ke_sc, m_sc, l_sc, acc_sc, *, s: _Static):  # fmt: skip
    # One query block of M against the resident K/V of its kv head, key sub-blocks lo..hi.
    b, i = pl.program_id(0), pl.program_id(2)
    lo, hi, flo, fhi = _entries(tab, b * s.n_blocks + i, 4)
    ks_sc[...] = _col(ks_ref)
    ke_sc[...] = _col(ke_ref)
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(jj, masked):
        start = pl.multiple_of(jj * SUB, SUB)
        k, v = k_ref[pl.ds(start, SUB), :], v_ref[pl.ds(start, SUB), :]
        logits = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
        logits = logits * s.scale
        if masked:
            kv_pos = start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
            mask = (kv_pos >= ks_sc[...]) & (kv_pos < ke_sc[...])
            logits = jnp.where(mask, logits, MASK_VALUE)
        m_prev = m_sc[...]  # (M, SUB), every lane equal: no relayout per step
        m_next = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(logits - m_next)
        if masked:  # a row with no visible key in this sub-block must add nothing
            p = jnp.where(mask, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv

    def step(jj, carry):
        _classified((jj >= flo) & (jj < fhi), body, jj)
        return carry

    jax.lax.fori_loop(lo, hi + 1, step, 0)
    l = l_sc[...]  # > 0: every query sees at least itself
    o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = (m_sc[...] + jnp.log(l)).T[:1]  # (M, SUB) -> the (1, M) row


def _dq_kernel(tab, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, ks_ref, ke_ref, dq_ref,
               ks_sc, ke_sc, lse_sc, di_sc, dq_sc, *, s: _Static):  # fmt: skip
    b, i = pl.program_id(0), pl.program_id(2)
    lo, hi, flo, fhi = _entries(tab, b * s.n_blocks + i, 4)
    ks_sc[...] = _col(ks_ref)
    ke_sc[...] = _col(ke_ref)
    lse_sc[...] = _col(lse_ref)
    di_sc[...] = _col(di_ref)
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def body(jj, masked):
        start = pl.multiple_of(jj * SUB, SUB)
        k, v = k_ref[pl.ds(start, SUB), :], v_ref[pl.ds(start, SUB), :]
        logits = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
        p = jnp.exp(logits * s.scale - lse_sc[...])
        if masked:
            kv_pos = start + jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)
            p = jnp.where((kv_pos >= ks_sc[...]) & (kv_pos < ke_sc[...]), p, 0.0)
        dp = jax.lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - di_sc[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    def step(jj, carry):
        _classified((jj >= flo) & (jj < fhi), body, jj)
        return carry

    jax.lax.fori_loop(lo, hi + 1, step, 0)
    dq_ref[...] = (dq_sc[...] * s.scale).astype(dq_ref.dtype)


def _dkv_kernel(tab, span, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, ks_ref, ke_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, s: _Static):  # fmt: skip
    # One key block of M of one query head against the resident Q/dO rows, query sub-blocks
    # of the span. Key-major: the scores are computed transposed, (M, SUB), so the per-query
    # vectors (lse, di, k_start, k_end) broadcast as the rows they are stored as.
    b, j = pl.program_id(0), pl.program_id(2)
    first, last = _entries(span, b * s.n_blocks + j, 2)
    n_sub = s.n_blocks * s.block // SUB
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(ii, masked):
        start = pl.multiple_of(ii * SUB, SUB)
        rows = pl.ds(start, SUB)
        q, do = q_ref[rows, :], do_ref[rows, :]
        logits_T = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
        p_T = jnp.exp(logits_T * s.scale - lse_ref[:, rows])
        if masked:
            kv_pos = j * s.block + jax.lax.broadcasted_iota(jnp.int32, p_T.shape, 0)
            p_T = jnp.where((kv_pos >= ks_ref[:, rows]) & (kv_pos < ke_ref[:, rows]), p_T, 0.0)
        dv_sc[...] += jnp.dot(p_T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_T = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_T = p_T * (dp_T - di_ref[:, rows])
        dk_sc[...] += jnp.dot(ds_T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    def step(ii, carry):
        # The span is the hull of the query blocks that see this key block; classify each.
        lo, hi, flo, fhi = _entries(tab, b * n_sub + ii, 4)

        @pl.when((j >= lo) & (j <= hi))
        def _():
            _classified((j >= flo) & (j < fhi), body, ii)

        return carry

    jax.lax.fori_loop(first, last + 1, step, 0)
    dk_ref[...] = (dk_sc[...] * s.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _out(like: jax.Array, shape=None, dtype=None) -> jax.ShapeDtypeStruct:
    """An output shaped (by default) like `like`, varying over the same manual mesh axes (what
    pallas_call needs inside a shard_map that checks them)."""
    return jax.ShapeDtypeStruct(
        like.shape if shape is None else shape,
        like.dtype if dtype is None else dtype,
        manual_axis_type=jax.typeof(like).manual_axis_type,
    )


def _params(interpret: bool, vmem_bytes: int):
    """pallas_call options: every grid axis independent (megacore may split any); the scoped
    VMEM limit raised only when the resident blocks need more than the smallest default."""
    limit = int(vmem_bytes * 1.25) + 2**20 if vmem_bytes > _DEFAULT_VMEM // 2 else None
    return {
        "compiler_params": pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"), vmem_limit_bytes=limit
        ),
        "interpret": interpret,
    }


def _forward(s: _Static, q, k, v, ks, ke, fwd_tab):
    """q [B, N, Tp, H], k/v [B, K, Tp, H], ks/ke [B, 1, Tp] -> (o, lse [B, N, 1, Tp] f32)."""
    B, N, T, H = q.shape
    M, G = s.block, s.groups
    q_spec = pl.BlockSpec((None, None, M, H), lambda b, n, i, *_: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, T, H), lambda b, n, i, *_: (b, jax.lax.div(n, G), 0, 0))
    row_spec = pl.BlockSpec((None, 1, M), lambda b, n, i, *_: (b, 0, i))
    lse_spec = pl.BlockSpec((None, None, 1, M), lambda b, n, i, *_: (b, n, 0, i))
    vmem = 2 * (2 * M * H + 2 * T * H) * q.dtype.itemsize + (4 * M * SUB + M * H) * 4
    return pl.pallas_call(
        functools.partial(_fwd_kernel, s=s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, N, s.n_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[
                pltpu.VMEM((M, SUB), jnp.int32),
                pltpu.VMEM((M, SUB), jnp.int32),
                pltpu.VMEM((M, SUB), jnp.float32),
                pltpu.VMEM((M, SUB), jnp.float32),
                pltpu.VMEM((M, H), jnp.float32),
            ],
        ),
        out_shape=[_out(q), _out(q, (B, N, 1, T), jnp.float32)],
        name="tfx_block_sparse_attention_fwd",
        **_params(s.interpret, vmem),
    )(fwd_tab, q, k, v, ks, ke)


def _backward(s: _Static, q, k, v, ks, ke, fwd_tab, bwd_tab, span, o, lse, do):
    B, N, T, H = q.shape
    K, M, G = k.shape[1], s.block, s.groups
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
    size = q.dtype.itemsize

    # dQ: one query block per step, like the forward.
    q_spec = pl.BlockSpec((None, None, M, H), lambda b, n, i, *_: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, T, H), lambda b, n, i, *_: (b, jax.lax.div(n, G), 0, 0))
    vec_spec = pl.BlockSpec((None, None, 1, M), lambda b, n, i, *_: (b, n, 0, i))
    row_spec = pl.BlockSpec((None, 1, M), lambda b, n, i, *_: (b, 0, i))
    vmem = 2 * (3 * M * H + 2 * T * H) * size + (4 * M * SUB + M * H) * 4
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, s=s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, N, s.n_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((M, SUB), jnp.int32),
                pltpu.VMEM((M, SUB), jnp.int32),
                pltpu.VMEM((M, SUB), jnp.float32),
                pltpu.VMEM((M, SUB), jnp.float32),
                pltpu.VMEM((M, H), jnp.float32),
            ],
        ),
        out_shape=_out(q),
        name="tfx_block_sparse_attention_dq",
        **_params(s.interpret, vmem),
    )(fwd_tab, q, k, v, do, lse, di, ks, ke)

    # dK/dV: one key block per step and query head; the group's heads are summed after (f32).
    out_dtype = k.dtype if G == 1 else jnp.float32
    qrow_spec = pl.BlockSpec((None, None, T, H), lambda b, n, j, *_: (b, n, 0, 0))
    kv_spec = pl.BlockSpec((None, None, M, H), lambda b, n, j, *_: (b, jax.lax.div(n, G), j, 0))
    out_spec = pl.BlockSpec((None, None, M, H), lambda b, n, j, *_: (b, n, j, 0))
    vec_spec = pl.BlockSpec((None, None, 1, T), lambda b, n, j, *_: (b, n, 0, 0))
    row_spec = pl.BlockSpec((None, 1, T), lambda b, n, j, *_: (b, 0, 0))
    vmem = 2 * (2 * T * H + 2 * M * H) * size + 2 * 2 * M * H * 4 + 2 * M * H * 4 + 16 * T * 4
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, s=s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, N, s.n_blocks),
            in_specs=[
                qrow_spec,
                kv_spec,
                kv_spec,
                qrow_spec,
                vec_spec,
                vec_spec,
                row_spec,
                row_spec,
            ],
            out_specs=[out_spec, out_spec],
            scratch_shapes=[pltpu.VMEM((M, H), jnp.float32), pltpu.VMEM((M, H), jnp.float32)],
        ),
        out_shape=[_out(q, dtype=out_dtype), _out(q, dtype=out_dtype)],
        name="tfx_block_sparse_attention_dkv",
        **_params(s.interpret, vmem),
    )(bwd_tab, span, q, k, v, do, lse, di, ks, ke)
    if G > 1:
        dk = dk.reshape(B, K, G, T, H).sum(2).astype(k.dtype)
        dv = dv.reshape(B, K, G, T, H).sum(2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(s: _Static, q, k, v, ks, ke, fwd_tab, bwd_tab, span):
    return _forward(s, q, k, v, ks, ke, fwd_tab)[0]


def _attention_fwd(s, q, k, v, ks, ke, fwd_tab, bwd_tab, span):
    o, lse = _forward(s, q, k, v, ks, ke, fwd_tab)
    return o, (q, k, v, ks, ke, fwd_tab, bwd_tab, span, o, lse)


def _attention_bwd(s, res, do):
    dq, dk, dv = _backward(s, *res, do)
    return dq, dk, dv, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    ranges: BlockRanges,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Attention of q over k/v under the mask `ranges` (from `prepare` on the same T), on one
    device (a shard_map body on a mesh: Mosaic kernels are not auto-partitioned).

    Grouped-query heads (N a multiple of K) share their kv head. Differentiable in q, k, v.
    `interpret=True` runs the kernels in Pallas interpret mode (any backend).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    Tp = ranges.k_start.shape[1]
    n_blocks = ranges.fwd_blocks.shape[1] // 4
    M = Tp // n_blocks  # the block `prepare` chose
    if not T <= Tp < T + M:
        raise ValueError(f"key ranges of length {Tp} were prepared for another length than {T}")
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    s = _Static(block=M, n_blocks=n_blocks, groups=N // K, scale=H**-0.5, interpret=interpret)

    def heads_major(x):  # [B, T, X, H] -> [B, X, Tp, H], zero-padded
        return jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    o = _attention(
        s,
        heads_major(q_BTNH),
        heads_major(k_BSKH),
        heads_major(v_BSKH),
        ranges.k_start[:, None, :],
        ranges.k_end[:, None, :],
        ranges.fwd_blocks.reshape(-1),
        ranges.bwd_blocks.reshape(-1),
        ranges.bwd_span.reshape(-1),
    )
    return o.transpose(0, 2, 1, 3)[:, :T]
