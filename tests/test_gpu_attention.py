"""The block-sparse Pallas GPU attention (`attention_impl=pallas_gpu`) against the `xla` reference.

On CPU the Triton kernels run in Pallas interpret mode: the same kernel code, block tables and
loop bounds, so skipping a block that has a visible key, or not masking a partial one, shows up
here as a wrong output or gradient. The GPU speed is in benchmarks/RESULTS.md.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mask import _mesh, random_layout

from tfx_jax.config import MeshConfig
from tfx_jax.data.sources import synthetic
from tfx_jax.layout import ModelInputs
from tfx_jax.models import attention, gpu_attention
from tfx_jax.models.mask import key_ranges
from tfx_jax.models.transformer import Transfusion

# Small interpret-mode tiles; 32 and 64 mixed so that the passes disagree on block edges.
BLOCKS = gpu_attention.BlockSizes(fwd_q=32, fwd_k=64, dq_q=64, dq_k=32, dkv_q=32, dkv_k=64)


def layouts(seed: int, B: int, T: int) -> tuple[jax.Array, jax.Array]:
    """Random packed rows (documents, images of 3..40 patches, trailing padding), plus a row
    that is all padding and a row that is one document ending in an image."""
    rng = np.random.default_rng(seed)
    rows = [random_layout(rng, T, max_docs=4, max_images=3, patch_len=(3, 40)) for _ in range(B)]
    seg, img = (np.stack(r) for r in zip(*rows, strict=True))
    seg[0], img[0] = 0, 0
    seg[1], img[1] = 1, 0
    img[1, T - 37 :] = 1
    return jnp.asarray(seg), jnp.asarray(img)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@functools.cache
def programs(dtype: str, N: int, K: int):
    """Jitted (outputs, dq, dk, dv) of the reference and of the kernel (through the registry,
    as a shard_map over a 2-device batch axis), compiled once per dtype for all layouts."""
    impl = attention.get("pallas_gpu")
    kernel = gpu_attention.make_apply(attention.shard_map_specs, blocks=BLOCKS)

    def grads(apply, prepare, q, k, v, ct, seg, img):
        out, vjp = jax.vjp(lambda q, k, v: apply(q, k, v, prepare(seg, img)), q, k, v)
        return (out, *vjp(ct))

    assert impl.prepare is key_ranges
    ref = jax.jit(functools.partial(grads, attention.xla_attention, attention.dense_mask))
    new = jax.jit(functools.partial(grads, kernel, key_ranges))
    return ref, new


def inputs(dtype, B, T, N, K, H, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), dtype)
    ct = jax.random.normal(keys[3], (B, T, N, H), dtype)
    return q, k, v, ct


@pytest.mark.parametrize(
    "dtype, N, K, tol",
    [("float32", 2, 1, 1e-5), ("bfloat16", 2, 2, 1e-2)],
    ids=["fp32-gqa", "bf16"],
)
def test_outputs_and_gradients_match_xla(dtype, N, K, tol):
    """fp32 (2 query heads sharing 1 kv head) and bf16 (2 heads): the output and dq, dk, dv
    over random packed layouts, T = 160 (padded to 192 inside), on a data=2 mesh (the
    registry's shard_map path), relative error max|a - b| / max|b| <= tol."""
    B, T, H = 4, 160, 32
    ref, new = programs(dtype, N, K)
    mesh = _mesh(2, 1, 1)
    for seed in range(3):
        seg, img = layouts(seed, B, T)
        args = (*inputs(jnp.dtype(dtype), B, T, N, K, H, seed), seg, img)
        want = ref(*args)
        with jax.set_mesh(mesh), nn.logical_axis_rules(MeshConfig().rules):
            got = new(*args)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert rel_err(a, b) <= tol, f"seed {seed} {name}: {rel_err(a, b):.3g} > {tol}"


@functools.partial(jax.jit, static_argnums=(2, 3))
def tables(seg, img, bq, bk):
    """Both tables of a layout: per query block (key blocks) and per key block (query blocks)."""
    q_tab = gpu_attention.block_tables(*key_ranges(seg, img), bq, bk)
    return q_tab, gpu_attention.key_block_tables(q_tab, seg.shape[1] // bk)


def test_block_tables_hand_made_layout():
    """Doc 1: text 0-3, a 4-patch image 4-7, text 8-9; doc 2: text 10-13; padding 14-15; blocks
    of 4. Which (query block, key block) pairs are skipped, masked or full, in both tables."""
    seg = jnp.array([[1] * 10 + [2] * 4 + [0] * 2])
    img = jnp.array([[0] * 4 + [1] * 4 + [0] * 8])
    q_tab, k_tab = (np.asarray(t)[0].T for t in tables(seg, img, 4, 4))  # [n, (lo, hi, ...)]
    np.testing.assert_array_equal(
        q_tab,
        [
            [0, 1, 1, 1],  # causal text: its diagonal block, masked
            [0, 2, 0, 2],  # the image sees the text before it and itself whole
            [0, 3, 3, 3],  # text 8-9 sees doc 1, 10-11 start doc 2: all three masked
            [2, 4, 4, 4],  # doc 2 and padding: doc 1's key blocks 0 and 1 skipped
        ],
    )
    np.testing.assert_array_equal(
        k_tab,
        [
            [0, 3, 1, 2],  # key block 0: seen by query blocks 0-2, whole only by block 1
            [1, 3, 1, 2],
            [2, 4, 4, 4],
            [3, 4, 4, 4],
        ],
    )


@pytest.mark.parametrize("seed", range(4))
def test_block_tables_classify_every_pair_exactly(seed):
    """On random packed layouts both tables give each block pair the kind the dense mask has:
    no visible key = skipped, every key visible = full, else masked (so no work is wasted on an
    empty pair and no visible key is dropped)."""
    T, bq, bk = 96, 8, 16
    seg, img = layouts(seed, 6, T)
    dense = np.asarray(attention.dense_mask(seg, img))[:, 0]  # [B, T, T]
    blocks = dense.reshape(6, T // bq, bq, T // bk, bk)
    want = np.where(blocks.all((2, 4)), 2, np.where(blocks.any((2, 4)), 1, 0))  # [B, nq, nk]
    q_tab, k_tab = tables(seg, img, bq, bk)

    def kinds(tab, n):  # [B, 4, rows] -> [B, rows, n] in 0 / 1 / 2
        lo, hi, flo, fhi = (np.asarray(tab)[:, c, :, None] for c in range(4))
        j = np.arange(n)
        return np.where((flo <= j) & (j < fhi), 2, np.where((lo <= j) & (j < hi), 1, 0))

    np.testing.assert_array_equal(kinds(q_tab, T // bk), want)
    np.testing.assert_array_equal(kinds(k_tab, T // bq), want.transpose(0, 2, 1))


def test_model_forward_matches_xla(tiny_config):
    """The tiny model's logits and ε̂ on a packed synthetic batch with `pallas_gpu` equal those
    with `xla` (same parameters)."""
    cfg = tiny_config()
    layout = synthetic.config_batch(cfg, np.random.default_rng(0), batch_size=2)
    assert (layout["image_ids"] > 0).any() and (layout["segment_ids"] == 0).any()
    spec = ModelInputs.spec(cfg, 2)
    rng = np.random.default_rng(1)
    noisy = jnp.asarray(rng.normal(size=spec.noisy_latents.shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, spec.timesteps.shape), jnp.int32)
    x = ModelInputs.from_layout(jax.tree.map(jnp.asarray, layout), noisy, t)
    # Random parameters of the right shapes (compiling the real initialiser costs ~7 s on CPU).
    shapes = jax.eval_shape(Transfusion(cfg.model).init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
    outs = []
    for impl in ("xla", "pallas_gpu"):
        model = Transfusion(dataclasses.replace(cfg.model, attention_impl=impl))
        outs.append(jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))(params, x))
    assert np.abs(outs[0].logits).std() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1].eps, outs[0].eps, rtol=1e-5, atol=1e-5)


def test_kernels_lower_to_triton_for_a_hopper_gpu(monkeypatch):
    """The three kernels lower to Triton IR for an H100/H200 (sm_90) on this CPU machine, at the
    benchmark's head_dim 128 with grouped-query heads and the default GPU blocks, so a kernel
    that only interpret mode accepts fails here rather than on the GPU. Uses a private jax
    hook to name the GPU; skipped where that moved."""
    try:
        from jax._src.pallas.triton import gpu_info
        from jax._src.pallas.triton import pallas_call_registration as registration

        h200 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H200)
        registration.gpu_info_lib.get_gpu_info  # noqa: B018
    except (ImportError, AttributeError) as e:
        pytest.skip(f"jax's private Triton GPU-info hook moved ({e})")
    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h200)
    B, T, N, K, H = 1, 512, 4, 2, 128
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def fwd_bwd(q, k, v, ks, ke):
        fn = lambda q, k, v: gpu_attention.attention(q, k, v, (ks, ke), interpret=False)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    text = jax.jit(fwd_bwd).trace(q, k, k, r, r).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


def _kernel_calls(jaxpr, found=None) -> list[str]:
    """The names of the Pallas kernels a jaxpr calls (not looking inside the kernels)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(
                str(eqn.params.get("name_and_src_info", eqn.params.get("name"))).split()[0]
            )
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _kernel_calls(inner, found)
    return found


def test_saving_the_residuals_skips_the_forward_in_the_backward():
    """Under `model.remat_policy=dots_no_batch_attention` the rematerialised backward reuses
    the forward kernel's named output and log-sum-exp (one forward kernel in the gradient's
    program, against two under `dots_no_batch`), with the same gradients."""
    from tfx_jax.models.remat import REMAT_POLICIES

    B, T, N, H = 1, 64, 2, 16
    q, k, v = jax.random.normal(jax.random.key(0), (3, B, T, N, H), jnp.float32)
    ks = jnp.zeros((B, T), jnp.int32)
    ke = jnp.broadcast_to(jnp.arange(1, T + 1, dtype=jnp.int32), (B, T))
    w = jax.random.normal(jax.random.key(1), (H, H), jnp.float32)

    def layer(q, k, v):
        o = gpu_attention.attention(q, k, v, (ks, ke), blocks=BLOCKS, interpret=True)
        return jnp.sum((o @ w) ** 2)

    grads, calls = {}, {}
    for name in ("dots_no_batch", "dots_no_batch_attention"):
        fn = jax.grad(jax.checkpoint(layer, policy=REMAT_POLICIES[name]), argnums=(0, 1, 2))
        calls[name] = _kernel_calls(jax.make_jaxpr(fn)(q, k, v).jaxpr)
        grads[name] = fn(q, k, v)
    fwd = "transfusion_attention_fwd"
    assert calls["dots_no_batch"].count(fwd) == 2, calls
    assert calls["dots_no_batch_attention"].count(fwd) == 1, calls
    for a, b in zip(grads["dots_no_batch"], grads["dots_no_batch_attention"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
