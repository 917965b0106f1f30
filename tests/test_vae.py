"""Tests for the KL-VAE: shapes, gradients, loss terms, learning, the codec (latent scaling,
encode/decode), sharding, and the `run` driver (sharded batches, metrics, checkpoints, exact
resume, SIGTERM)."""

import functools
import json
import os
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.config import ConfigError, load_config
from tfx_jax.models.vae import (
    VAE,
    Codec,
    encode_images,
    float_to_uint8,
    latent_scale_factor,
    num_groups,
    stage_widths,
    uint8_to_float,
)
from tfx_jax.train import vae_steps as vs
from tfx_jax.train import vae_trainer as vt
from tfx_jax.train.preemption import Preempted


@pytest.fixture(autouse=True)
def _fast_cpu_rng_compiles():
    """Partitionable threefry (jax's default) compiles ~2 s per random op on XLA:CPU (jax 0.12),
    ~10 s for a VAE init; the classic lowering compiles in a fraction of that. Only the random
    bits differ; the code under test is the same."""
    with jax.threefry_partitionable(False):
        yield


def _synthetic_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Coloured rectangles and circles on plain random backgrounds, uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 256, 3)
        for _ in range(rng.integers(1, 3)):
            color = rng.integers(0, 256, 3)
            cy, cx = rng.integers(size // 6, size - size // 6, 2)
            r = rng.integers(size // 8, size // 4)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r // 2 + 1)
            images[i][mask] = color
    return images


@pytest.mark.parametrize(
    "size, downsample, latent",
    [(32, 4, 8), (32, 8, 4), (64, 4, 4), (64, 8, 8)],
)
def test_shapes(size, downsample, latent):
    model = VAE(latent_channels=latent, downsample=downsample)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    h = size // downsample
    x_hat, mean, logvar = jax.eval_shape(model.apply, variables, x, jax.random.key(1))
    assert x_hat.shape == (2, size, size, 3)
    assert mean.shape == logvar.shape == (2, h, h, latent)
    z = jax.ShapeDtypeStruct((2, h, h, latent), jnp.float32)
    assert jax.eval_shape(
        lambda v, z: model.apply(v, z, method=VAE.decode), variables, z
    ).shape == (
        2,
        size,
        size,
        3,
    )


def test_bfloat16_compute_keeps_float32_moments():
    model = VAE(dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    x_hat, mean, logvar = jax.eval_shape(model.apply, variables, x)
    assert x_hat.dtype == jnp.bfloat16
    assert mean.dtype == logvar.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))


def test_config_validation_and_widths():
    assert stage_widths((16, 32, 64), 8) == (16, 32, 64, 64)
    assert stage_widths((16, 32, 64), 4) == (16, 32, 64)
    with pytest.raises(ValueError, match="downsample"):
        stage_widths((16,), 16)
    with pytest.raises(ValueError, match="channels"):
        stage_widths((8, 16, 32, 64), 4)
    assert [num_groups(w) for w in (16, 32, 64, 128, 512, 48)] == [4, 8, 16, 32, 32, 12]
    model = VAE(downsample=8)
    with pytest.raises(ValueError, match="multiple of downsample"):
        model.init(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))


def test_params_carry_logical_axis_names():
    model = VAE(num_res_blocks=1)
    init = functools.partial(vs.init_state, model, optax.adam(1e-3), image_shape=(32, 32, 3))
    state = jax.eval_shape(init, jax.random.key(0))
    specs = nn.get_partition_spec(state.params)
    flat = {
        "/".join(k.key for k in path): s
        for path, s in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda s: isinstance(s, P)
        )
    }
    assert flat["encoder/conv_in/kernel"] == P(None, None, "conv_in", "conv_out")
    assert flat["encoder/conv_in/bias"] == P("conv_out")
    assert flat["decoder/up1_res0/norm1/scale"] == P("conv_out")
    assert flat["encoder/down0_res0/conv2/kernel"] == P(None, None, "conv_in", "conv_out")
    assert all(s != P() for s in flat.values()), "every parameter should be named"
    # Adam's moments inherit the names, so the optimizer state shards like the parameters.
    mu_specs = nn.get_partition_spec(state.opt_state[0].mu)
    assert jax.tree.leaves(mu_specs, is_leaf=lambda s: isinstance(s, P)) == list(flat.values())


