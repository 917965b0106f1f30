"""DDPM noise schedules and the forward (noising) process, as pure functions.

Cosine schedule (Nichol & Dhariwal 2021, eq. 17):
    ᾱ(t) = f(t) / f(0),  f(t) = cos²(((t/T + s) / (1 + s)) · π/2),  s = 0.008,
    β_t = 1 - ᾱ(t) / ᾱ(t-1), clipped to ≤ 0.999.
Forward process (Ho et al. 2020, eq. 4):  x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε.

Timesteps are integers 0..T-1 where index t means "after t+1 noising steps".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep constants, float64 numpy on the host (cast on use)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """β_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17 and §3.2)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """β_t of DDPM's linear schedule (Ho et al. 2020, §4), rescaled to `num_timesteps`."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def make_schedule(name: str, num_timesteps: int) -> Schedule:
    betas = {"cosine": cosine_betas, "linear": linear_betas}[name](num_timesteps)
    return Schedule(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. 2020, eq. 4); `t` indexes x0's leading dims."""
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
    abar = abar.reshape(abar.shape + (1,) * (x0.ndim - abar.ndim))
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def diffusion_loss(
    eps_hat_BMhwC: jax.Array, eps_BMhwC: jax.Array, valid_BM: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ε-prediction MSE (Ho et al. 2020, eq. 14; Transfusion eq. 3), per image then over images.

    Returns:
      (mean over valid images of the per-image MSE, per-image MSE [B, M], number of images).
    """
    err = jnp.square(eps_hat_BMhwC.astype(jnp.float32) - eps_BMhwC.astype(jnp.float32))
    per_image_BM = err.mean(axis=(-3, -2, -1))
    valid = valid_BM.astype(jnp.float32)
    count = valid.sum()
    return (per_image_BM * valid).sum() / jnp.maximum(count, 1.0), per_image_BM, count
