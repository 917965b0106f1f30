"""Rolling diffusion over the rows of an image's patch grid (Ruhe et al., ICML 2024, 2402.09470).

Rolling diffusion gives every frame of a sequence its own noise level: later frames are noisier,
and a sampler denoises a sliding window of W frames, emitting the front frame once it is clean.
Here the "frames" are the g rows of an image's patch grid (raster order), so an image is generated
top to bottom and streamed row by row, holding only the window (plus the KV cache of the prefix
and of finished rows).

Times. A global time t ∈ [0, 1] maps to a local time τ_r ∈ [0, 1] per row r (0 = clean, 1 = pure
noise), with the window starting at row r0 and w = r − r0 (§3):
  rolling (§3.2, the linear reparameterization):  τ_r(t) = clip((w + t) / W)
  init    (§3.3, the first window, from noise):   τ_r(t) = clip(w / W + t)        "staircase"
          (the paper leaves this schedule open):  τ_r(t) = t + (1 − t) · w / W    "joint"
The clip is the boundary condition of §3.3: rows before the window are clean context (τ = 0),
rows after it are pure noise (τ = 1) and carry no information. One rolling pass takes t from 1
to 0: every window row's τ falls by 1/W, the front row reaches 0 and is emitted, the window shifts
by one row and a pure-noise row enters at the back (τ = (W−1+1)/W = 1): the end state of one pass
is the start state of the next. The init pass takes the first W rows from all-noise (t = 1) to the
staircase w/W (t = 0), which is the rolling state after one shift. The two init schedules
(`init_schedule`) share both ends: "staircase" holds row w at pure noise until t = 1 − w/W and
then moves it as fast per sampling step as a rolling pass does (the window fills from the top,
row by row; the init pass has W·n steps to a rolling pass's n); "joint" moves
every row from t = 1 on, row w at speed 1 − w/W (all rows leave pure noise together, as in
full-image diffusion, and part at the end).

Continuous to discrete. The model embeds integer timesteps: index i of the schedule is the
continuous time (i + 1)/T (the cosine schedule's ᾱ_i = f((i+1)/T) / f(0) exactly). A local time τ
therefore maps to the level n = round(τ·T) ∈ {0..T}: level 0 is clean data (ᾱ = 1) and level n ≥ 1
is schedule index n − 1. The timestep the model is given is max(n − 1, 0): clean rows use index 0,
the project's "clean context" timestep (ᾱ_0 ≈ 1 − 4e-5), as clean prompt images do.

Training (§3.4, local training): per image, draw t ~ U(0, 1) and a window start (the init
schedule at r0 = 0 with probability `init_prob`, else the rolling schedule at r0 ~ U{1..g−1},
the starts the sampler visits), noise every row at its own level, and average the ε-MSE over
the window's patches only — each row's term is the simple loss at its own local time; clean
context rows and pure-noise rows after the window get weight 0.

The init share. Row 0 is denoised only by the init pass, so the init schedule's share of the
training images decides how well the top of an image is drawn (issue 15: with 10% the top row of
4-row images was right for 20% of objects, the bottom row for 91%). The default (`init_prob` < 0,
`init_share`) trains each pass as often as the sampler runs the model in it: the init pass makes
W·n model calls and each of the g − 1 rolling passes n, so the init share is W / (W + g − 1) and
every rolling start gets 1 / (W + g − 1) — the training distribution over (pass, t) is the
sampler's. That is 4/7 for 4 rows and W = 4 (the issue measured 0.5 as fixing the top row) and
4/11 for 8 rows.

Loss weights. An image's loss is its window's summed ε-MSE divided by the number of window
patches ("window", the mean, §3.4). Near the bottom the window hangs past the last row (start
r0 > g − W) and holds fewer rows, so the mean gives each of them more weight: the last start
trains one row, at τ ≤ 1/W, with a whole image's weight. `loss_norm` "full" divides by a full
window's patches (W·c) instead, so every row weighs the same at every start.

Context noise. Training sees the true clean rows above the window; the sampler sees its own
finished rows, so its errors feed the rows below and compound down the image (exposure bias;
issue 15: with a 2-row window and clean context, the bottom third of 8-row images had 57% of
objects right, the top 94%; with τ_ctx = 0.1, the default, 92% and 99%). `context_tau` (config
`rolling_context_noise`) gives the rows above the window the local time τ_ctx instead of 0, in
training (noised by q like every row, still weight 0) and in the sampler (each finished row is
written into the KV cache noised to the same level, with fresh noise): the model learns not to
rely on pixel-exact context (noise conditioning augmentation, Ho et al. 2021, cascaded
diffusion). The rows the sampler emits stay clean.

Attention. The sampler keeps finished rows in the KV cache, written one row at a time once clean,
and runs the model over the window only. For training to see exactly that, the training forward
pass gives each clean row and the window their own attention image ids (the Transfusion mask rule
is unchanged: same document and (causal or same image id)): a clean row attends to the prefix,
the rows above it and itself; the window attends to all clean rows and bidirectionally within
itself; no row attends to the pure-noise rows after the window.

Legend: B batch, M image slots, g rows of patches, c patches per row (cols), I = g·c patches,
W window rows, h/w/C latent grid, p patch size, T sequence length (training) or timesteps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax import layout
from tfx_jax.diffusion import ddpm
from tfx_jax.diffusion.ddpm import Schedule

# ----------------------------------------------------------------------------- schedule


INIT_SCHEDULES = ("staircase", "joint")


def local_times(t, rows, start_row, window: int, init=False, init_schedule: str = "staircase"):
    """τ of each patch row (Ruhe et al. §3.2 rolling, §3.3 init), for numpy or jax arrays.

    Args:
      t: global time in [0, 1] (broadcasts against `rows`).
      rows: row indices r.
      start_row: r0, the window's first row.
      window: W rows.
      init: use the init schedule (bool, broadcasts).
      init_schedule: which one (`INIT_SCHEDULES`, module doc).

    Returns:
      τ_r in [0, 1]: 0 before the window, 1 after it, the linear ramp inside.
    """
    if init_schedule not in INIT_SCHEDULES:
        raise ValueError(f"init_schedule={init_schedule!r}: use one of {INIT_SCHEDULES}")
    xp = jnp if isinstance(t, jax.Array) or isinstance(rows, jax.Array) else np
    w = xp.asarray(rows) - start_row
    rolling = (w + t) / window
    if init_schedule == "joint":
        first = xp.where(w < window, t + (1 - t) * w / window, 1.0)
    else:
        first = w / window + t
    return xp.where(w < 0, 0.0, xp.clip(xp.where(init, first, rolling), 0.0, 1.0))


def levels(tau, num_timesteps: int):
    """Continuous τ -> level n = round(τ·T) in {0..T}; 0 is clean data (see the module doc)."""
    xp = jnp if isinstance(tau, jax.Array) else np
    return xp.round(tau * num_timesteps).astype(xp.int32)


def model_timesteps(level):
    """The timestep index the model embeds for a level: n − 1, and 0 for clean (n = 0)."""
    xp = jnp if isinstance(level, jax.Array) else np
    return xp.maximum(level - 1, 0)


def alpha_bars(schedule: Schedule) -> np.ndarray:
    """ᾱ per level: [1, ᾱ_0, ..., ᾱ_{T-1}] (float64), indexed by `levels`."""
    return np.concatenate([[1.0], schedule.alphas_cumprod])


@dataclasses.dataclass(frozen=True)
class Pass:
    """One sweep of the window: rows start_row .. start_row+W-1 (those < g exist).

    Attributes:
      start_row: r0.
      taus: [n + 1, W] local time of each window row before each step and after the last one.
      init: whether this is the init pass (§3.3).
    """

    start_row: int
    taus: np.ndarray
    init: bool


def sampling_plan(
    rows: int, window: int, steps_per_row: int, init_steps: int = 0, init_schedule="staircase"
) -> list[Pass]:
    """The passes that generate `rows` rows: one init pass, then one rolling pass per row.

    Args:
      rows: g, rows of patches in the image.
      window: W (clipped to g).
      steps_per_row: n, steps of one rolling pass (global t from 1 to 0); a row spends W·n
        steps in the window, so W·n plays the role of the step count of full-image sampling.
      init_steps: steps of the init pass (0 = W·n, so the first row gets as many as the others).
      init_schedule: the init pass's local times (`INIT_SCHEDULES`), as trained.

    Returns:
      Passes in order; after pass k, row k is clean and is emitted.
    """
    W = min(window, rows)
    w = np.arange(W)
    n_init = init_steps or W * steps_per_row
    ts_init = np.linspace(1.0, 0.0, n_init + 1)[:, None]
    ts_roll = np.linspace(1.0, 0.0, steps_per_row + 1)[:, None]
    plan = [Pass(0, local_times(ts_init, w, 0, W, init=True, init_schedule=init_schedule), True)]
    for r0 in range(1, rows):
        taus = local_times(ts_roll, w, 0, W)
        taus = np.where(r0 + w < rows, taus, 0.0)  # rows past the image end do not exist
        plan.append(Pass(r0, taus, False))
    return plan


def row_times(plan: list[Pass], rows: int) -> np.ndarray:
    """τ of every row at every step of a plan: [steps + 1, rows] (1 before a row enters the
    window, 0 after it leaves). What the schedule tests check."""
    out = [np.ones(rows)]
    for p in plan:
        for taus in p.taus[1:]:
            tau = np.where(np.arange(rows) < p.start_row, 0.0, 1.0)
            k = min(len(taus), rows - p.start_row)
            tau[p.start_row : p.start_row + k] = taus[:k]
            out.append(tau)
    return np.stack(out)


# ----------------------------------------------------------------------------- attention ids


def block_id(image_id, block, rows: int):
    """Attention image id of one block of image k (1-based): block r < g is clean row r, block g
    the window, block g + 1 the pure-noise rows after it. Distinct over all images and blocks."""
    return (image_id - 1) * (rows + 2) + block + 1


def attention_image_ids(
    image_ids: jax.Array, row: jax.Array, start_row: jax.Array, window: int, rows: int
) -> jax.Array:
    """Attention image ids that make the training forward pass see what the sampler sees:
    clean rows before the window are one block each, the window one block, the rows after it
    one block (`block_id`); text keeps 0."""
    j = jnp.where(row < start_row, row, jnp.where(row < start_row + window, rows, rows + 1))
    return jnp.where(image_ids > 0, block_id(image_ids, j, rows), 0)


# ----------------------------------------------------------------------------- training

AUTO_INIT = -1.0  # `init_prob` that means `init_share(rows, window)`
LOSS_NORMS = ("window", "full")  # training_inputs' loss_norm (module doc, "Loss weights")


def init_share(rows: int, window: int) -> float:
    """The init schedule's share of training images that matches the sampler (module doc):
    W / (W + g − 1), the init pass's share of the model calls of `sampling_plan`."""
    W = min(window, rows)
    return W / (W + rows - 1)