def test_gradients_finite_and_nonzero_for_all_parameters():
    # ResBlocks at every level, with width changes (1x1 skips); small so that it compiles fast.
    model = VAE(num_res_blocks=1, channels=(8, 16), downsample=4)
    images = jnp.asarray(_synthetic_images(4, size=16))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))

    def loss(p):
        x = uint8_to_float(images)
        x_hat, mean, logvar = model.apply(p, x, jax.random.key(1))
        return vs.vae_loss(x_hat, x, mean, logvar)[0]

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), f"zero gradient for {name}"


def test_loss_terms_match_closed_forms():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    logvar = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    var = np.exp(logvar)
    expected_kl = 0.5 * np.sum(mean**2 + var - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(vs.kl_divergence(mean, logvar), expected_kl, rtol=1e-5)
    np.testing.assert_allclose(vs.kl_divergence(np.zeros_like(mean), np.zeros_like(mean)), 0.0)

    x = rng.uniform(-1, 0.8, size=(3, 8, 8, 3)).astype(np.float32)
    x_hat = x + 0.2  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    np.testing.assert_allclose(vs.psnr(x_hat, x), 20.0, rtol=1e-4)
    np.testing.assert_allclose(vs.reconstruction_error(x_hat, x, "l1"), 0.2, rtol=1e-5)
    np.testing.assert_allclose(vs.reconstruction_error(x_hat, x, "mse"), 0.04, rtol=1e-5)
    loss, metrics = vs.vae_loss(x_hat, x, mean, logvar, kl_weight=0.5, recon="mse")
    np.testing.assert_allclose(loss, 0.04 + 0.5 * expected_kl.mean() / (8 * 8 * 3), rtol=1e-5)
    assert set(metrics) == {"loss", "recon", "kl", "psnr"}
    with pytest.raises(ValueError, match="recon"):
        vs.reconstruction_error(x_hat, x, "l2")


def test_uint8_conversion_round_trip():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = uint8_to_float(images)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(float_to_uint8(x), images)
    np.testing.assert_array_equal(float_to_uint8(jnp.array([-3.0, 3.0])), [0, 255])


def test_latent_scale_factor_gives_unit_std():
    latents = 0.23 * np.random.default_rng(0).normal(size=(64, 4, 4, 8)) + 0.1
    factor = latent_scale_factor(latents)
    assert isinstance(factor, float)
    np.testing.assert_allclose(np.std(latents * factor), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="std"):
        latent_scale_factor(np.zeros((4, 4)))


def test_training_reduces_loss_and_round_trips():
    """150 Adam steps of the pure steps on 64 synthetic images: the reconstruction error must fall
    by half; the codec then encodes to unit-std latents and decodes them back to images."""
    images = _synthetic_images(64, seed=0)
    held_out = _synthetic_images(32, seed=1)
    model = VAE()  # the default, CPU-sized model: f8, 8 latent channels
    optimizer = optax.adam(2e-3)
    rng_init, rng_steps = jax.random.split(jax.random.key(0))
    init = functools.partial(vs.init_state, model, optimizer, image_shape=images.shape[1:])
    state = jax.jit(init)(rng_init)
    train_step = jax.jit(vs.make_train_step(model, optimizer), donate_argnums=0)
    eval_step = jax.jit(vs.make_eval_step(model))
    history = []
    for step in range(150):
        batch = images[vt.batch_indices(step, len(images), 16, seed=0)]
        state, metrics = train_step(state, batch, rng_steps)
        if step in (0, 149):
            record = {k: float(v) for k, v in metrics.items()}
            record["eval_psnr"] = float(np.mean(eval_step(state.params, held_out)[1]))
            history.append(record)
    first, last = history
    assert last["recon"] < 0.5 * first["recon"], history
    assert last["psnr"] > first["psnr"] + 6.0, history
    assert last["eval_psnr"] > first["eval_psnr"] + 4.0, history
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)

    # The codec: latents scaled to unit std, decoded back to uint8 images.
    params = nn.meta.unbox(state.params)
    codec = Codec(model, params, latent_scale_factor(encode_images(params, model, images, 1.0)))
    latents = codec.encode(images)
    assert latents.shape == (64, 4, 4, 8) and latents.dtype == jnp.float32
    np.testing.assert_allclose(np.std(latents), 1.0, rtol=1e-3)
    decoded = codec.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == jnp.uint8
    recon_psnr = float(vs.psnr(uint8_to_float(decoded), uint8_to_float(images)).mean())
    assert recon_psnr > first["psnr"] + 6.0
    np.testing.assert_array_equal(codec.decode(codec.encode(images[:16])), decoded[:16])
    unpacked_model, unpacked_params, scale = codec  # still unpacks as (model, params, scale)
    assert unpacked_model is model and unpacked_params is params and scale == codec.scale_factor


