"""Diffusion samplers as pure functions of arrays: DDPM, DDIM, classifier-free guidance.

Every step moves x from a noise level with cumulative signal ᾱ_t to a lower one ᾱ_s (s < t), with
ᾱ_s = 1 for the last step (clean data). Writing a step for an arbitrary pair (ᾱ_t, ᾱ_s) is what
timestep respacing needs (Nichol & Dhariwal 2021, §4: sample with a subsequence of the training
timesteps, using α = ᾱ_t/ᾱ_s in place of the per-step α_t), and what rolling diffusion needs (every
row of patches steps between its own pair of levels, see `tfx_jax.diffusion.rolling`).

  x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                                    Ho et al. 2020, eq. 15
  DDPM:  x_s = 1/√α (x_t − (1−α)/√(1−ᾱ_t) ε̂) + σ z,  α = ᾱ_t/ᾱ_s       Ho et al. 2020, eq. 11
         σ² = β̃ = (1−ᾱ_s)/(1−ᾱ_t) · (1−α)                               Ho et al. 2020, eq. 7
  DDIM:  x_s = √ᾱ_s x̂_0 + √(1−ᾱ_s) ε̂    (η = 0, deterministic)         Song et al. 2021, eq. 12
  CFG:   ε̂ = ε̂_u + s (ε̂_c − ε̂_u)        (s = 1 + w)                    Ho & Salimans 2022, eq. 6

Timestep indices follow `tfx_jax.diffusion.ddpm`: index i in 0..T-1 has ᾱ = alphas_cumprod[i].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.diffusion.ddpm import Schedule

SAMPLERS = ("ddpm", "ddim")
# Step counts when none is given: DDPM respaced to 250 steps (the Transfusion paper samples
# with 250), DDIM with 50 (deterministic samplers need far fewer, Song et al. 2021 §5.1).
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}


def respaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` training timesteps, evenly spaced from T-1 down to 0 (timestep respacing).

    With steps = T this is every timestep, i.e. Ho et al.'s Algorithm 2.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    t = np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int32)
    return np.unique(t)[::-1].copy()


def step_alphas(schedule: Schedule, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ᾱ_t, ᾱ_s) of each step of a decreasing timestep sequence; the last step goes to ᾱ_s = 1."""
    abar = schedule.alphas_cumprod[timesteps]
    return abar, np.append(abar[1:], 1.0)


def predict_x0(x_t: jax.Array, eps: jax.Array, abar_t: jax.Array) -> jax.Array:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15)."""
    return (x_t - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)


def clip_eps(x_t: jax.Array, eps: jax.Array, abar_t: jax.Array, clip: float) -> jax.Array:
    """The ε̂ whose x̂_0 is clipped to [−clip, clip] (the `clip_denoised` of Ho et al. 2020's and
    Nichol & Dhariwal 2021's samplers).

    Why: with the cosine schedule ᾱ at t = T−1 is ~1e-9, so x̂_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ turns an
    ε̂ error of 0.1 into an x̂_0 error of ~10^3, and the first steps carry it into the sample
    (measured: latents with std ~10^3 from a model whose high-t loss is 0.009). Clipping x̂_0 to
    the data's range and re-deriving ε̂ from it keeps every step consistent (eq. 15 inverted);
    an exact ε̂ (x̂_0 inside the range) is left unchanged.
    """
    x0 = jnp.clip(predict_x0(x_t, eps, abar_t), -clip, clip)
    return (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(jnp.maximum(1.0 - abar_t, 1e-12))


def ddpm_step(
    x_t: jax.Array, eps: jax.Array, abar_t: jax.Array, abar_s: jax.Array, noise: jax.Array
) -> jax.Array:
    """One ancestral step t -> s (Ho et al. 2020, eq. 11 and Algorithm 2, σ² = β̃ of eq. 7).

    Args:
      x_t: the current sample; eps: the predicted noise ε̂ (same shape).
      abar_t, abar_s: ᾱ at the current and the next level (broadcast against x_t); ᾱ_s = 1
        makes the step return x̂_0 with no noise added; ᾱ_s = ᾱ_t leaves x_t unchanged.
      noise: z ~ N(0, I), same shape as x_t.
    """
    alpha = abar_t / abar_s
    mean = (x_t - (1.0 - alpha) / jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(alpha)
    var = (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - alpha)
    return mean + jnp.sqrt(jnp.maximum(var, 0.0)) * noise


def ddim_step(x_t: jax.Array, eps: jax.Array, abar_t: jax.Array, abar_s: jax.Array) -> jax.Array:
    """One deterministic DDIM step t -> s (Song et al. 2021, eq. 12 with σ = 0, i.e. η = 0)."""
    return jnp.sqrt(abar_s) * predict_x0(x_t, eps, abar_t) + jnp.sqrt(1.0 - abar_s) * eps


def guided_eps(eps_cond: jax.Array, eps_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: ε̂_u + s (ε̂_c − ε̂_u) (Ho & Salimans 2022, eq. 6 with s = 1 + w).

    s = 1 is the conditional prediction, s = 0 the unconditional one.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def step(
    sampler: str,
    x_t: jax.Array,
    eps: jax.Array,
    abar_t: jax.Array,
    abar_s: jax.Array,
    rng: jax.Array,
    clip_x0: float | None = None,
) -> jax.Array:
    """One step of the named sampler ("ddpm" draws its noise from `rng`); `clip_x0` clips the
    predicted x̂_0 to [−clip_x0, clip_x0] first (`clip_eps`)."""
    if clip_x0:
        eps = clip_eps(x_t, eps, abar_t, clip_x0)
    if sampler == "ddim":
        return ddim_step(x_t, eps, abar_t, abar_s)
    if sampler == "ddpm":
        return ddpm_step(x_t, eps, abar_t, abar_s, jax.random.normal(rng, x_t.shape, x_t.dtype))
    raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}")


def sample(
    denoise: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    schedule: Schedule,
    timesteps: np.ndarray,
    sampler: str,
    rng: jax.Array,
    clip_x0: float | None = None,
) -> jax.Array:
    """Runs the reverse process from x_T through `timesteps` to x_0 (one `lax.scan`, jittable).

    Args:
      denoise: (x_t, t) -> ε̂, with t the int32 training timestep index (a scalar).
      x_T: the starting noise.
      schedule: the training noise schedule.
      timesteps: decreasing training timestep indices (see `respaced_timesteps`).
      sampler: "ddpm" or "ddim".
      rng: key for DDPM's noise (unused by DDIM).
      clip_x0: clip the predicted x̂_0 to [−clip_x0, clip_x0] at every step (None: no clip).

    Returns:
      x_0, the last step's x̂_0.
    """
    abar_t, abar_s = step_alphas(schedule, timesteps)
    xs = (
        jnp.asarray(timesteps, jnp.int32),
        jnp.asarray(abar_t, jnp.float32),
        jnp.asarray(abar_s, jnp.float32),
        jnp.arange(len(timesteps)),
    )

    def body(x, inputs):
        t, a_t, a_s, i = inputs
        eps = denoise(x, t)
        return step(sampler, x, eps, a_t, a_s, jax.random.fold_in(rng, i), clip_x0), None

    x_0, _ = jax.lax.scan(body, x_T, xs)
    return x_0
