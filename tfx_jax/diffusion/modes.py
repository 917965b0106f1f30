"""The diffusion mode (`diffusion.mode`) as one object: how training noises an image and weighs
its loss, what context the sampler shows the model, and which image sampler draws it.

    mode = modes.of(cfg.diffusion.mode)      # Standard() | Rolling()
    noised = mode.noise(rng, dc, schedule, x0, eps, t_BM, img, slot_BT, start_BM, patch)
    loss, per_image, n = mode.loss(eps_hat, eps, valid_BM, patch, noised)

Every place that depends on the mode asks this object (the train step, the decoder's context
level, the host loop's attention ids, the generate options and the config check), so a new mode
is one class here, and nothing else compares `mode` with a name.

  standard  one t per image (Transfusion §3, eq. 3): x_t = √ᾱ x0 + √(1-ᾱ) ε over the whole block
  rolling   every patch row at its own level inside a window (Ruhe et al. 2024; rolling.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.diffusion import ddpm, rolling
from tfx_jax.diffusion.ddpm import Schedule


@dataclasses.dataclass(frozen=True)
class Noised:
    """What training feeds the model for one batch of image slots, and how the loss weighs it.

    `weight_BMI` / `norm_BM` are None when every patch counts equally (the standard ε-MSE)."""

    xt_BMhwC: jax.Array
    t_BMI: jax.Array  # per-patch timestep (the model interface)
    t_BM: jax.Array  # per-image timestep, for the loss-by-t buckets
    attn_image_ids_BT: jax.Array  # the attention's image ids (rolling splits an image in blocks)
    weight_BMI: jax.Array | None = None
    norm_BM: jax.Array | None = None


class Mode:
    """One diffusion mode. `sampler` is the image sampler `generate` uses for it by default;
    `windowed`: that sampler runs the model on a window of patch rows (and streams them)."""

    name: ClassVar[str]
    sampler: ClassVar[str]
    windowed: ClassVar[bool] = False

    def check(self, dc: Any, model: Any) -> str | None:
        """A one-line reason the diffusion section cannot run with this model section, or
        None."""
        return None

    def noise(
        self,
        rng: jax.Array,
        dc: Any,
        schedule: Schedule,
        x0_BMhwC: jax.Array,
        eps_BMhwC: jax.Array,
        t_BM: jax.Array,
        img_BT: jax.Array,
        slot_BT: jax.Array,
        start_BM: jax.Array,
        patch_size: int,
    ) -> Noised:
        raise NotImplementedError

    def loss(
        self, eps_hat_BMhwC, eps_BMhwC, valid_BM, patch_size: int, noised: Noised
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(loss, per-image loss [B, M], number of images)."""
        return ddpm.diffusion_loss(eps_hat_BMhwC, eps_BMhwC, valid_BM)

    def context_noise(self, dc: Any) -> float:
        """Local time of the rows above the sampler's window (0: the clean rows it was trained
        on)."""
        return 0.0

    def attention_ids(self, img_T: np.ndarray, patch_T: np.ndarray, rows: int) -> np.ndarray:
        """Host-side attention image ids of one prompt row (the cached prefix's images)."""
        return img_T


class Standard(Mode):
    name, sampler = "standard", "full"

    def noise(self, rng, dc, schedule, x0_BMhwC, eps_BMhwC, t_BM, img_BT, slot_BT, start_BM,
              patch_size):  # fmt: skip
        B, M = t_BM.shape
        num_patches = (x0_BMhwC.shape[2] // patch_size) * (x0_BMhwC.shape[3] // patch_size)
        return Noised(
            xt_BMhwC=ddpm.q_sample(schedule, x0_BMhwC, t_BM, eps_BMhwC),
            t_BMI=jnp.broadcast_to(t_BM[:, :, None], (B, M, num_patches)),
            t_BM=t_BM,
            attn_image_ids_BT=img_BT,
        )


class Rolling(Mode):
    name, sampler, windowed = "rolling", "rolling", True

    def check(self, dc, model):
        rows = model.latent_size // model.patch_size
        checks = (
            (
                1 <= dc.rolling_window <= rows,
                f"diffusion.rolling_window={dc.rolling_window} must be in [1, {rows}] (rows of "
                "the patch grid).",
            ),
            (
                model.patch_encoder == "linear",
                "diffusion.mode=rolling needs model.patch_encoder=linear: the sampler runs the "
                "model on a window of patch rows, and the U-Net's convolutions would mix rows it "
                "cannot see.",
            ),
            (
                getattr(model, "image_attention", "bidirectional") == "bidirectional",
                "diffusion.mode=rolling needs model.image_attention=bidirectional: the rolling "
                "window attends within itself by its own row blocks (tfx_jax.diffusion.rolling).",
            ),
            (
                dc.rolling_init_prob == -1.0 or 0.0 <= dc.rolling_init_prob <= 1.0,
                f"diffusion.rolling_init_prob={dc.rolling_init_prob} must be in [0, 1], or -1 for "
                "W / (W + rows - 1), the init pass's share of the sampler's model calls.",
            ),
            (
                dc.rolling_init_schedule in ("staircase", "joint"),
                f"diffusion.rolling_init_schedule={dc.rolling_init_schedule!r}: staircase | joint.",
            ),
            (
                dc.rolling_loss_norm in ("window", "full"),
                f"diffusion.rolling_loss_norm={dc.rolling_loss_norm!r}: window | full.",
            ),
        )
        return next((msg for ok, msg in checks if not ok), None)

    def noise(self, rng, dc, schedule, x0_BMhwC, eps_BMhwC, t_BM, img_BT, slot_BT, start_BM,
              patch_size):  # fmt: skip
        roll = rolling.training_inputs(
            rng,
            schedule,
            x0_BMhwC,
            eps_BMhwC,
            img_BT,
            slot_BT,
            start_BM,
            patch_size,
            dc.rolling_window,
            dc.rolling_init_prob,
            dc.rolling_context_noise,
            dc.rolling_init_schedule,
            dc.rolling_loss_norm,
        )
        return Noised(
            xt_BMhwC=roll["xt_BMhwC"],
            t_BMI=roll["t_BMI"],
            t_BM=roll["t_BM"],
            attn_image_ids_BT=roll["attn_image_ids_BT"],
            weight_BMI=roll["weight_BMI"],
            norm_BM=roll["norm_BM"],
        )

    def loss(self, eps_hat_BMhwC, eps_BMhwC, valid_BM, patch_size, noised):
        return rolling.windowed_diffusion_loss(
            eps_hat_BMhwC, eps_BMhwC, noised.weight_BMI, valid_BM, patch_size, noised.norm_BM
        )

    def context_noise(self, dc):
        return dc.rolling_context_noise

    def attention_ids(self, img_T, patch_T, rows):
        return np.where(img_T > 0, rolling.block_id(img_T, patch_T // rows, rows), 0)


MODES: dict[str, Mode] = {m.name: m for m in (Standard(), Rolling())}
SAMPLERS: dict[str, Mode] = {m.sampler: m for m in MODES.values()}


def of(name: str) -> Mode:
    """The mode called `name` (KeyError naming the choices: config.validate checks first)."""
    if name not in MODES:
        raise KeyError(f"diffusion.mode={name!r}: {' | '.join(MODES)}.")
    return MODES[name]


def windowed(image_mode: str) -> bool:
    """Whether the image sampler `image_mode` ("full" | "rolling") runs the model on a window of
    patch rows: it streams rows as they finish, and needs the linear patch encoder."""
    return image_mode in SAMPLERS and SAMPLERS[image_mode].windowed
