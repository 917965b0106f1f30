"""Noise schedules and the forward process against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.diffusion import ddpm
from tfx_jax.train import losses


def test_cosine_schedule_matches_formula():
    T, s = 1000, 0.008
    sched = ddpm.make_schedule("cosine", T)
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    t = np.arange(1, T + 1)
    expected = f(t) / f(0)
    # Clipping β at 0.999 only touches the very last steps.
    np.testing.assert_allclose(sched.alphas_cumprod[:-5], expected[:-5], rtol=1e-10)
    assert np.all(np.diff(sched.alphas_cumprod) < 0) and sched.betas.max() <= 0.999
    assert sched.alphas_cumprod[0] > 0.9999 and sched.alphas_cumprod[-1] < 1e-6


def test_q_sample_moments():
    sched = ddpm.make_schedule("cosine", 1000)
    x0 = jnp.ones((4096, 8))
    t = jnp.full((4096,), 500)
    xt = ddpm.q_sample(sched, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
    abar = sched.alphas_cumprod[500]
    np.testing.assert_allclose(float(xt.mean()), np.sqrt(abar), atol=0.01)
    np.testing.assert_allclose(float(xt.var()), 1 - abar, rtol=0.03)


def test_diffusion_loss_averages_per_image_then_over_images():
    eps = jnp.zeros((1, 3, 2, 2, 1))
    eps_hat = jnp.stack(
        [jnp.full((2, 2, 1), 1.0), jnp.full((2, 2, 1), 3.0), jnp.full((2, 2, 1), 9.0)]
    )[None]
    valid = jnp.array([[True, True, False]])
    loss, per_image, n = losses.diffusion_loss(eps_hat, eps, valid)
    assert float(n) == 2 and float(loss) == (1.0 + 9.0) / 2
    np.testing.assert_allclose(np.asarray(per_image), [[1.0, 9.0, 81.0]])


def test_lm_loss_masks_and_z_loss():
    logits = jnp.zeros((1, 4, 5))
    tokens = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[True, False, True, False]])
    loss, ce, n = losses.lm_loss(logits, tokens, mask)
    np.testing.assert_allclose(float(ce), np.log(5), rtol=1e-6)
    assert float(n) == 2
    loss_z, _, _ = losses.lm_loss(logits, tokens, mask, z_loss=1e-2)
    np.testing.assert_allclose(float(loss_z - loss), 1e-2 * np.log(5) ** 2, rtol=1e-5)
