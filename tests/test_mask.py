"""The Transfusion mask against a brute-force reference on random packed layouts, with
bidirectional and causal attention inside images (`model.image_attention`): the dense mask, the
key ranges, every kernel that runs on CPU, and the model (a causal-image patch never sees later
patches)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tfx_jax.models.mask import IMAGE_ATTENTION, attention_mask, key_ranges


def random_layout(rng, T, max_docs=4, max_images=3, patch_len=(2, 6)):
    """Random rows: several documents, several images per document, trailing padding."""
    seg = np.zeros(T, np.int32)
    img = np.zeros(T, np.int32)
    t, doc = 0, 0
    while t < T and doc < max_docs:
        doc += 1
        length = int(rng.integers(3, T // 2))
        end = min(T - int(rng.integers(0, 4)), t + length)
        if end <= t:
            break
        seg[t:end] = doc
        k, pos = 0, t + 1
        while k < max_images and pos < end - 2:
            pos += int(rng.integers(0, 3))
            n = int(rng.integers(*patch_len))
            if pos + n >= end:
                break
            k += 1
            img[pos : pos + n] = k
            pos += n + 1  # an EOI-like text token after the block
        t = end
    return seg, img


def brute_force(seg, img, image_attention="bidirectional"):
    T = len(seg)
    m = np.zeros((T, T), bool)
    for i in range(T):
        for j in range(T):
            if seg[i] == 0:
                m[i, j] = i == j
            elif seg[i] == seg[j]:
                same_image = img[i] > 0 and img[i] == img[j]
                m[i, j] = j <= i or (same_image and image_attention == "bidirectional")
    return m


@pytest.mark.parametrize("image_attention", IMAGE_ATTENTION)
@pytest.mark.parametrize("seed", range(12))
def test_mask_matches_brute_force(seed, image_attention):
    rng = np.random.default_rng(seed)
    T = 16 + 12 * (seed % 3)
    rows = [random_layout(rng, T) for _ in range(3)]
    seg = np.stack([r[0] for r in rows])
    img = np.stack([r[1] for r in rows])
    seg_j, img_j = jnp.asarray(seg), jnp.asarray(img)
    got = np.asarray(attention_mask(seg_j, seg_j, img_j, img_j, image_attention=image_attention))
    for b in range(3):
        want = brute_force(seg[b], img[b], image_attention)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")


@pytest.mark.parametrize("image_attention", IMAGE_ATTENTION)
@pytest.mark.parametrize("seed", range(12))
def test_key_ranges_equal_dense_mask(seed, image_attention):
    rng = np.random.default_rng(100 + seed)
    T = 16 + 12 * (seed % 3)
    rows = [random_layout(rng, T) for _ in range(3)]
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    img = jnp.asarray(np.stack([r[1] for r in rows]))
    k_start, k_end = key_ranges(seg, img, image_attention)
    j = np.arange(T)[None, None, :]
    from_ranges = (j >= np.asarray(k_start)[:, :, None]) & (j < np.asarray(k_end)[:, :, None])
    dense = attention_mask(seg, seg, img, img, image_attention=image_attention)
    np.testing.assert_array_equal(from_ranges, np.asarray(dense))


def test_causal_image_attention_is_plain_per_document_causal():
    """With causal image attention the image ids do not matter: the mask of a layout with
    images equals that of the same layout read as all text; a bad value is one clear error."""
    rng = np.random.default_rng(7)
    rows = [random_layout(rng, 40) for _ in range(3)]
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    img = jnp.asarray(np.stack([r[1] for r in rows]))
    assert int((img > 0).sum()) > 10
    text = jnp.zeros_like(img)
    causal = attention_mask(seg, seg, img, img, image_attention="causal")
    np.testing.assert_array_equal(causal, attention_mask(seg, seg, text, text))
    for a, b in zip(key_ranges(seg, img, "causal"), key_ranges(seg, text), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="image_attention='full'"):
        key_ranges(seg, img, "full")


def test_mask_hand_example():
    # doc 1: text, BOI, 2 patches, EOI ; doc 2: 2 text ; padding
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 0]])
    img = jnp.array([[0, 0, 1, 1, 0, 0, 0, 0]])
    m = np.asarray(attention_mask(seg, seg, img, img))[0].astype(int)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # first patch sees the second (same image)
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],  # a new document sees nothing before it
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
        ]
    )
    np.testing.assert_array_equal(m, expected)
    causal = np.asarray(attention_mask(seg, seg, img, img, image_attention="causal"))[0]
    expected[2, 3] = 0  # the first patch no longer sees the second
    np.testing.assert_array_equal(causal.astype(int), expected)


# Kernels that run only on a GPU; every other registered kernel runs here (the Pallas ones in
# interpret mode: the same kernel code and block tables the accelerator compiles).
GPU_ONLY = ("cudnn",)


@pytest.mark.parametrize("image_attention", IMAGE_ATTENTION)
def test_every_cpu_kernel_follows_the_image_attention_switch(image_attention, fast_compile):
    """Each registered kernel (`prepare(..., image_attention=...)` then `apply`) gives the
    reference attention over the brute-force mask, and causal and bidirectional differ at the
    patches, so no kernel ignores the switch."""
    import importlib.util

    import jax

    from tfx_jax.models import attention

    rng = np.random.default_rng(11)
    B, T, N, H = 2, 64, 2, 32
    rows = [random_layout(rng, T, max_images=3, patch_len=(4, 16)) for _ in range(B)]
    seg, img = (np.stack(r) for r in zip(*rows, strict=True))
    assert (img > 0).sum() > 20
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, N, H)) for i in range(3))
    want_mask = np.stack(
        [brute_force(s, i, image_attention) for s, i in zip(seg, img, strict=True)]
    )
    want = np.asarray(attention.xla_attention(q, k, v, jnp.asarray(want_mask)[:, None]))
    other = "causal" if image_attention == "bidirectional" else "bidirectional"
    names = [n for n in attention.IMPLEMENTATIONS if n not in GPU_ONLY]
    if importlib.util.find_spec("tokamax") is None:
        names.remove("tokamax")
    assert {"xla", "pallas_gpu", "splash"} <= set(names)
    patch = img > 0
    for name in names:
        impl = attention.get(name)

        def run(mode, impl=impl):
            aux = impl.prepare(jnp.asarray(seg), jnp.asarray(img), image_attention=mode)
            return np.asarray(impl.apply(q, k, v, aux))

        got = run(image_attention)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
        assert np.abs(got - run(other))[patch].max() > 1e-3, name


def test_a_causal_image_patch_never_sees_later_patches(tiny_config, fast_compile):
    """The tiny model (linear patches): perturbing patch 5 of an image's 16 leaves ε̂ at patches
    0-4 unchanged with causal image attention and changes them with bidirectional; the patches
    from 5 on change either way. (A U-Net patch encoder mixes neighbouring patches in its
    convolutions whatever the mask: Transfusion Table 5's U-Net rows.)"""
    import dataclasses

    import flax.linen as nn
    import jax
    from model_helpers import forward

    from tfx_jax import layout
    from tfx_jax.layout import ModelInputs
    from tfx_jax.models.transformer import Transfusion

    cfg = tiny_config()
    m = cfg.model
    inputs = ModelInputs.dummy(cfg, length=8, images=1)
    init = jax.jit(lambda key: nn.meta.unbox(Transfusion(m).init(key, inputs))["params"])
    params = init(jax.random.key(0))  # the mask has no parameters: one set serves both
    I, p, g = m.num_patches, m.patch_size, m.latent_size // m.patch_size
    T = 4 + I + 3
    tok = np.random.default_rng(0).integers(6, m.vocab_size, (1, T)).astype(np.int32)
    seg = np.ones((1, T), np.int32)
    img = np.zeros((1, T), np.int32)
    img[0, 4 : 4 + I] = 1
    pos = np.arange(T, dtype=np.int32)[None]
    slot, start, _ = layout.image_slots(jnp.asarray(seg), jnp.asarray(img), 1)
    lat = jax.random.normal(jax.random.key(1), (1, 1, m.latent_size, m.latent_size, 4))
    t = jnp.full((1, 1, I), 500, jnp.int32)
    layout_args = (tok, seg, pos, img, slot, start)
    k = 5  # raster order: grid row k // g, column k % g
    r, c = divmod(k, g)
    moved = lat.at[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p].add(1.0)

    def per_patch(x):  # [h, w, C] -> [I, p·p·C] in raster order
        x = np.asarray(x)[0, 0].reshape(g, p, g, p, -1).transpose(0, 2, 1, 3, 4)
        return x.reshape(I, -1)

    for image_attention in IMAGE_ATTENTION:
        model = Transfusion(dataclasses.replace(m, image_attention=image_attention))
        eps = jax.jit(lambda x, model=model: forward(model, params, *layout_args, x, t)[1])
        diff = np.abs(per_patch(eps(moved)) - per_patch(eps(lat))).max(-1)
        assert diff[k:].min() > 1e-4, (image_attention, diff)
        if image_attention == "causal":
            assert diff[:k].max() < 1e-6, diff
        else:
            assert diff[:k].min() > 1e-4, diff


def test_xla_attention_matches_jax_nn():
    import jax

    from tfx_jax.models import attention

    rng = np.random.default_rng(0)
    seg, img = random_layout(rng, 32)
    seg, img = jnp.asarray(seg[None]), jnp.asarray(img[None])
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 32, 4, 8)) for i in range(3))
    mask = attention.dense_mask(seg, img)
    ref = attention.get("xla").apply(q, k, v, mask)
    other = attention.get("dot_product").apply(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(other), atol=1e-5)
    # Grouped-query: 4 query heads sharing 2 kv heads equals repeating the kv heads.
    k2, v2 = k[:, :, :2], v[:, :, :2]
    gqa = attention.get("xla").apply(q, k2, v2, mask)
    rep = attention.get("xla").apply(q, jnp.repeat(k2, 2, axis=2), jnp.repeat(v2, 2, axis=2), mask)
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(rep), atol=1e-5)