def test_train_step_runs_sharded_and_matches_single_device():
    """The pure step jits with mesh shardings (batch over 'data', convs replicated) unchanged."""
    model = VAE(channels=(8, 16), downsample=4, latent_channels=4)
    optimizer = optax.adam(1e-3)
    images = jnp.asarray(_synthetic_images(16))
    rng = jax.random.key(3)
    init = jax.jit(functools.partial(vs.init_state, model, optimizer, image_shape=images.shape))
    state = init(jax.random.key(0))
    step = vs.make_train_step(model, optimizer, recon="mse")
    ref_state, ref_metrics = jax.jit(step)(state, images, rng)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("batch", "data"), ("conv_in", None), ("conv_out", None))
    state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(state), mesh, rules)
    batch_sharding = NamedSharding(mesh, P("data"))
    sharded_step = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, NamedSharding(mesh, P())),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
    )
    new_state, metrics = sharded_step(
        jax.device_put(state, state_shardings), jax.device_put(images, batch_sharding), rng
    )
    assert int(new_state.step) == 1
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-4, err_msg=key)
    for a, b in zip(
        jax.tree.leaves(nn.meta.unbox(new_state.params)),
        jax.tree.leaves(nn.meta.unbox(ref_state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# vt.run: the sharded, logged, checkpointed driver behind `python -m tfx_jax vae`
# ---------------------------------------------------------------------------------------------

# A tiny VAE on 16 px images, global batch 16 over a data=4 x fsdp=2 mesh of the 8 CPU devices;
# 48 training images = 3 steps per epoch, so 4 steps cross an epoch boundary.
RUN_OVERRIDES = (
    "data.image_size=16",
    "vae.downsample=4",
    "vae.channels=8,16",
    "vae.batch_size=16",
    "vae.learning_rate=0.003",
    "vae.steps=4",
    "vae.log_every=2",
    "vae.checkpoint_every=2",
    "mesh.data=4",
    "mesh.fsdp=2",
)


def _run_cfg(*overrides: str):
    return load_config(REPO / "experiments" / "tiny.py", [*RUN_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def run_images():
    return _synthetic_images(48, size=16, seed=0), _synthetic_images(12, size=16, seed=1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, run_images):
    """One uninterrupted 4-step run, recording every array `put_images` hands to the devices."""
    out = tmp_path_factory.mktemp("vae_full")
    lines, batches = [], []
    put = vt.put_images

    def recording_put(*args):
        batches.append(put(*args))
        return batches[-1]

    with pytest.MonkeyPatch.context() as mp, jax.threefry_partitionable(False):
        mp.setattr(vt, "put_images", recording_put)
        summary = vt.run(_run_cfg(), *run_images, out, log=lines.append)
    return out, summary, lines, batches


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_batch_indices_are_seeded_epoch_permutations():
    batches = [vt.batch_indices(s, 10, 3, seed=7) for s in range(6)]  # 3 steps per epoch
    for epoch in (batches[:3], batches[3:]):
        flat = np.concatenate(epoch)
        assert len(set(flat.tolist())) == 9  # no repeats within an epoch; one image dropped
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))
    np.testing.assert_array_equal(vt.batch_indices(4, 10, 3, seed=7), batches[4])  # stateless
    with pytest.raises(ValueError, match="batch_size"):
        vt.batch_indices(0, 2, 3, seed=0)


def test_run_trains_sharded_logs_and_checkpoints(full_run, run_images):
    out, summary, lines, batches = full_run
    assert summary["steps"] == 4 and summary["resumed_from_step"] is None
    assert summary["mesh_shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert summary["scale_factor"] > 0 and np.isfinite(summary["seconds_per_step"])
    assert np.isfinite(summary["heldout_psnr_db"]) and summary["heldout_psnr_db"] > 0
    assert any("fresh" in line for line in lines), lines

    # Every batch (train, eval, encode) went to the devices split over data x fsdp, 2 rows each.
    assert batches and all(b.shape == (16, 16, 16, 3) for b in batches)
    for b in batches:
        assert b.sharding.mesh.shape == {"data": 4, "fsdp": 2, "tensor": 1}
        assert b.sharding.spec[0] == ("data", "fsdp")
        assert len(b.addressable_shards) == 8
        assert all(s.data.shape == (2, 16, 16, 3) for s in b.addressable_shards)

    # Params: unboxed host arrays with the model's structure, as prepare.py serialises them.
    model = VAE(latent_channels=4, downsample=4, channels=(8, 16))
    template = nn.meta.unbox(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    )
    assert jax.tree.structure(summary["params"]) == jax.tree.structure(template)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(summary["params"]))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        for key in ("vae/loss", "vae/recon", "vae/kl", "vae/psnr", "vae/eval_psnr"):
            assert np.isfinite(r[key]), (key, r)
    assert list((out / "tensorboard").iterdir()), "no TensorBoard events"

    ckpt = Checkpointer(out / "checkpoints", async_save=False, create=False)
    assert ckpt.all_steps() == [2, 4]
    meta = ckpt.read_meta(4)
    ckpt.close()
    assert meta["settings"] == vt.resume_settings(_run_cfg(), run_images[0])
    assert "steps" not in meta["settings"]


def test_run_resumes_exactly(full_run, run_images, tmp_path):
    """Stopped at step 2 (vae.steps=2), then continued to 4: the params of the 4-step run."""
    first = vt.run(_run_cfg("vae.steps=2"), *run_images, tmp_path, log=lambda _: None)
    assert first["steps"] == 2
    resumed = vt.run(_run_cfg(), *run_images, tmp_path, log=lambda _: None)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert [h["step"] for h in resumed["history"]] == [4]
    _assert_same_params(resumed["params"], full_run[1]["params"])
    assert resumed["scale_factor"] == full_run[1]["scale_factor"]

    # Lowering vae.steps below the latest checkpoint cannot give the state at that step: a
    # mismatch, refused by default; with on_config_mismatch=restart, a fresh run.
    with pytest.raises(ConfigError, match=r"step 4 > vae.steps=2.*on_config_mismatch=restart"):
        vt.run(_run_cfg("vae.steps=2"), *run_images, tmp_path, log=lambda _: None)
    lines = []
    restart = _run_cfg("vae.steps=2", "checkpoint.on_config_mismatch=restart")
    again = vt.run(restart, *run_images, tmp_path, log=lines.append)
    assert again["resumed_from_step"] is None
    assert any("step 4 > vae.steps=2" in line for line in lines), lines
    _assert_same_params(again["params"], first["params"])


def test_sigterm_saves_and_resumes_exactly(full_run, run_images, tmp_path):
    def preempt_at_step_2(line):
        if "vae step      2" in line:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as exc:
        vt.run(_run_cfg(), *run_images, tmp_path, log=preempt_at_step_2)
    assert exc.value.code == 0 and exc.value.step == 2  # saved at the step it arrived in
    resumed = vt.run(_run_cfg(), *run_images, tmp_path, log=lambda _: None)
    assert resumed["resumed_from_step"] == 2
    _assert_same_params(resumed["params"], full_run[1]["params"])


def test_run_with_changed_settings_is_refused_or_restarts(full_run, run_images, tmp_path):
    """The skeleton's mismatch rule (tests/test_skeleton.py): refused naming the key, nothing
    moved; checkpoint.on_config_mismatch=restart moves the checkpoints aside, starts fresh."""
    shutil.copytree(full_run[0] / "checkpoints", tmp_path / "checkpoints")
    changed = ("vae.kl_weight=0.001", "vae.steps=2")
    with pytest.raises(ConfigError, match=r"kl_weight: 1e-06 -> 0.001"):
        vt.run(_run_cfg(*changed), *run_images, tmp_path, log=lambda _: None)
    assert not (tmp_path / "checkpoints.stale").exists()
    lines = []
    restart = _run_cfg(*changed, "checkpoint.on_config_mismatch=restart")
    summary = vt.run(restart, *run_images, tmp_path, log=lines.append)
    assert summary["resumed_from_step"] is None and summary["steps"] == 2
    assert any("kl_weight: 1e-06 -> 0.001" in line and "fresh" in line for line in lines), lines
    assert sorted(p.name for p in (tmp_path / "checkpoints.stale").iterdir() if p.name.isdigit())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
