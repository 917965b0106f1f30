"""Diffusion samplers and text sampling against float64 NumPy versions of the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfx_jax.diffusion import ddpm, samplers
from tfx_jax.generate.decode import sample_tokens

SCHED = ddpm.make_schedule("cosine", 1000)


def ddpm_reference(x_t, eps, t, s, z):
    """Ho et al. 2020, Algorithm 2 / eq. 11 for one (respaced) step t -> s, σ² = β̃ (eq. 7),
    written with the schedule's β and ᾱ in float64. s = -1 means the last step (to x_0)."""
    abar = SCHED.alphas_cumprod
    abar_t, abar_s = abar[t], (abar[s] if s >= 0 else 1.0)
    alpha_t = abar_t / abar_s  # respacing: the step's α is ᾱ_t / ᾱ_s (= 1 - β_t when s = t - 1)
    beta_t = 1.0 - alpha_t
    mean = (x_t - beta_t / np.sqrt(1.0 - abar_t) * eps) / np.sqrt(alpha_t)
    sigma2 = (1.0 - abar_s) / (1.0 - abar_t) * beta_t
    return mean + np.sqrt(sigma2) * z


def ddim_reference(x_t, eps, t, s):
    """Song et al. 2021, eq. 12 with σ_t = 0 (their α is our ᾱ), float64."""
    a_t = SCHED.alphas_cumprod[t]
    a_s = SCHED.alphas_cumprod[s] if s >= 0 else 1.0
    x0 = (x_t - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_s) * x0 + np.sqrt(1.0 - a_s - 0.0) * eps


@pytest.mark.parametrize("t,s", [(999, 998), (500, 499), (1, 0), (0, -1), (999, 995), (400, 0)])
def test_steps_match_float64_formulas(t, s):
    rng = np.random.default_rng(t)
    x, eps, z = (rng.normal(size=(3, 8, 8, 4)) for _ in range(3))
    abar_t = SCHED.alphas_cumprod[t]
    abar_s = SCHED.alphas_cumprod[s] if s >= 0 else 1.0
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = samplers.ddpm_step(f32(x), f32(eps), f32(abar_t), f32(abar_s), f32(z))
    np.testing.assert_allclose(
        np.asarray(got), ddpm_reference(x, eps, t, s, z), rtol=2e-4, atol=2e-4
    )
    got = samplers.ddim_step(f32(x), f32(eps), f32(abar_t), f32(abar_s))
    np.testing.assert_allclose(np.asarray(got), ddim_reference(x, eps, t, s), rtol=2e-4, atol=2e-4)


def test_unrespaced_ddpm_is_algorithm_2():
    """With every timestep, the step's α is the schedule's own α_t and the last step adds no
    noise (Algorithm 2: z = 0 at t = 1)."""
    ts = samplers.respaced_timesteps(1000, 1000)
    np.testing.assert_array_equal(ts, np.arange(999, -1, -1))
    abar_t, abar_s = samplers.step_alphas(SCHED, ts)
    np.testing.assert_allclose(1.0 - abar_t / abar_s, SCHED.betas[::-1], rtol=1e-9)
    x = jnp.ones((4,))
    last = samplers.ddpm_step(x, x, abar_t[-1], 1.0, jnp.full((4,), 100.0))
    np.testing.assert_allclose(np.asarray(last), np.asarray(samplers.predict_x0(x, x, abar_t[-1])))


def test_respacing():
    ts = samplers.respaced_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0 and (np.diff(ts) < 0).all()
    assert samplers.DEFAULT_STEPS == {"ddpm": 250, "ddim": 50}
    with pytest.raises(ValueError):
        samplers.respaced_timesteps(1000, 1001)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_loop_matches_numpy_loop(sampler):
    """The scanned loop equals a plain float64 loop over the same steps, denoiser and noise."""
    ts = samplers.respaced_timesteps(1000, 12)
    rng = jax.random.key(3)
    x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))

    def denoise(x, t):  # any fixed function of (x, t) will do
        return 0.3 * x + 0.001 * t

    got = samplers.sample(denoise, x_T, SCHED, ts, sampler, rng)
    x = np.asarray(x_T, np.float64)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        eps = 0.3 * x + 0.001 * t
        if sampler == "ddim":
            x = ddim_reference(x, eps, t, s)
        else:
            z = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x.shape), np.float64)
            x = ddpm_reference(x, eps, t, s, z)
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-3, atol=1e-3)