def _mesh(data, fsdp, tensor):
    import jax

    return jax.make_mesh(
        (data, fsdp, tensor),
        ("data", "fsdp", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=jax.devices()[: data * fsdp * tensor],
    )


def test_shard_map_specs_follow_the_rules_table():
    """The kernel's shard_map specs come from the logical names (act_batch, act_heads,
    act_kv_heads) through the active rules, never from mesh axis names in the model code."""
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    from tfx_jax.config import MeshConfig
    from tfx_jax.models.attention import shard_map_specs

    mesh = _mesh(2, 2, 2)
    with nn.logical_axis_rules(MeshConfig().rules):  # the default table
        assert shard_map_specs(mesh, 8, 4, 2) == (
            P(("data", "fsdp"), None, ("tensor",), None),
            P(("data", "fsdp"), None),
        )
        # An axis that does not divide its dim is replicated (batch 6 over 4, 3 kv heads over 2).
        assert shard_map_specs(mesh, 6, 6, 3) == (P(None, None, None, None), P(None, None))
    changed = (
        ("act_batch", "tensor"),
        ("act_heads", ("data", "fsdp")),
        ("act_kv_heads", ("data", "fsdp")),
    )
    with nn.logical_axis_rules(changed):
        assert shard_map_specs(mesh, 8, 4, 4) == (
            P(("tensor",), None, ("data", "fsdp"), None),
            P(("tensor",), None),
        )
    # q and k/v heads on different axes would split a kv head from its query group: replicate.
    split = (("act_batch", "data"), ("act_heads", "tensor"), ("act_kv_heads", "fsdp"))
    with nn.logical_axis_rules(split):
        assert shard_map_specs(mesh, 8, 4, 4) == (
            P(("data",), None, None, None),
            P(("data",), None),
        )
    # No rules at all: every dim replicated.
    assert shard_map_specs(mesh, 8, 4, 4) == (P(None, None, None, None), P(None, None))


def test_shard_map_with_derived_specs_matches_unsharded():
    """A per-shard attention over key ranges (what the tokamax path runs, with the xla reference
    as the local kernel) under shard_map with the derived specs equals the unsharded result, for
    the default and a changed rules table."""
    import flax.linen as nn
    import jax

    from tfx_jax.config import MeshConfig
    from tfx_jax.models import attention

    rng = np.random.default_rng(3)
    B, T, N, K, H = 4, 24, 4, 2, 8
    rows = [random_layout(rng, T) for _ in range(B)]
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    img = jnp.asarray(np.stack([r[1] for r in rows]))
    q = jax.random.normal(jax.random.key(0), (B, T, N, H))
    k, v = (jax.random.normal(jax.random.key(i), (B, T, K, H)) for i in (1, 2))
    want = attention.xla_attention(q, k, v, attention.dense_mask(seg, img))

    def local(q, k, v, k_start, k_end):
        j = jnp.arange(k.shape[1])[None, None, :]
        mask = (j >= k_start[:, :, None]) & (j < k_end[:, :, None])
        return attention.xla_attention(q, k, v, mask[:, None])

    mesh = _mesh(2, 2, 2)
    changed = (
        ("act_batch", "fsdp"),
        ("act_heads", ("data", "tensor")),
        ("act_kv_heads", ("data", "tensor")),
    )
    for rules in (MeshConfig().rules, changed):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            qkv, rng_spec = attention.shard_map_specs(mesh, B, N, K)
            assert qkv != jax.sharding.PartitionSpec(None, None, None, None)
            fn = jax.shard_map(local, in_specs=(qkv, qkv, qkv, rng_spec, rng_spec), out_specs=qkv)
            got = jax.jit(fn)(q, k, v, *key_ranges(seg, img))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_tokamax_ranges_match_the_reference_on_a_sharded_mesh(tiny_config):
    """The tokamax implementation (key ranges; its XLA path on CPU, the Mosaic GPU kernel on a
    GPU) gives the reference losses and gradient norm on a data x fsdp x tensor mesh, where it
    runs under shard_map. Needs the optional tokamax package (not installed in CI: the GPU
    figures are in benchmarks/RESULTS.md)."""
    pytest.importorskip("tokamax")
    from test_model import fixed_batch

    from tfx_jax.train.loop import Trainer

    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    ref = Trainer(tiny_config(None, mesh))
    tok = Trainer(tiny_config(None, [*mesh, "model.attention_impl=tokamax"]))
    batch = fixed_batch(ref.cfg)
    a, b = ref.eval_step(batch), tok.eval_step(batch)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-5, err_msg=key)
    ma, mb = ref.train_step(batch), tok.train_step(batch)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-4)