def resolve_init_prob(init_prob: float, rows: int, window: int) -> float:
    """`init_prob` itself, or `init_share(rows, window)` when it is negative (the default)."""
    return init_share(rows, window) if init_prob < 0 else float(init_prob)


def training_inputs(
    rng: jax.Array,
    schedule: Schedule,
    x0_BMhwC: jax.Array,
    eps_BMhwC: jax.Array,
    image_ids_BT: jax.Array,
    slot_BT: jax.Array,
    start_BM: jax.Array,
    patch_size: int,
    window: int,
    init_prob: float,
    context_tau: float = 0.0,
    init_schedule: str = "staircase",
    loss_norm: str = "window",
) -> dict[str, jax.Array]:
    """Noised latents, per-patch timesteps, attention ids and loss weights of rolling training.

    Args:
      rng: key for the global times, the schedule choice and the window starts.
      schedule: the training noise schedule (T levels).
      x0_BMhwC, eps_BMhwC: clean latents of every slot and the noise to add.
      image_ids_BT, slot_BT, start_BM: the batch's image ids and slots (`layout.image_slots`).
      patch_size: p.
      window: W rows.
      init_prob: probability of training on the init schedule (§3.3) instead of a rolling one;
        negative: `init_share(g, W)`.
      context_tau: local time of the rows above the window (0 = clean; "Context noise" in the
        module doc).
      init_schedule: the init pass's local times (`INIT_SCHEDULES`).
      loss_norm: what an image's window loss is divided by (`LOSS_NORMS`, "Loss weights").

    Returns:
      dict with xt_BMhwC (the noised latents), t_BMI (model timesteps), attn_image_ids_BT
      (for the mask), weight_BMI (1 on window patches), norm_BM (the divisor of each image's
      summed window loss), t_BM (global time scaled to 0..T-1).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm={loss_norm!r}: use one of {LOSS_NORMS}")
    B, M, h, w, _ = x0_BMhwC.shape
    g, c, T = h // patch_size, w // patch_size, schedule.num_timesteps
    W = min(window, g)
    t_rng, init_rng, start_rng = jax.random.split(rng, 3)
    t_BM = jax.random.uniform(t_rng, (B, M))  # global time ~ U(0, 1) (§3.4)
    if g > 1:
        p_init = resolve_init_prob(init_prob, g, W)
        init_BM = jax.random.bernoulli(init_rng, p_init, (B, M))
        r0_BM = jnp.where(init_BM, 0, jax.random.randint(start_rng, (B, M), 1, g))
    else:
        init_BM, r0_BM = jnp.ones((B, M), bool), jnp.zeros((B, M), jnp.int32)
    rows_g = jnp.arange(g)
    tau_BMg = local_times(
        t_BM[..., None], rows_g, r0_BM[..., None], W, init_BM[..., None], init_schedule
    )
    if context_tau:  # the rows above the window at the sampler's context level (module doc)
        tau_BMg = jnp.where(rows_g < r0_BM[..., None], context_tau, tau_BMg)
    idx_BMg = model_timesteps(levels(tau_BMg, T))
    # Noise every latent pixel row at its patch row's level (Ruhe et al. §3.1, per-frame q).
    idx_BMhw = jnp.broadcast_to(jnp.repeat(idx_BMg, patch_size, axis=-1)[..., None], (B, M, h, w))
    xt_BMhwC = ddpm.q_sample(schedule, x0_BMhwC, idx_BMhw, eps_BMhwC)
    t_BMI = jnp.repeat(idx_BMg, c, axis=-1)  # raster order: patch i is in row i // c
    in_window_BMg = (rows_g >= r0_BM[..., None]) & (rows_g < r0_BM[..., None] + W)
    weight_BMI = jnp.repeat(in_window_BMg, c, axis=-1).astype(jnp.float32)
    if loss_norm == "full":  # a window hanging past the last row weighs its rows as a full one
        norm_BM = jnp.full((B, M), float(W * c), jnp.float32)
    else:
        norm_BM = jnp.maximum(weight_BMI.sum(-1), 1.0)

    Tlen = image_ids_BT.shape[1]
    slot = jnp.maximum(slot_BT, 0)
    offset_BT = jnp.arange(Tlen)[None, :] - jnp.take_along_axis(start_BM, slot, axis=1)
    row_BT = offset_BT // c
    r0_BT = jnp.take_along_axis(r0_BM, slot, axis=1)
    # Images beyond the M slots (none with the default M) stay one bidirectional block.
    r0_BT = jnp.where(slot_BT >= 0, r0_BT, 0)
    row_BT = jnp.where(slot_BT >= 0, row_BT, 0)
    attn_BT = attention_image_ids(image_ids_BT, row_BT, r0_BT, W, g)
    return {
        "xt_BMhwC": xt_BMhwC,
        "t_BMI": t_BMI,
        "attn_image_ids_BT": attn_BT,
        "weight_BMI": weight_BMI,
        "norm_BM": norm_BM,
        "t_BM": jnp.minimum((t_BM * T).astype(jnp.int32), T - 1),
    }


def windowed_diffusion_loss(
    eps_hat_BMhwC: jax.Array,
    eps_BMhwC: jax.Array,
    weight_BMI: jax.Array,
    valid_BM: jax.Array,
    patch_size: int,
    norm_BM: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ε-MSE over each image's window patches (Ruhe et al. §3.4), then over images.

    Args:
      norm_BM: the divisor of each image's summed window loss (`training_inputs`' norm_BM).

    Returns:
      (mean over valid images, per-image loss [B, M], number of images).
    """
    err = jnp.square(eps_hat_BMhwC.astype(jnp.float32) - eps_BMhwC.astype(jnp.float32))
    err_BMI = layout.patchify(err, patch_size).mean(-1)
    per_image_BM = (err_BMI * weight_BMI).sum(-1) / norm_BM
    valid = valid_BM.astype(jnp.float32)
    count = valid.sum()
    return (per_image_BM * valid).sum() / jnp.maximum(count, 1.0), per_image_BM, count