def test_guidance_formula():
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    np.testing.assert_array_equal(np.asarray(samplers.guided_eps(c, u, 1.0)), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(samplers.guided_eps(c, u, 0.0)), np.asarray(u))
    np.testing.assert_allclose(np.asarray(samplers.guided_eps(c, u, 3.0)), [2.0, 8.0])


def test_token_sampling_rules():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.1, 0.05]] * 2000))
    rng = jax.random.key(0)
    assert (np.asarray(sample_tokens(logits, rng, 0.0)) == 1).all()  # greedy
    assert (np.asarray(sample_tokens(logits, rng, 1.0, top_k=1)) == 1).all()
    assert set(np.asarray(sample_tokens(logits, rng, 1.0, top_k=2)).tolist()) == {1, 2}
    # top-p 0.75: {0.5, 0.3} reach it; 0.1 and the 0.05s are cut.
    assert set(np.asarray(sample_tokens(logits, rng, 1.0, top_p=0.75)).tolist()) == {1, 2}
    free = np.asarray(sample_tokens(logits, rng, 1.0))
    np.testing.assert_allclose(
        np.bincount(free, minlength=5) / 2000, [0.05, 0.5, 0.3, 0.1, 0.05], atol=0.04
    )
    allowed = jnp.array([[True, False, True, True, True]] * 2000)
    banned = np.asarray(sample_tokens(logits, rng, 0.0, allowed_BV=allowed))
    assert (banned == 2).all()


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 250)])
def test_oracle_denoiser_recovers_the_data(sampler, steps):
    """With the exact ε of a one-point data distribution, both samplers end on that point."""
    schedule = ddpm.make_schedule("cosine", 1000)
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 4)), jnp.float32)
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def oracle(x_t, t):
        return (x_t - jnp.sqrt(abar[t]) * x0) / jnp.sqrt(1.0 - abar[t])

    x_T = jax.random.normal(jax.random.key(1), x0.shape)
    ts = samplers.respaced_timesteps(1000, steps)
    out = samplers.sample(oracle, x_T, schedule, ts, sampler, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-2)


def test_clipping_x0_keeps_an_imperfect_denoiser_bounded():
    """The cosine schedule's ᾱ_{T-1} ~ 1e-9 turns a small ε̂ error into a huge x̂_0; clipping
    x̂_0 (and re-deriving ε̂ from it) bounds every step, and leaves an exact ε̂ unchanged."""
    sched = ddpm.make_schedule("cosine", 1000)
    key = jax.random.key(0)
    x0 = jnp.clip(jax.random.normal(key, (64, 8, 8, 4)), -3, 3)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    abar = jnp.float32(sched.alphas_cumprod[500])
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps
    np.testing.assert_allclose(samplers.clip_eps(x_t, eps, abar, 6.0), eps, atol=1e-4)

    # A denoiser that is right up to 5% noise in distribution but, like a trained network,
    # never predicts |ε| beyond 4 (so it cannot pull back an x_t that has already blown up).
    def denoise(x, t):
        a = jnp.asarray(sched.alphas_cumprod, jnp.float32)[t]
        true_eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        noise = jax.random.normal(jax.random.fold_in(key, t), x.shape)
        return jnp.clip(true_eps, -4, 4) + 0.05 * noise

    steps = samplers.respaced_timesteps(1000, 50)
    x_T = jax.random.normal(jax.random.key(2), x0.shape)
    free = samplers.sample(denoise, x_T, sched, steps, "ddim", key)
    clipped = samplers.sample(denoise, x_T, sched, steps, "ddim", key, clip_x0=6.0)
    assert float(jnp.abs(free).max()) > 100  # the blow-up this guards against
    assert float(jnp.abs(clipped).max()) <= 6.0
    assert float(jnp.sqrt(jnp.mean((clipped - x0) ** 2))) < 0.5
