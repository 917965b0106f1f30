"""The block-sparse Pallas TPU attention (`models/tpu_attention.py`, `attention_impl=splash`).

On CPU the kernels run in Pallas interpret mode, so the same code the TPU compiles is checked
against the XLA reference here: outputs and dq / dk / dv on random packed layouts (documents,
images of several sizes, padding), fp32 and bf16, grouped-query heads, a length that is not a
whole number of blocks; the block classification against the dense mask; the model on a sharded
mesh. With the optional libtpu the kernels are also compiled for a v5p slice (skipped, saying so,
where libtpu is not installed, as in CI).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tfx_jax.models import attention, tpu_attention
from tfx_jax.models.mask import attention_mask

BLOCK = 256  # grid blocks of 2 inner sub-blocks (tpu_attention.SUB = 128), several per row


def packed_rows(rng, B, T, image_sizes=(16, 64, 128, 200)):
    """[B, T] segment / image ids: documents of 20..T/2 tokens, 0-3 images each (sizes from
    `image_sizes`, so blocks come out skipped, full and partial), trailing padding."""
    seg = np.zeros((B, T), np.int32)
    img = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 0
        while t < T - 24:
            doc += 1
            end = min(t + int(rng.integers(20, T // 2)), T - int(rng.integers(0, 20)))
            seg[b, t:end] = doc
            pos, k = t + int(rng.integers(1, 8)), 0
            while k < 3 and rng.random() < 0.7:
                n = int(rng.choice(image_sizes))
                if pos + n >= end:
                    break
                k += 1
                img[b, pos : pos + n] = k
                pos += n + int(rng.integers(1, 12))
            t = end
    return jnp.asarray(seg), jnp.asarray(img)


def brute_force_kinds(seg, img, bq, bkv):
    """Per block pair from the dense mask: 0 nothing visible, 2 all visible, 1 otherwise."""
    m = np.asarray(attention_mask(seg, seg, img, img))
    B, T, _ = m.shape
    blocks = m.reshape(B, T // bq, bq, T // bkv, bkv).transpose(0, 1, 3, 2, 4)
    count = blocks.sum((-1, -2))
    return np.where(count == 0, 0, np.where(count == bq * bkv, 2, 1))


def qkv(B, T, N, K, H, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    return q, k, v, do


def outputs_and_grads(fn, q, k, v, do):
    """(o, dq, dk, dv) of fn(q, k, v), the gradients of <o, do>."""

    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * do), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (o, *grads)


def assert_close(got, want, rtol, names=("o", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        err = np.abs(g - w).max() / scale
        assert err <= rtol, f"{name}: max error {err:.2e} of max |value| {scale:.3g} > {rtol}"


# ----------------------------------------------------------------------------- block tables


@pytest.mark.parametrize("seed, bq, bkv", [(0, 256, 128), (1, 128, 256), (2, 32, 16), (3, 16, 64)])
def test_block_kinds_match_the_dense_mask(seed, bq, bkv):
    """Skipped / full / partial per block pair is exact: a pair is skipped iff the dense mask has
    nothing there, and taken without the element mask iff it has everything (the kernels' block
    shapes, and finer ones to test the edges)."""
    rng = np.random.default_rng(seed)
    T = 512
    seg, img = packed_rows(rng, 3, T, image_sizes=(8, 16, 40, 64, 128))
    ranges = tpu_attention.prepare(seg, img, block=BLOCK)
    q_blocks, span = tpu_attention.block_tables(ranges.k_start, ranges.k_end, bq, bkv)
    want = brute_force_kinds(seg, img, bq, bkv)
    np.testing.assert_array_equal(np.asarray(tpu_attention.pair_kinds(q_blocks, T // bkv)), want)
    # The dK/dV walk: for each key block, the first and last query block that sees it.
    seen = want > 0
    first = seen.argmax(1)
    last = seen.shape[1] - 1 - seen[:, ::-1].argmax(1)
    np.testing.assert_array_equal(np.asarray(span), np.stack([first, last], -1))
    if bq == BLOCK and bkv == tpu_attention.SUB:  # what prepare hands the forward kernel
        np.testing.assert_array_equal(ranges.fwd_blocks.reshape(q_blocks.shape), q_blocks)


def test_known_layout_skips_ten_of_sixteen_blocks():
    """One row of 4 blocks of 128: a text document [0, 256); a document of one 128-patch image
    [256, 384) and text [384, 448); padding [448, 512)."""
    seg = np.zeros((1, 512), np.int32)
    img = np.zeros((1, 512), np.int32)
    seg[0, :256], seg[0, 256:448], img[0, 256:384] = 1, 2, 1
    ranges = tpu_attention.prepare(jnp.asarray(seg), jnp.asarray(img), block=128)
    kinds = np.asarray(tpu_attention.pair_kinds(ranges.fwd_blocks.reshape(1, 4, 4), 4))[0]
    want = [
        [1, 0, 0, 0],  # causal diagonal
        [2, 1, 0, 0],  # the earlier block whole, the diagonal
        [0, 0, 2, 0],  # the image sees itself whole, nothing of the other document
        [0, 0, 1, 1],  # text sees the image (padding rows do not) and itself causally
    ]
    np.testing.assert_array_equal(kinds, want)
    assert (kinds == 0).sum() == 10 and (kinds == 2).sum() == 2
    np.testing.assert_array_equal(
        np.asarray(ranges.bwd_span).reshape(4, 2), [[0, 1], [1, 1], [2, 3], [3, 3]]
    )


# ----------------------------------------------------------------------------- vs the reference


def test_matches_xla_fp32():
    """Outputs and dq, dk, dv to 1e-5 of the reference, fp32, 2 heads of 64, 2 blocks of 2
    sub-blocks per row."""
    B, T, N, H = 2, 512, 2, 64
    seg, img = packed_rows(np.random.default_rng(0), B, T)
    q, k, v, do = qkv(B, T, N, N, H, jnp.float32)
    ranges = tpu_attention.prepare(seg, img, block=BLOCK)
    kinds = np.asarray(tpu_attention.pair_kinds(ranges.fwd_blocks.reshape(B, 2, 4), 4))
    assert (kinds == 0).any() and (kinds == 1).any()
    got = outputs_and_grads(
        lambda q, k, v: tpu_attention.attention(q, k, v, ranges, interpret=True), q, k, v, do
    )
    mask = attention.dense_mask(seg, img)
    want = outputs_and_grads(lambda q, k, v: attention.xla_attention(q, k, v, mask), q, k, v, do)
    assert_close(got, want, rtol=1e-5)


def test_matches_xla_bf16_grouped_heads_padded_length():
    """bf16, 4 query heads over 2 kv heads of 128, T = 320 (padded to 2 blocks inside): within
    1e-2 of the fp32 reference on the same bf16 inputs."""
    B, T, N, K, H = 2, 320, 4, 2, 128
    seg, img = packed_rows(np.random.default_rng(1), B, T)
    q, k, v, do = qkv(B, T, N, K, H, jnp.bfloat16, seed=1)
    ranges = tpu_attention.prepare(seg, img, block=BLOCK)
    assert ranges.k_start.shape == (B, 512)
    got = outputs_and_grads(
        lambda q, k, v: tpu_attention.attention(q, k, v, ranges, interpret=True), q, k, v, do
    )
    mask = attention.dense_mask(seg, img)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = outputs_and_grads(lambda q, k, v: attention.xla_attention(q, k, v, mask), *f32, do)
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
    assert_close(got, want, rtol=1e-2)


def test_model_on_a_mesh_matches_xla(tiny_config, monkeypatch):
    """The tiny model with attention_impl=splash (a shard_map over batch and heads on a
    data x fsdp x tensor mesh, 2 blocks of 128 per row) gives the reference loss and gradients."""
    import optax
    from test_model import fixed_batch

    from tfx_jax.diffusion import ddpm
    from tfx_jax.models.transformer import Transfusion
    from tfx_jax.train.loop import Trainer, mesh_context
    from tfx_jax.train.steps import forward_losses

    monkeypatch.setattr(tpu_attention, "BLOCK", 128)
    sets = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.seq_len=256"]
    trainer = Trainer(tiny_config(None, [*sets, "model.attention_impl=splash"]))
    cfg = trainer.cfg
    batch = fixed_batch(cfg)
    assert (batch["image_ids"] > 0).any() and (batch["segment_ids"].max(1) > 1).any()
    batch = trainer.put_batch(batch)
    schedule = ddpm.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    reference = Transfusion(tiny_config(None, sets).model)

    def loss_and_grads(model):
        def loss(p):
            return forward_losses(p, model, cfg, schedule, batch, jax.random.key(1))[0]

        with mesh_context(trainer.mesh, cfg):
            return jax.jit(jax.value_and_grad(loss))(trainer.state.params)

    (want, want_g), (got, got_g) = loss_and_grads(reference), loss_and_grads(trainer.model)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(
        float(optax.tree.norm(got_g)), float(optax.tree.norm(want_g)), rtol=1e-4
    )
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4 * np.abs(w).max())


def test_auto_is_this_kernel_on_tpu_only():
    assert attention.resolve_auto("tpu") == "splash"
    assert attention.resolve_auto("cpu") == "xla"
    # Decoding with a KV cache takes the dense mask: the reference serves it.
    assert attention.decode_impl("splash") is attention.IMPLEMENTATIONS["xla"]


# ----------------------------------------------------------------------------- TPU compile


def test_compiles_for_a_v5p_slice(monkeypatch):
    """Forward and backward lowered by Mosaic and compiled by libtpu for 4 v5p chips, under
    the same shard_map the model uses (batch over data, heads over tensor)."""
    from tfx_jax import dryrun

    if not dryrun.libtpu_available():
        pytest.skip("libtpu not installed (pip install -e '.[tpu]'): TPU compile not checked")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = dryrun.topology_devices(dryrun.TOPOLOGIES["v5p-8"])
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
    B, T, N, K, H = 4, 1024, 4, 2, 64

    def loss(q, k, v, seg, img):
        ranges = tpu_attention.prepare(seg, img)

        def local(q, k, v, ranges):
            return tpu_attention.attention(q, k, v, ranges)

        rows = P("data", None)
        spec = P("data", None, "tensor", None)
        o = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec, spec, tpu_attention.BlockRanges(*[rows] * 5)),
            out_specs=spec,
        )(q, k, v, ranges)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    def arg(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    x = P("data", None, "tensor", None)
    args = (
        arg((B, T, N, H), jnp.bfloat16, x),
        arg((B, T, K, H), jnp.bfloat16, x),
        arg((B, T, K, H), jnp.bfloat16, x),
        arg((B, T), jnp.int32, P("data", None)),
        arg((B, T), jnp.int32, P("data", None)),
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    hlo = compiled.as_text()
    for kernel in ("fwd", "dq", "dkv"):
        assert f"tfx_block_sparse_attention_{kernel}" in hlo, kernel
    assert compiled.memory_analysis().temp_size_in_bytes > 0
