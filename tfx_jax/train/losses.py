"""The Transfusion objective: L = L_LM + λ · L_DDPM (Zhou et al. 2024, §3.3, eq. 4).

Both terms are pure functions of arrays; `tfx_jax.train.loop` wires them to the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# The standard ε-MSE lives with the diffusion modes that use it (diffusion/ddpm.py).
from tfx_jax.diffusion.ddpm import diffusion_loss as diffusion_loss


def lm_loss(
    logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-token cross-entropy (Transfusion eq. 1) averaged over positions where `mask_BT`.

    Position t is scored on token t+1. With `z_loss > 0`, adds z_loss · (log Z)² (PaLM §5) to
    keep the softmax normaliser near 1.

    Returns:
      (loss including z-loss, plain cross-entropy, number of scored tokens).
    """
    targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    logits = logits_BTV.astype(jnp.float32)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)
    mask = mask_BT.astype(jnp.float32)
    count = mask.sum()
    denom = jnp.maximum(count, 1.0)
    ce = (ce_BT * mask).sum() / denom
    loss = ce
    if z_loss:
        log_z_BT = jax.nn.logsumexp(logits, axis=-1)
        loss = loss + z_loss * (jnp.square(log_z_BT) * mask).sum() / denom
    return loss, ce, count
